"""``hprune compress``: the whole method in one command."""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

from diffusers_hprune.budget import BudgetError
from diffusers_hprune.budget.fit import cache_placement, check_fits, fit_stage
from diffusers_hprune.budget.terms import GIB
from diffusers_hprune.commands.options import add_config_flags, card_memory, config_overrides, parse_bytes, ratio
from diffusers_hprune.compression.config import HPruneConfig
from diffusers_hprune.compression.run import compress
from diffusers_hprune.distillation.data import read_prompts
from diffusers_hprune.hub.push import check_repo_id
from diffusers_hprune.utils.checks import check_apart, check_output_folder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="the whole method in one command: analyse, plan, prune, distil, quantise, evaluate, card (, push)",
        description="Compress a pipeline with HierarchicalPrune. One folder per stage inside --out; a stage whose "
        "output exists and matches its inputs is skipped, so an interrupted run continues where it stopped.",
    )
    p.add_argument("model", help="a pipeline folder, a cached Hub id, or a toy name (sd3, flux, sd3-deep, flux-deep)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=ratio, help="fraction of the transformer's parameters to remove (default 0.3)")
    target.add_argument("--memory", type=parse_bytes, help="weight budget at --weight-dtype, e.g. 4GB")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--prompts", help="training prompts for data-free distillation, one a line (toys: built in); "
                   "without --eval-prompts-file its last distinct lines are held out for the evaluation")
    p.add_argument("--eval-prompts-file", metavar="FILE", help="evaluation prompts, one a line, never trained on "
                   "(default: the toy's held-out prompts, or lines held out of --prompts); --eval-prompts N caps "
                   "how many are used")
    p.add_argument("--quantize", choices=["nf4", "none"], help="quantise the result (default nf4)")
    p.add_argument("--no-distill", action="store_true", help="skip distillation (HPP alone)")
    p.add_argument("--config", help="an HPruneConfig JSON file (flags override it)")
    p.add_argument("--push", metavar="ORG/NAME", help="publish the result to the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", help="the base model's license id, for the card")
    p.add_argument("--gpu-memory", type=card_memory, metavar="SIZE",
                   help="fit every stage to one GPU of SIZE (e.g. 24GB, read as GiB like the card's label): the flags "
                   "`hprune budget --gpu-memory` names for each stage are applied, and printed, before anything loads")
    p.add_argument("--no-budget-check", dest="budget_check", action="store_false",
                   help="on a GPU, start even when `hprune budget` predicts a stage will not fit its memory")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    check_apart(args.out, "--out", (args.model, "MODEL"), (args.prompts, "--prompts"),
                (args.eval_prompts_file, "--eval-prompts-file"), (args.config, "--config"))
    if args.push:
        check_repo_id(args.push)  # before hours of work, not after them
    values = asdict(HPruneConfig.load(args.config)) if args.config else {}
    values.update(config_overrides(args))
    prompts = None
    if args.prompts:
        prompts = read_prompts(args.prompts)
    eval_prompts = read_prompts(args.eval_prompts_file) if args.eval_prompts_file else None
    config = HPruneConfig(**values)
    placement = {}
    if args.gpu_memory is not None:  # before any weight is loaded
        config, placement = fitted_to_gpu(args.model, config, prompts, args.gpu_memory)
    analysis = replace(config.analysis_budget(), **{k: v for k, v in placement.items() if v is not None})
    if "cache_device" not in placement:  # chosen by the budget for this GPU (a no-op without CUDA)
        placement["cache_device"] = cache_placement(args.model, analysis)
        analysis = replace(analysis, cache_device=placement["cache_device"])
    if args.budget_check:  # before any weight is loaded (a no-op without CUDA)
        check_fits("analysis", args.model, options=analysis)
        if config.distill:
            check_fits("distillation", args.model, options=config.distillation_budget(prompts), ratio=config.ratio)
        check_fits("evaluation", args.model, options=config.evaluation_budget(), ratio=config.ratio)
    compress(args.model, args.out, config, prompts=prompts, eval_prompts=eval_prompts, push=args.push,
             private=args.private, license=args.license, cache_device=placement.get("cache_device"),
             analysis_batch_size=placement.get("analysis_batch_size") or 8)
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB // 10 else f"{nbytes / 2**20:.0f} MiB"


def fitted_to_gpu(model: str, config: HPruneConfig, prompts, capacity: int) -> tuple[HPruneConfig, dict]:
    """``config`` with the distillation flags, and the analysis's placement (``cache_device``,
    ``analysis_batch_size``), with which every stage of the run fits one GPU of ``capacity`` bytes; printed.
    A stage that does not fit even so is refused (``BudgetError``), naming what it would still need."""
    given = config
    stages = [("analysis", HPruneConfig.analysis_budget, None)]  # each with the flags the stages before it chose
    if config.distill:
        stages.append(("distillation", lambda c: c.distillation_budget(prompts), config.ratio))
    stages.append(("quantisation", HPruneConfig.analysis_budget, config.ratio))
    stages.append(("evaluation", HPruneConfig.evaluation_budget, config.ratio))
    print(f"fitting every stage to one GPU with {_size(capacity)} (--gpu-memory):")
    placement: dict = {}
    for stage, budget_of, target in stages:
        options = budget_of(config)
        fit = fit_stage(stage, model, None, options, capacity=capacity, ratio=target)
        print(f"  {stage}: {' '.join(fit.flags) or 'as configured'}: {fit.device_peak / GIB:.2f} GiB")
        if not fit.fits:
            raise BudgetError(f"The {stage} stage does not fit a GPU of {_size(capacity)} even with "
                              f"{' '.join(fit.flags) or 'its settings'}: it needs about {_size(fit.device_peak)} "
                              "plus 1 GiB of CUDA context. Use a larger GPU or a smaller resolution; `hprune "
                              "budget` shows every term.")
        changed = {k: getattr(fit.options, k) for k in ("cache_device", "analysis_batch_size", "mixed_precision",
                                                         "gradient_checkpointing", "train_batch_size",
                                                         "use_8bit_adam", "lora_rank", "teacher_4bit", "vae_tiling",
                                                         "eval_batch_size")
                   if getattr(fit.options, k) != getattr(options, k)}
        placement.update({k: v for k, v in changed.items() if k in ("cache_device", "analysis_batch_size")})
        config = replace(config, **{k: v for k, v in changed.items() if k not in placement})
    settings = {k: v for k, v in asdict(config).items() if v != asdict(given)[k]}
    if settings:  # as compress's own flags (the analysis's placement is compress's to choose: no flag)
        print("  compress runs with " + " ".join(f"--{k.replace('_', '-')} {str(v).lower() if isinstance(v, bool) else v}"
                                                  for k, v in settings.items()))
    return config, placement
