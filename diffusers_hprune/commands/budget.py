"""``hprune budget``: predicted peak GPU memory and host RAM of every stage, and which cards it fits (no weights needed)."""

from __future__ import annotations

import argparse
import json

from diffusers_hprune.architecture.inventory import builtin_configs
from diffusers_hprune.budget import CARDS_GIB, Budget, BudgetError, BudgetOptions, predict
from diffusers_hprune.budget.fit import StageFit, fit_stage
from diffusers_hprune.budget.terms import GIB
from diffusers_hprune.commands.options import card_memory, ratio
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.checks import nonnegative_int, positive_int
from diffusers_hprune.utils.distributed import PRECISIONS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "budget",
        help="predicted peak GPU memory and host RAM per stage, and which of 24/48/80 GB cards each fits",
        description="Predict, before loading any weight, the peak accelerator memory and host RAM of analysis, "
        "distillation, quantisation and inference of the result, from the model's config and the plan. "
        "Activations are traced through the real modules on the meta device. Docs: docs/budget.md.",
    )
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="a built-in config (" + ", ".join(builtin_configs()) + "), a toy (sd3, flux, sd3-deep, flux-deep), a pipeline or "
                   "transformer folder, a config.json, or a Hub repo id in the local cache")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=ratio, default=None,
                        help="plan this fraction of the transformer's parameters away (from a synthetic analysis; "
                        "default 0.3)")
    target.add_argument("--plan", default=None, help="a plan.json from `hprune plan`")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the stages run on (default cuda)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="analysis and training resolution (default: the model's, 1024 for SD3.5 and FLUX.1)")
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="processes of `accelerate launch` (DDP; default 1)")
    d = p.add_argument_group("distillation (the flags of `hprune distill`)")
    d.add_argument("--mixed-precision", choices=PRECISIONS, default="bf16",
                   help="weight dtype of teacher and frozen student parts (default bf16; `distill` takes the launch "
                   "config's, else no)")
    d.add_argument("--train-batch-size", type=positive_int, default=4,
                   help="samples per micro-step and process (default 4)")
    d.add_argument("--lora-rank", type=nonnegative_int, default=0,
                   help="train LoRA adapters of this rank (default 0: full weights)")
    d.add_argument("--teacher-4bit", action="store_true", help="the teacher in NF4")
    d.add_argument("--use-8bit-adam", action="store_true", help="8-bit AdamW (bitsandbytes)")
    d.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    d.add_argument("--no-pwp", dest="pwp", action="store_false", help="train the blocks before the first pruned one")
    d.add_argument("--train-samples", type=positive_int, default=1000,
                   help="training samples drawn by the teacher into the data cache (default 1000)")
    d.add_argument("--validation-prompts", type=nonnegative_int, default=0,
                   help="`distill --validation_steps`: the prompts the student draws between steps (default 0: none)")
    a = p.add_argument_group("analysis (the flags of `hprune analyze`)")
    a.add_argument("--n-prompts", type=positive_int, default=8, help="calibration prompts (default 8)")
    a.add_argument("--batch-size", type=positive_int, default=8, help="calibration batch (default 8)")
    a.add_argument("--eval-steps", type=positive_int, default=4, help="denoising steps cached and compared (default 4)")
    a.add_argument("--cache-device", choices=("cpu",), default=None,
                   help="keep the block-output cache in host memory (default: beside the model)")
    a.add_argument("--vae-tiling", action="store_true",
                   help="the analysis and the evaluation decode each image in tiles (a quarter of the decode memory)")
    e = p.add_argument_group("evaluation (the flags of `hprune evaluate`, compress's last stage)")
    e.add_argument("--eval-batch-size", type=positive_int, default=8,
                   help="prompts per pipeline call (`hprune evaluate --batch-size`; default 8)")
    e.add_argument("--no-quantize", dest="quantize", action="store_false",
                   help="the evaluated student is 16-bit (`hprune compress --quantize none`), not NF4")
    p.add_argument("--gpu-memory", type=card_memory, metavar="SIZE",
                   help="a GPU's memory (e.g. 24GB, read as GiB like the card's label): for every stage, the flags of "
                   "its command with which it fits that GPU, and its peak with them")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (bytes per stage and term)")
    p.set_defaults(func=run)


def options_from(args: argparse.Namespace) -> BudgetOptions:
    return BudgetOptions(
        device=args.device, resolution=args.resolution, mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size, lora_rank=args.lora_rank, teacher_4bit=args.teacher_4bit,
        use_8bit_adam=args.use_8bit_adam, gradient_checkpointing=args.gradient_checkpointing, pwp=args.pwp,
        train_samples=args.train_samples, num_processes=args.num_processes, analysis_prompts=args.n_prompts,
        analysis_batch_size=args.batch_size, eval_steps=args.eval_steps, cache_device=args.cache_device,
        validation=args.validation_prompts > 0, validation_prompts=max(args.validation_prompts, 1),
        vae_tiling=args.vae_tiling, eval_batch_size=args.eval_batch_size, quantize=args.quantize,
    )


def format_budget(budget: Budget) -> str:
    """The budget as the table ``hprune budget`` prints: one line per stage, its terms below it."""
    device = "GPU" if budget.options.device == "cuda" else "CPU"
    lines = [f"{budget.model} ({budget.profile}); plan: {budget.plan}",
             f"removes {budget.removed_fraction:.1%} of the transformer's parameters", *budget.notes, ""]
    cards = " ".join(f"{g:>3} GB" for g in CARDS_GIB)
    lines.append(f"{'stage':34} {device + ' peak':>10} {'host RAM':>10}   fits: {cards}")
    for s in budget.stages:
        fits = " ".join(f"{'yes' if ok else 'no':>6}" for ok in s.fits().values()) if device == "GPU" else ""
        lines.append(f"{s.stage:34} {s.device_peak / GIB:>6.2f} GiB {s.host_peak / GIB:>6.2f} GiB   {fits}")
        for k, v in s.device.items():
            lines.append(f"    {device}: {k}: {v / GIB:.2f} GiB")
        for k, v in s.host.items():
            lines.append(f"    host: {k}: {v / GIB:.2f} GiB")
        lines += [f"    ({n})" for n in s.notes]
    if device == "GPU":
        lines.append("A card fits a stage when the peak plus 1 GiB (CUDA context, allocator slack) is within its memory.")
    return "\n".join(lines)


def stage_fits(args: argparse.Namespace, budget: Budget, plan) -> list[StageFit]:
    """Every stage of ``budget`` fitted to ``--gpu-memory``: its command's flags with which it fits."""
    return [fit_stage(s.stage, args.model, plan, budget.options, capacity=args.gpu_memory, ratio=args.ratio)
            for s in budget.stages]


def format_fits(fits: list[StageFit]) -> str:
    """The stages' flags for one GPU, as ``hprune budget --gpu-memory`` prints them."""
    capacity = fits[0].capacity
    lines = ["", f"On one GPU with {capacity / GIB:.1f} GiB (peak plus 1 GiB within it), each stage's command needs:"]
    for fit in fits:
        flags = " ".join(fit.flags) if fit.flags else "nothing more"
        verdict = "fits" if fit.fits else "does NOT fit even so"
        lines.append(f"  {fit.stage:34} {flags}: {fit.device_peak / GIB:.2f} GiB, {verdict}")
    if not all(f.fits for f in fits):
        lines.append("A stage that does not fit needs a larger GPU, a smaller plan or resolution, or (analysis) fewer "
                     "prompts per batch; `hprune budget` with those flags shows every term.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    plan = PrunePlan.load(args.plan) if args.plan else None
    if args.gpu_memory is not None and args.device != "cuda":
        raise BudgetError("--gpu-memory fits the stages to a GPU: use it with --device cuda (the default).")
    budget = predict(args.model, plan, ratio=args.ratio, options=options_from(args))
    fits = stage_fits(args, budget, plan) if args.gpu_memory is not None else None
    if args.json:
        out = budget.to_dict()
        if fits is not None:
            out["gpu_memory"] = {"capacity": args.gpu_memory, "stages": {f.stage: f.to_dict() for f in fits}}
        print(json.dumps(out, indent=2))
    else:
        print(format_budget(budget) + (format_fits(fits) if fits is not None else ""))
    return 0
