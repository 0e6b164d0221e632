"""``hprune analyze``: contribution analysis (step 1), resumable and shardable."""

from __future__ import annotations

import argparse
from dataclasses import replace

import diffusers
import torch

from diffusers_hprune import toy
from diffusers_hprune.analysis.runner import analyze
from diffusers_hprune.analysis.synthetic import synthetic_report
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.budget import BudgetOptions
from diffusers_hprune.budget.fit import cache_placement, check_fits
from diffusers_hprune.commands.options import add_generation_flags, metric_args, open_fraction, parse_bytes, ratio
from diffusers_hprune.loading import check_image_size, pixel_multiple
from diffusers_hprune.metrics import DEFAULT_METRIC, metric_names
from diffusers_hprune.planning.decisions import DEFAULT_RATIOS, PlanDecisions
from diffusers_hprune.utils.checks import (
    InputError,
    check_apart,
    check_output_file,
    nonnegative_int,
    positive_int,
    prompt_lines,
    read_text_file,
)
from diffusers_hprune.utils.distributed import process_state


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="measure dP for every block and component (contribution analysis; resumable, shardable)",
        description="Contribution analysis (DESIGN.md section 6, step 1): dP(i, c) = P(original) - P(without "
        "component c of block i) for every block and component, on calibration prompts with fixed seeds. "
        "Each finished entry is saved as it completes (OUT.parts/); run the same command again to resume. "
        "Under `accelerate launch --num_processes N` the entries are split across processes.",
    )
    p.add_argument("model", help="a pipeline folder or Hub repo id (SD3/SD3.5/FLUX.1), or a toy name (sd3, flux, sd3-deep, flux-deep); "
                   "with --synthetic: a config (built-in name, config.json, folder)")
    p.add_argument("--out", required=True, help="the analysis.json to write (and resume from)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"quality metric P, one of {', '.join(metric_names())} "
                   f"(default {DEFAULT_METRIC}: the final images against the full model's, same noise; velocity: the "
                   "predicted velocity at --eval-steps steps, a faster proxy; docs/removal.md compares them)")
    p.add_argument("--metric-arg", action="append", metavar="KEY=VALUE",
                   help="an option of the metric, e.g. model=PATH for clip_score, measure=ssim for image_fidelity "
                   "(repeatable)")
    p.add_argument("--alignment-metric", metavar="NAME",
                   help="also measure each whole block's dP with a text-image alignment score (what --strategy bk-sdm "
                   "ranks by): shapeeval, clip_score, or auto (ShapeEval on the toys, CLIP score elsewhere)")
    p.add_argument("--alignment-metric-arg", action="append", metavar="KEY=VALUE",
                   help="an option of the alignment metric, e.g. model=PATH for clip_score (repeatable)")
    p.add_argument("--prompts", help="calibration prompts, one a line (default: toy training prompts for the toys, "
                   "a built-in varied list otherwise)")
    p.add_argument("--n-prompts", type=positive_int, default=8, help="how many default prompts (default 8)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="image k uses seed SEED+k (default 0)")
    add_generation_flags(p, steps_help="denoising steps of the calibration images (default: the model's generation "
                         "profile, docs/api.md)")
    p.add_argument("--eval-steps", type=positive_int, default=4,
                   help="denoising steps whose block outputs are cached and, with --metric velocity, compared "
                   "(default 4, spread evenly)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--pairs", action="store_true", help="also remove every pair of components of a block together")
    p.add_argument("--method", choices=["cached", "naive", "scratch"], default="cached",
                   help="cached (default): ablations run from cached block outputs; naive: the whole ablated model "
                   "runs per entry; scratch: the full model's outputs are recomputed per entry too (same numbers, "
                   "slower; for verification and benchmarks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--cache-device", help="where cached block outputs live: 'cpu' (host memory), or the model's "
                   "device; default: the model's device where `hprune budget` says the analysis fits this GPU with "
                   "them there, else 'cpu' (said when chosen)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode every image in 512 px tiles: a quarter of a 1024 px decode's memory, for a model that "
                   "barely fits the GPU (FLUX.1-schnell on 24 GB); the images differ a little, so it is another "
                   "analysis")
    p.add_argument("--max-cache-bytes", type=parse_bytes, metavar="SIZE",
                   help="refuse a block-output cache above SIZE (e.g. 20GB), before it is built (default: no bound)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUT (and its OUT.parts/) of other settings or a damaged one; finished "
                   "entries of the same settings are still reused")
    p.add_argument("--no-budget-check", dest="budget_check", action="store_false",
                   help="on a GPU, start even when `hprune budget` predicts the analysis will not fit its memory")
    p.add_argument("--component-images", type=positive_int, metavar="N",
                   help="measure component (and pair) entries on the first N calibration images only, a multiple of "
                   "--batch-size (the paper: 80 of its 400); whole blocks use every image (default: all; image "
                   "metrics)")
    p.add_argument("--images", choices=["all", "auto"], default="all",
                   help="calibration images per entry: all (default: the paper's protocol), or auto: --min-images "
                   "each, then more, batch by batch, only for the entries whose dP could still change the plan at "
                   "--plan-ratios (an adaptive analysis, docs/removal.md; image metrics only)")
    p.add_argument("--plan-ratios", type=ratio, nargs="+", metavar="R",
                   help="with --images auto: the ratios whose hierarchical plans decide where images go (default "
                   f"{' '.join(str(r) for r in DEFAULT_RATIOS)})")
    p.add_argument("--min-images", type=positive_int, metavar="N",
                   help="with --images auto: images every entry gets first (default: --batch-size; at least 2)")
    p.add_argument("--confidence", type=open_fraction,
                   help="with --images auto: the confidence of the interval kept around each dP (default 0.95)")
    p.add_argument("--synthetic", action="store_true",
                   help="write a made-up analysis shaped like the paper's from the config alone (no weights), for "
                   "planning and memory estimates")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")  # the analysis.json, and OUT.parts/ beside it
    check_apart(args.out, "--out", (args.model, "MODEL"), (args.prompts, "--prompts"))
    if args.synthetic:
        report = synthetic_report(args.model, seed=args.seed, pairs=args.pairs)
        report.save(args.out)
        print(f"wrote a SYNTHETIC analysis of {args.model} (no weights, no measurement) to {args.out}")
        return 0

    stopping = _stopping_rule(args)
    diffusers.utils.logging.disable_progress_bar()
    prompts = None
    if args.prompts:
        text = read_text_file(args.prompts, "prompt file (one prompt a line)")
        prompts = prompt_lines(text, args.prompts)
        if "shapeeval" in (args.metric, args.alignment_metric) or (
                args.alignment_metric == "auto" and args.model in toy.NAMES):  # before any work, not at the end
            toy.check_prompts(prompts, args.prompts)
    check_image_size(args.height, args.width, pixel_multiple(args.model), args.model)  # before any weight is loaded
    options = BudgetOptions(analysis_prompts=len(prompts) if prompts else args.n_prompts,
                            analysis_batch_size=args.batch_size, eval_steps=args.eval_steps, steps=args.steps,
                            cache_device="cpu" if args.cache_device == "cpu" else None, resolution=args.height,
                            vae_tiling=args.vae_tiling)
    if args.cache_device is None and args.dtype in (None, "bfloat16"):  # chosen by the budget (no-op without CUDA)
        args.cache_device = cache_placement(args.model, options)
        if args.cache_device == "cpu":
            options = replace(options, cache_device="cpu")
            print("block-output cache: in host memory (`hprune budget`: beside the model the analysis would not fit "
                  "this GPU); --cache-device cuda keeps it there anyway")
    if args.budget_check and args.dtype in (None, "bfloat16"):  # before any weight is loaded (no-op without CUDA)
        check_fits("analysis", args.model, options=options)
    report = analyze(
        args.model, args.out, metric=args.metric, metric_options=metric_args(args.metric_arg), prompts=prompts,
        alignment_metric=args.alignment_metric, alignment_options=metric_args(args.alignment_metric_arg),
        n_prompts=args.n_prompts, seed=args.seed, num_inference_steps=args.steps, eval_steps=args.eval_steps,
        height=args.height, width=args.width, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
        pairs=args.pairs, method=args.method, overwrite=args.overwrite,
        dtype=getattr(torch, args.dtype) if args.dtype else None, cache_device=args.cache_device,
        max_cache_bytes=args.max_cache_bytes, vae_tiling=args.vae_tiling, stopping=stopping,
        min_images=args.min_images, confidence=args.confidence or 0.95, component_images=args.component_images,
    )

    if process_state().is_main_process:
        run = report.run.get("this_process", report.run)
        print(f"analysed {report.model}: {len(report.entries)} entries ({run.get('reused_entries', 0)} reused from an "
              f"earlier run, {run.get('computed_entries', 0)} computed here), metric {report.metric['name']}, "
              f"P(original) = {report.baseline_score:.6g}")
        print(f"block evaluations: {report.run.get('block_evaluations')}, seconds: {report.run.get('seconds'):.1f}, "
              f"block-output cache: {run.get('cache_bytes', 0) / 1e6:.1f} MB")
        adaptive = report.run.get("adaptive")
        if adaptive:
            print(f"adaptive: {adaptive['images_used']:,} of {adaptive['images_full']:,} entry images "
                  f"({adaptive['images_used'] / adaptive['images_full']:.1%}) in {adaptive['rounds']} rounds, for the "
                  f"plans at {', '.join(f'{r:g}' for r in args.plan_ratios)}")
        print(f"wrote {args.out}")
    return 0


def _stopping_rule(args: argparse.Namespace) -> PlanDecisions | None:
    """The plans an adaptive analysis (``--images auto``) decides for; None for a full one, whose adaptive flags
    are refused (they would be ignored). ``--component-images`` checked against ``--batch-size`` first."""
    if args.component_images is not None and args.component_images % args.batch_size:  # before any weight loads
        raise InputError(f"--component-images must be a multiple of --batch-size {args.batch_size} (component entries "
                         f"are drawn in the full model's batches), got {args.component_images}.")
    given = [flag for flag, value in (("--plan-ratios", args.plan_ratios), ("--min-images", args.min_images),
                                      ("--confidence", args.confidence)) if value is not None]
    if args.images == "all":
        if given:
            raise InputError(f"{', '.join(given)} only steer an adaptive analysis; add --images auto, or drop them "
                             "(--images all measures every entry on every image).")
        return None
    args.plan_ratios = args.plan_ratios or list(DEFAULT_RATIOS)
    family = toy.name_of(str(args.model))
    return PlanDecisions(inspect_transformer(toy.model_path(family) if family else args.model), args.plan_ratios)
