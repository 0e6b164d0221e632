"""The ``hprune`` command line."""

from __future__ import annotations

import argparse
import json
import sys

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
    import diffusers
    import transformers

    from .demo import format_summary, run_demo

    # The demo shows its own progress; Diffusers' per-file bars would bury it.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    try:
        summary = run_demo(args.out, families=args.family, n_prompts=args.prompts, overwrite=args.overwrite,
                           ratio=args.ratio)
    except FileExistsError as e:
        print(f"hprune demo: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    return 0


def _cmd_toy_train(args: argparse.Namespace) -> int:
    from .toy.train import train_all

    paths = train_all(args.out, minutes=args.minutes, seed=args.seed)
    print(f"trained: {', '.join(str(p) for p in paths.values())}")
    print("to ship them, copy the sd3 and flux folders to diffusers_hprune/toy/models/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import diffusers

    from . import toy
    from .fileio import atomic_write_json

    diffusers.utils.logging.disable_progress_bar()
    pipe = toy.load_pipeline(args.model)
    prompt_list = toy.prompts(split=args.split, n=args.n, seed=args.seed)
    images = toy.generate(pipe, prompt_list, seed=args.seed)
    result = {"model": str(args.model), "metric": args.metric, "split": args.split, "n": args.n, "seed": args.seed}
    result.update(toy.shapeeval(images, prompt_list))
    if args.grid:
        toy.save_grid(images[: args.grid_size], args.grid)
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


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
            raise HPruneError(f"Cannot read the prompt file {args.prompts} ({e}); give a text file, one prompt a line.")
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
        help="run the flow on the embedded toy SD3 and FLUX pipelines (CPU, about a minute)",
        description="Draw and score (ShapeEval) the embedded toy SD3 and FLUX pipelines, analyse the contribution "
        "of every block and component, plan with HPP, prune, save, load back with "
        "DiffusionPipeline.from_pretrained and score again.",
    )
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--family", nargs="+", choices=["sd3", "flux"], default=["sd3", "flux"], help="families to run")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts to draw and score (default 24)")
    p.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of the transformer's parameters the HPP plan removes (default 0.2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "evaluate",
        help="score a pipeline's prompt adherence (ShapeEval on the toy prompts)",
        description="Generate one image per held-out toy prompt and score them with ShapeEval "
        "(overall, per category, per attribute).",
    )
    p.add_argument("model", help="a toy name (sd3, flux) or a pipeline folder trained on the toy shapes")
    p.add_argument("--metric", choices=["shapeeval"], default="shapeeval", help="metric (default shapeeval)")
    p.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--grid", help="write a PNG grid of the first images here")
    p.add_argument("--grid-size", type=int, default=32, help="images in the grid (default 32)")
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
        return args.func(args)
    except HPruneError as e:
        print(f"hprune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
