"""``hprune evaluate``: quality, memory and latency of a pipeline, or of a student next to its teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_hprune import toy
from diffusers_hprune.analysis.runner import DEFAULT_PROMPTS
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.budget import BudgetOptions
from diffusers_hprune.budget.fit import check_fits
from diffusers_hprune.commands.options import add_generation_flags, metric_args
from diffusers_hprune.distillation.data import read_prompts
from diffusers_hprune.evaluation.compare import (
    FIDELITY,
    evaluate_pipelines,
    load_for_evaluation,
    load_student,
    overall_score,
)
from diffusers_hprune.loading import check_image_size, is_toy, pixel_multiple
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.checks import InputError, check_apart, check_output_file, nonnegative_int, positive_int
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json
from diffusers_hprune.utils.quant_config import quantization_method


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="quality, memory and latency of a pipeline, or of a student next to its teacher",
        description="Draw the same prompts with the same seeds with every pipeline; score them with the metrics "
        "asked for (default: ShapeEval on the toys; fidelity = PSNR/SSIM of the student's images against the "
        "teacher's), and measure the transformer's parameters, weight bytes, the peak memory and the latency of one "
        "denoising step (warm-up, then the median of --latency-repeats steps).",
    )
    p.add_argument("model", help="the pipeline (the teacher when STUDENT is given): a folder, a cached Hub id, or a "
                   "toy name (sd3, flux, sd3-deep, flux-deep)")
    p.add_argument("student", nargs="?", help="a student pipeline to compare with MODEL")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="a metric of the registry (fidelity, shapeeval, clip_score, hpsv2, ...); repeat for several")
    p.add_argument("--metric-arg", action="append", metavar="[METRIC:]KEY=VALUE", help="an option of a metric")
    p.add_argument("--prompts", help="a text file, one prompt a line (default: the toy's held-out prompts)")
    p.add_argument("--n", type=positive_int, help="number of prompts (default 200 on the toys, 8 otherwise)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout", help="toy prompt split")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="prompt k uses seed SEED+k (default 0)")
    add_generation_flags(p, steps_help="denoising steps (default: the model's generation profile)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--latency-repeats", type=positive_int, default=10, help="timed denoising steps (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--no-cost", action="store_true", help="skip the memory and latency measurements")
    p.add_argument("--no-budget-check", dest="budget_check", action="store_false",
                   help="on a GPU, start even when `hprune budget` predicts the evaluation will not fit its memory")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode every image in 512 px tiles (a quarter of a 1024 px decode's memory; the images differ "
                   "a little from whole decodes, the same way for every pipeline)")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--grid", help="write a PNG grid here: one row per pipeline, one column per prompt")
    p.add_argument("--grid-size", type=positive_int, default=16, help="prompts in the grid (default 16)")
    p.set_defaults(func=run)


GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_fits(args: argparse.Namespace) -> None:
    """A student beside its original teacher: stop before loading when `hprune budget`'s evaluation stage would not
    fit this GPU, naming the flags (`--batch-size 1`, `--vae-tiling`) with which it would. Anything else (one
    pipeline, an unreadable config: the loading says what is wrong) is not checked."""
    if not args.student:
        return
    try:
        student, teacher = load_transformer_config(args.student), load_transformer_config(
            toy.model_path(args.model) if args.model in toy.NAMES else args.model)
    except (HPruneError, OSError, ValueError):
        return
    if not student.get("prune_plan") or teacher.get("prune_plan"):
        return
    options = BudgetOptions(eval_batch_size=args.batch_size, vae_tiling=args.vae_tiling, resolution=args.height,
                            quantize=quantization_method(student) == "nf4")  # torchao's int8: as 16-bit, an upper bound
    check_fits("evaluation", args.model, PrunePlan.from_dict(student["prune_plan"]), options)


def run(args: argparse.Namespace) -> int:
    inputs = ((args.model, "MODEL"), (args.student, "STUDENT"), (args.prompts, "--prompts"))
    for path, flag in ((args.out, "--out"), (args.grid, "--grid")):  # before the work, not after it
        if path:
            check_output_file(path, flag)
            check_apart(path, flag, *inputs)
    if args.grid and Path(args.grid).suffix.lower() not in GRID_SUFFIXES:  # PIL picks the format by it, after the work
        raise InputError(f"--grid {args.grid}: the file name must end in {', '.join(GRID_SUFFIXES)} (the image format "
                         "is taken from it); e.g. --grid grid.png.")
    if args.out and args.grid:  # one would overwrite the other
        if Path(args.grid).resolve() == Path(args.out).resolve():
            raise InputError(f"--out and --grid are the same file ({args.out}); give each its own path.")
    check_image_size(args.height, args.width, pixel_multiple(args.model), args.model)
    if args.budget_check:  # before any weight is loaded (a no-op without CUDA)
        _check_fits(args)
    reference = load_for_evaluation(args.model)
    models = {"teacher" if args.student else "model": reference}
    if args.student:  # loaded when its turn comes, beside the teacher's encoders when they are the same files
        models["student"] = lambda: load_student(reference, args.model, args.student)
    toy_model = is_toy(reference) is not None or args.model in toy.NAMES
    if args.prompts:
        prompt_list = read_prompts(args.prompts)[: args.n] if args.n else read_prompts(args.prompts)
    elif toy_model:
        prompt_list = toy.prompts(split=args.split, n=args.n or 200, seed=args.seed)
    else:
        prompt_list = [DEFAULT_PROMPTS[k % len(DEFAULT_PROMPTS)] for k in range(args.n or 8)]
    metrics = args.metric or ([FIDELITY] if args.student else []) + (["shapeeval"] if toy_model else [])
    if "shapeeval" in metrics and args.prompts:  # before any drawing, not after all of it
        toy.check_prompts(prompt_list, args.prompts)
    result = evaluate_pipelines(
        models, prompt_list, seed=args.seed, metrics=metrics, metric_options=_evaluate_metric_args(args.metric_arg,
                                                                                                    metrics),
        num_inference_steps=args.steps, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, cost=not args.no_cost, latency_repeats=args.latency_repeats, warmup=args.warmup,
        grid=args.grid, grid_size=args.grid_size, vae_tiling=args.vae_tiling,
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
        for key, value in metric_args([rest]).items():
            for metric in [target] if target else [m for m in metrics if m != "fidelity"]:
                options.setdefault(metric, {})[key] = value
    return options


def format_evaluation(result: dict) -> str:
    """The table ``hprune evaluate`` prints."""

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
        add("step FLOPs", [f"{e['step_flops'] / 1e9:.3g} G" if e.get("step_flops") else "-" for e in entries])
        add("weights", [e.get("weights", "-") for e in entries])
    for metric in entries[0]["metrics"]:
        values = [e["metrics"][metric] for e in entries]
        add(metric, [f"{overall_score(v):.4g}" for v in values])
    if any("fidelity" in e for e in entries[1:]):
        def fidelity(e):
            f = e.get("fidelity")
            return "-" if f is None else (f"PSNR {f['psnr_db']:.2f} dB"
                                          + (f", SSIM {f['ssim']:.3f}" if f["ssim"] is not None else ""))
        rows.append(["fidelity to " + names[0], "-", *(fidelity(e) for e in entries[1:])])
    header = ["", *names]
    keys = {"parameters": "params", "weight bytes": "weight_bytes", "step peak bytes": "step_peak_bytes",
            "step latency": "latency", "step FLOPs": "flop_bound"}
    for name, entry in zip(names[1:], entries[1:]):  # each model against the first
        header.append(f"{name} / {names[0]}")
        rel = entry.get("relative", {})
        for row in rows:
            key = keys.get(row[0], row[0])
            row.append(f"{rel[key]:.1%}" if key in rel else "")
            if row[0] == "step latency" and "flop_bound" in rel:
                row[-1] += f" (FLOP bound {rel['flop_bound']:.1%})"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append(f"{len(result['prompts'])} prompts, seeds {result['seed']}.., generation {result['generation']}")
    if "device" in result:
        lines.append(f"measured on {result['device']}; FLOP bound: the latency share the FLOP reduction alone would "
                     "give (FLOPs of one step, attention included)")
    if "grid" in result:
        lines.append(f"grid ({' | '.join(names)}, one row each): {result['grid']}")
    return "\n".join(lines)
