"""The ``hprune`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import HPruneError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inventory import format_inventory, inspect_transformer

    inventory = inspect_transformer(args.source)
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
    else:
        print(format_inventory(inventory, dtype=args.dtype))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoFolderError, format_demo_summary, run_demo

    overrides = _config_overrides(args)
    try:
        summary = run_demo(args.out, overrides=overrides, overwrite=args.overwrite)
    except DemoFolderError as e:
        print(f"hprune demo: error: {e}", file=sys.stderr)
        return 2
    print(format_demo_summary(summary))
    return 0


def _cmd_toy_train(args: argparse.Namespace) -> int:
    from .toy.train import train_all

    paths = train_all(args.out, minutes=args.minutes, seed=args.seed)
    print(f"trained: {', '.join(str(p) for p in paths.values())}")
    print("to ship them, copy the sd3 and flux folders to diffusers_hprune/toy/models/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import toy
    from .analysis import DEFAULT_PROMPTS, _is_toy
    from .evaluation import FIDELITY, evaluate_pipelines, load_for_evaluation
    from .fileio import atomic_write_json

    models = {"teacher" if args.student else "model": load_for_evaluation(args.model)}
    if args.student:
        models["student"] = load_for_evaluation(args.student)
    reference = next(iter(models.values()))
    is_toy = _is_toy(reference) is not None or args.model in toy.FAMILIES
    if args.prompts:
        from .distillation.data import _read_prompts

        prompt_list = _read_prompts(args.prompts)[: args.n] if args.n else _read_prompts(args.prompts)
    elif is_toy:
        prompt_list = toy.prompts(split=args.split, n=args.n or 200, seed=args.seed)
    else:
        prompt_list = [DEFAULT_PROMPTS[k % len(DEFAULT_PROMPTS)] for k in range(args.n or 8)]
    metrics = args.metric or ([FIDELITY] if args.student else []) + (["shapeeval"] if is_toy else [])
    result = evaluate_pipelines(
        models, prompt_list, seed=args.seed, metrics=metrics, metric_options=_evaluate_metric_args(args.metric_arg,
                                                                                                    metrics),
        num_inference_steps=args.steps, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, cost=not args.no_cost, latency_repeats=args.latency_repeats, warmup=args.warmup,
        grid=args.grid, grid_size=args.grid_size,
    )
    print(format_evaluation(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _evaluate_metric_args(pairs: list[str], metrics: list[str]) -> dict[str, dict]:
    """``METRIC:KEY=VALUE`` for one metric, ``KEY=VALUE`` for every metric that is not fidelity."""
    options: dict[str, dict] = {}
    for item in pairs or []:
        target, colon, rest = item.partition(":")
        if not colon or "=" in target:
            target, rest = None, item
        for key, value in _metric_args([rest]).items():
            for metric in [target] if target else [m for m in metrics if m != "fidelity"]:
                options.setdefault(metric, {})[key] = value
    return options


def format_evaluation(result: dict) -> str:
    """The table ``hprune evaluate`` prints."""
    from .evaluation import overall_score

    names = list(result["models"])
    entries = [result["models"][n] for n in names]
    rows = []

    def add(label, values):
        rows.append([label, *values])

    if "params" in entries[0]:
        add("parameters", [f"{e['params']:,}" for e in entries])
        add("weight bytes", [f"{e['weight_bytes']:,}" for e in entries])
        add("step peak bytes", [f"{e['step_peak_bytes']:,}" for e in entries])
        add("step latency", [f"{e['latency_s']['median'] * 1e3:.1f} ms (IQR {e['latency_s']['iqr'] * 1e3:.1f})"
                             for e in entries])
    for metric in entries[0]["metrics"]:
        values = [e["metrics"][metric] for e in entries]
        add(metric, [f"{overall_score(v):.4g}" for v in values])
    for e in entries[1:]:
        if "fidelity" in e:
            f = e["fidelity"]
            rows.append(["fidelity to " + names[0], "-"] + [f"PSNR {f['psnr_db']:.2f} dB"
                                                          + (f", SSIM {f['ssim']:.3f}" if f["ssim"] is not None else "")])
    header = ["", *names]
    if len(names) == 2:
        header.append(f"{names[1]} / {names[0]}")
        rel = entries[1].get("relative", {})
        keys = {"parameters": "params", "weight bytes": "weight_bytes", "step peak bytes": "step_peak_bytes",
                "step latency": "latency"}
        for row in rows:
            key = keys.get(row[0], row[0])
            row.append(f"{rel[key]:.1%}" if key in rel else "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append(f"{len(result['prompts'])} prompts, seeds {result['seed']}.., generation {result['generation']}")
    if "grid" in result:
        lines.append(f"grid ({' | '.join(names)}, one row each): {result['grid']}")
    return "\n".join(lines)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4e9, ``"3.5GiB"`` -> 3.5 * 2**30, ``"123"`` -> 123 (bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if unit and not unit.endswith("b"):
        unit += "b"
    if not m or unit not in _UNITS and unit:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size; write e.g. 4GB, 3.5GiB, 800MB or a number of bytes"
        )
    return int(float(m.group(1)) * _UNITS[unit or "b"])


def _metric_args(pairs: list[str]) -> dict:
    options = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HPruneError(f"--metric-arg takes KEY=VALUE, got {item!r}.")
        options[key] = value
    return options


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis import analyze, synthetic_report

    if args.synthetic:
        report = synthetic_report(args.model, seed=args.seed, pairs=args.pairs)
        report.save(args.out)
        print(f"wrote a SYNTHETIC analysis of {args.model} (no weights, no measurement) to {args.out}")
        return 0
    import diffusers
    import torch

    diffusers.utils.logging.disable_progress_bar()
    prompts = None
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise HPruneError(f"Cannot read the prompt file {args.prompts} ({e}); give a text file, one prompt a line.") from e
    report = analyze(
        args.model, args.out, metric=args.metric, metric_options=_metric_args(args.metric_arg), prompts=prompts,
        n_prompts=args.n_prompts, seed=args.seed, num_inference_steps=args.steps, eval_steps=args.eval_steps,
        height=args.height, width=args.width, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
        pairs=args.pairs, method=args.method, overwrite=args.overwrite,
        torch_dtype=getattr(torch, args.dtype) if args.dtype else None, cache_device=args.cache_device,
    )
    from .distributed import process_state

    if process_state().is_main_process:
        run = report.run.get("this_process", report.run)
        print(f"analysed {report.model}: {len(report.entries)} entries ({run.get('reused_entries', 0)} reused from an "
              f"earlier run, {run.get('computed_entries', 0)} computed here), metric {report.metric['name']}, "
              f"P(original) = {report.baseline_score:.6g}")
        print(f"block evaluations: {report.run.get('block_evaluations')}, seconds: {report.run.get('seconds'):.1f}, "
              f"block-output cache: {run.get('cache_bytes', 0) / 1e6:.1f} MB")
        print(f"wrote {args.out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .analysis import AnalysisError, ContributionReport
    from .inventory import inspect_transformer
    from .planning import make_plan

    report = ContributionReport.load(args.analysis)
    if not report.complete and args.strategy != "last":
        raise AnalysisError(
            f"{args.analysis} is incomplete ({len(report.entries)} of {len(report.expected_keys())} entries); "
            "finish it with the same `hprune analyze` command (it resumes), or use --strategy last."
        )
    inventory = inspect_transformer(report.transformer_config)
    outcome = make_plan(
        report.contributions(), inventory, ratio=args.ratio, memory_bytes=args.memory, weight_dtype=args.weight_dtype,
        alpha=args.alpha, r_thres=args.r_thres, strategy=args.strategy, similarity=report.similarity,
        metadata={"analysis": str(args.analysis), "analysis_metric": report.metric["name"], "model": report.model},
    )
    outcome.plan.save(args.out)
    print(outcome.summary())
    print("removed, in the order chosen: " + ", ".join(f"{i}:{c}" for i, c in outcome.order))
    print(f"wrote {args.out}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distillation.arguments import config_from_args
    from .distillation.trainer import distill

    distill(config_from_args(args))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from .inventory import inspect_transformer
    from .memory import format_bytes
    from .quantization import quantize_pipeline

    dtypes = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = quantize_pipeline(args.model, args.out, skip_modules=args.skip_modules,
                            compute_dtype=dtypes[args.compute_dtype], dtype=dtypes[args.dtype],
                            overwrite=args.overwrite)

    config = json.loads((out / "transformer" / "config.json").read_text())
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    inventory = inspect_transformer(config)
    on_disk = sum(f.stat().st_size for f in (out / "transformer").glob("*.safetensors"))
    print(f"quantised the transformer to NF4 (double quantisation, block size 64); kept in 16-bit: {', '.join(skip)}")
    nf4, bf16 = inventory.nbytes("nf4"), inventory.nbytes("bf16")
    print(f"transformer file: {on_disk:,} bytes = {format_bytes(on_disk)}; computed NF4 weights {nf4:,} bytes, "
          f"bf16 {bf16:,} bytes ({nf4 / bf16:.1%})")
    print(f"wrote {out}; load it with `import diffusers_hprune` then `DiffusionPipeline.from_pretrained('{out}')`")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .card import write_model_card
    from .hub import push_folder, require_token, upload_tree

    require_token(args.token)  # before writing a card or anything else
    if args.base_model:
        card = write_model_card(args.folder, base_model=args.base_model, evaluation=args.evaluation, grid=args.grid,
                                repo_id=args.repo_id, license=args.license)
        print(f"wrote the model card {card}")
    files = upload_tree(args.folder) if Path(args.folder).is_dir() else []
    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {len(files)} files to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def _config_overrides(args: argparse.Namespace) -> dict:
    """The HPruneConfig fields given on the command line (flags from ``_add_config_flags``)."""
    from dataclasses import fields

    from .config import HPruneConfig

    values = {f.name: getattr(args, f.name) for f in fields(HPruneConfig) if getattr(args, f.name, None) is not None}
    if getattr(args, "memory", None) is not None:
        values["ratio"] = None
    elif getattr(args, "ratio", None) is not None:
        values["memory"] = None
    if getattr(args, "quantize", None) is not None:
        values["quantize"] = args.quantize == "nf4"
    if getattr(args, "no_distill", False):
        values["distill"] = False
    return values


def _cmd_compress(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .compress import compress
    from .config import HPruneConfig

    values = asdict(HPruneConfig.load(args.config)) if args.config else {}
    values.update(_config_overrides(args))
    prompts = None
    if args.prompts:
        from .distillation.data import _read_prompts

        prompts = _read_prompts(args.prompts)
    compress(args.model, args.out, HPruneConfig(**values), prompts=prompts, push=args.push, private=args.private,
             license=args.license)
    return 0


def _add_config_flags(parser: argparse.ArgumentParser, defaults=None) -> None:
    """One flag per HPruneConfig field (``--max-train-steps`` ...); the help shows ``defaults``
    (an HPruneConfig; default: the dataclass's defaults). Flags not given stay None."""
    from dataclasses import MISSING, fields

    from .config import HPruneConfig

    special = {"ratio", "memory", "quantize", "distill"}
    g = parser.add_argument_group("settings (HPruneConfig fields)" if defaults is not None else
                                  "settings (HPruneConfig fields; --config FILE gives them all)")
    for f in fields(HPruneConfig):
        if f.name in special:
            continue
        default = f.default if f.default is not MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        kind = {"bool": None, "int": int, "float": float, "str": str}.get(type(default).__name__, float)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            g.add_argument(flag, dest=f.name, type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                           metavar="true|false", help=f"default {default}")
        else:
            g.add_argument(flag, dest=f.name, type=kind or float, help=f"default {default}")


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis import ContributionReport
    from .plan import PrunePlan
    from .report import format_table, write_report

    report = ContributionReport.load(args.analysis)
    plan = PrunePlan.load(args.plan) if args.plan else None
    if plan is not None:
        plan = report.model_family.check_plan(plan, report.transformer_config)
    paths = write_report(report, args.out, plan, alpha=args.alpha)
    print(format_table(report, plan, args.alpha))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .inventory import BUILTIN_CONFIGS
    from .memory import DTYPES

    parser = argparse.ArgumentParser(
        prog="hprune",
        description="HierarchicalPrune for Diffusers SD3/SD3.5 and FLUX.1 transformers.",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-hprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="table of blocks and components with parameter counts and bytes (no weights needed)",
        description="Print every block and component of a transformer with its parameter count and size, "
        "built on the meta device from the config alone.",
    )
    p.add_argument(
        "source",
        metavar="CONFIG_OR_FOLDER",
        help="a transformer config.json, a transformer or pipeline folder, a Hub repo id, or a built-in config: "
        + ", ".join(BUILTIN_CONFIGS),
    )
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="weight dtype for sizes (default bf16; nf4 = 4-bit weights with double quantisation)")
    p.add_argument("--json", action="store_true", help="print the inventory as JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "demo",
        help="hprune compress on the embedded SD3 toy pipeline (CPU, about 10 minutes)",
        description="The whole method on the embedded toy StableDiffusion3Pipeline: analyse, plan (HPP, 30%%), "
        "prune, distil (PWP + SGDistill, 5 minutes), quantise (NF4), evaluate (ShapeEval of teacher and student, "
        "bytes, latency, sample grid) and write the model card. Every compress setting can be changed with its "
        "flag; a second run in the same folder continues where the first stopped.",
    )
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--ratio", type=float, help="fraction of the transformer's parameters to remove (default 0.3)")
    p.add_argument("--quantize", choices=["nf4", "none"], help="quantise the result (default nf4)")
    p.add_argument("--no-distill", action="store_true", help="skip distillation (HPP alone)")
    p.add_argument("--overwrite", action="store_true", help="delete the output folder first and start over")
    from .demo import DEMO_CONFIG

    _add_config_flags(p, defaults=DEMO_CONFIG)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "evaluate",
        help="quality, memory and latency of a pipeline, or of a student next to its teacher",
        description="Draw the same prompts with the same seeds with every pipeline; score them with the metrics "
        "asked for (default: ShapeEval on the toys; fidelity = PSNR/SSIM of the student's images against the "
        "teacher's), and measure the transformer's parameters, weight bytes, the peak memory and the latency of one "
        "denoising step (warm-up, then the median of --latency-repeats steps).",
    )
    p.add_argument("model", help="the pipeline (the teacher when STUDENT is given): a folder, a cached Hub id, or a "
                   "toy name (sd3, flux)")
    p.add_argument("student", nargs="?", help="a student pipeline to compare with MODEL")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="a metric of the registry (fidelity, shapeeval, clip_score, hpsv2, ...); repeat for several")
    p.add_argument("--metric-arg", action="append", metavar="[METRIC:]KEY=VALUE", help="an option of a metric")
    p.add_argument("--prompts", help="a text file, one prompt a line (default: the toy's held-out prompts)")
    p.add_argument("--n", type=int, help="number of prompts (default 200 on the toys, 8 otherwise)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout", help="toy prompt split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--latency-repeats", type=int, default=10, help="timed denoising steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--no-cost", action="store_true", help="skip the memory and latency measurements")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--grid", help="write a PNG grid here: one row per pipeline, one column per prompt")
    p.add_argument("--grid-size", type=int, default=16, help="prompts in the grid (default 16)")
    p.set_defaults(func=_cmd_evaluate)

    from .metrics import metric_names
    from .planning import DEFAULT_R_THRES, STRATEGIES

    p = sub.add_parser(
        "analyze",
        help="measure dP for every block and component (contribution analysis; resumable, shardable)",
        description="Contribution analysis (DESIGN.md section 6, step 1): dP(i, c) = P(original) - P(without "
        "component c of block i) for every block and component, on calibration prompts with fixed seeds. "
        "Each finished entry is saved as it completes (OUT.parts/); run the same command again to resume. "
        "Under `accelerate launch --num_processes N` the entries are split across processes.",
    )
    p.add_argument("model", help="a pipeline folder or Hub repo id (SD3/SD3.5/FLUX.1), or a toy name (sd3, flux); "
                   "with --synthetic: a config (built-in name, config.json, folder)")
    p.add_argument("--out", required=True, help="the analysis.json to write (and resume from)")
    p.add_argument("--metric", default="fidelity", help=f"quality metric P, one of {', '.join(metric_names())} "
                   "(default fidelity: agreement of the predicted velocity with the full model's)")
    p.add_argument("--metric-arg", action="append", metavar="KEY=VALUE",
                   help="an option of the metric, e.g. model=PATH for clip_score (repeatable)")
    p.add_argument("--prompts", help="calibration prompts, one a line (default: toy training prompts for the toys, "
                   "a built-in varied list otherwise)")
    p.add_argument("--n-prompts", type=int, default=8, help="how many default prompts (default 8)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed SEED+k (default 0)")
    p.add_argument("--steps", type=int, help="denoising steps of the calibration images (default: the toy's, else 28)")
    p.add_argument("--eval-steps", type=int, default=4,
                   help="denoising steps at which predictions are compared (default 4, spread evenly)")
    p.add_argument("--height", type=int, help="image height (default: the toy's or the pipeline's)")
    p.add_argument("--width", type=int, help="image width (default: the toy's or the pipeline's)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (default: the toy's or the pipeline's)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--pairs", action="store_true", help="also remove every pair of components of a block together")
    p.add_argument("--method", choices=["cached", "naive", "scratch"], default="cached",
                   help="cached (default): ablations run from cached block outputs; naive: the whole ablated model "
                   "runs per entry; scratch: the full model's outputs are recomputed per entry too (same numbers, "
                   "slower; for verification and benchmarks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--cache-device", help="where cached block outputs live (default: with the model; 'cpu' for "
                   "large models at high resolution)")
    p.add_argument("--overwrite", action="store_true", help="start again, replacing an OUT of other settings")
    p.add_argument("--synthetic", action="store_true",
                   help="write a made-up analysis shaped like the paper's from the config alone (no weights), for "
                   "planning and memory estimates")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser(
        "plan",
        help="choose what to remove from an analysis for a target ratio or memory budget (HPP)",
        description="Hierarchical Position Pruning (DESIGN.md section 6, steps 2-4): rank blocks and components by "
        "Score = -|dP| / W_pos and remove whole blocks, then (above --r-thres) components, until the target is met. "
        "Parameters are counted over the whole transformer.",
    )
    p.add_argument("analysis", help="an analysis.json from `hprune analyze`")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of the transformer's parameters to remove, in (0, 1)")
    target.add_argument("--memory", type=parse_bytes, help="weight budget, e.g. 4GB or 3.5GiB (at --weight-dtype)")
    p.add_argument("--weight-dtype", choices=DTYPES, default="bf16",
                   help="dtype the memory budget and estimate are for (default bf16; nf4 = 4-bit weights)")
    p.add_argument("--alpha", type=float, help="position-weight exponent (default: 0.55 SD3 family, 0.01 FLUX)")
    p.add_argument("--r-thres", type=float, default=DEFAULT_R_THRES,
                   help=f"above this ratio components are removed after whole blocks (default {DEFAULT_R_THRES})")
    p.add_argument("--strategy", choices=STRATEGIES, default="hierarchical",
                   help="hierarchical (the paper, default); baselines: bk-sdm (blocks by dP), koala (blocks by "
                   "input/output similarity), last (the last blocks)")
    p.add_argument("--out", required=True, help="the plan.json to write")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "report",
        help="plots and a table of an analysis, with a plan marked",
        description="Bar charts and heatmaps of dP per block and component (paper Figs. 4, 8, 9), the "
        "similarity per block, and a text table; with --plan, what it removes is marked.",
    )
    p.add_argument("analysis", help="an analysis.json from `hprune analyze`")
    p.add_argument("--plan", help="a plan.json to mark")
    p.add_argument("--alpha", type=float, help="alpha for the Score panel (default: the family's)")
    p.add_argument("--out", required=True, help="folder for blocks.png, components.png, similarity.png, table.txt")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "quantize",
        help="W4A16: NF4 weights (bitsandbytes) for a pipeline's transformer, saved in Diffusers' format",
        description="Quantise the transformer of a pipeline folder (pruned or not) to NF4 with double quantisation "
        "(block size 64) through Diffusers' bitsandbytes quantizer; everything else is copied. The result loads "
        "with DiffusionPipeline.from_pretrained: stock Diffusers on a GPU, and after `import diffusers_hprune` on "
        "a CPU too.",
    )
    p.add_argument("model", help="a pipeline folder (from save_pretrained or `hprune distill`)")
    p.add_argument("--out", required=True, help="the new pipeline folder")
    p.add_argument("--skip-modules", nargs="+", metavar="NAME",
                   help="modules kept in 16-bit (default: the family's input embedders, norm_out, and for SD3 proj_out)")
    p.add_argument("--compute-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="dtype the 4-bit layers compute in (auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="storage dtype of the transformer's parameters that stay unquantised (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "push",
        help="publish a pipeline folder with its model card to the Hugging Face Hub (one commit)",
        description="Create the repository if needed and upload the folder (pipeline, README.md card, sample "
        "images; not checkpoints, caches or logs) in one commit. With --base-model the card is written first.",
    )
    p.add_argument("folder", help="a pipeline folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a Hugging Face token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--base-model", help="write the model card first, naming this base model (Hub id)")
    p.add_argument("--evaluation", help="with --base-model: a metrics.json from `hprune evaluate TEACHER STUDENT`")
    p.add_argument("--grid", help="with --base-model: the sample grid from `hprune evaluate --grid`")
    p.add_argument("--license", help="with --base-model: the base model's license id (default: other)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "compress",
        help="the whole method in one command: analyse, plan, prune, distil, quantise, evaluate, card (, push)",
        description="Compress a pipeline with HierarchicalPrune. One folder per stage inside --out; a stage whose "
        "output exists and matches its inputs is skipped, so an interrupted run continues where it stopped.",
    )
    p.add_argument("model", help="a pipeline folder, a cached Hub id, or a toy name (sd3, flux)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="fraction of the transformer's parameters to remove (default 0.3)")
    target.add_argument("--memory", type=parse_bytes, help="weight budget at --weight-dtype, e.g. 4GB")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--prompts", help="training prompts for data-free distillation, one a line (toys: built in)")
    p.add_argument("--quantize", choices=["nf4", "none"], help="quantise the result (default nf4)")
    p.add_argument("--no-distill", action="store_true", help="skip distillation (HPP alone)")
    p.add_argument("--config", help="an HPruneConfig JSON file (flags override it)")
    p.add_argument("--push", metavar="ORG/NAME", help="publish the result to the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", help="the base model's license id, for the card")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_compress)

    from .distillation.arguments import add_distill_arguments

    p = sub.add_parser(
        "distill",
        help="distil the pruned student from its teacher (PWP + SGDistill; Accelerate, resumable)",
        description="Stage 2 of HierarchicalPrune: the student is the teacher's transformer with the plan applied; "
        "it learns from the teacher's outputs and block features. Same options as examples/distill.py; run under "
        "`accelerate launch -m diffusers_hprune distill ...` for several processes.",
    )
    add_distill_arguments(p)
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "toy-train",
        help="train the embedded toy pipelines (VAE, then SD3 and FLUX in parallel; about an hour on 2 cores)",
    )
    p.add_argument("--out", default="build/toy", help="output folder (default build/toy)")
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget per transformer (default 55)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy_train)
    return parser


def _quiet_libraries() -> None:
    """Only the command's own progress: no per-file loading bars, no notices that do not concern the user.

    ``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY`` set by the user win.
    """
    import os

    import diffusers
    import transformers

    from ._quiet import quiet_third_party_notices

    quiet_third_party_notices()
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.utils.logging.set_verbosity_error()
    if "DIFFUSERS_VERBOSITY" not in os.environ:
        diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        code = args.func(args)
    except HPruneError as e:
        print(f"hprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    from .distributed import end_processes

    end_processes()  # under `accelerate launch`: every rank ends here, together
    return code


if __name__ == "__main__":
    sys.exit(main())
