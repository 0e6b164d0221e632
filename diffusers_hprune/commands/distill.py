"""``hprune distill``: stage 2, the student learns from its teacher (PWP + SGDistill)."""

from __future__ import annotations

import argparse

from diffusers_hprune.budget.fit import check_fits, distill_options
from diffusers_hprune.distillation.arguments import add_distill_arguments, config_from_args
from diffusers_hprune.distillation.trainer import distill
from diffusers_hprune.plan import PrunePlan


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil the pruned student from its teacher (PWP + SGDistill; Accelerate, resumable)",
        description="Stage 2 of HierarchicalPrune: the student is the teacher's transformer with the plan applied; "
        "it learns from the teacher's outputs and block features. Same options as examples/distill.py; run under "
        "`accelerate launch -m diffusers_hprune distill ...` for several processes.",
    )
    add_distill_arguments(p)
    p.add_argument("--no-budget-check", dest="budget_check", action="store_false",
                   help="on a GPU, start even when `hprune budget` predicts the run will not fit its memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.check()  # values a run cannot use: refused before the budget check reads the plan and the teacher
    if args.budget_check:  # before any weight is loaded (a no-op without CUDA)
        check_fits("distillation", config.teacher, PrunePlan.load(config.plan), distill_options(config))
    distill(config)
    return 0
