"""``hprune compress``: the whole method in one command."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from diffusers_hprune.budget.fit import check_fits
from diffusers_hprune.commands.options import add_config_flags, config_overrides, parse_bytes, ratio
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
    p.add_argument("model", help="a pipeline folder, a cached Hub id, or a toy name (sd3, flux)")
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
    if args.budget_check:  # before any weight is loaded (a no-op without CUDA)
        check_fits("analysis", args.model, options=config.analysis_budget())
        if config.distill:
            check_fits("distillation", args.model, options=config.distillation_budget(prompts), ratio=config.ratio)
    compress(args.model, args.out, config, prompts=prompts, eval_prompts=eval_prompts, push=args.push,
             private=args.private, license=args.license)
    return 0
