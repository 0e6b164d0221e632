"""``hprune distill``: stage 2, the student learns from its teacher (PWP + SGDistill)."""

from __future__ import annotations

import argparse

from diffusers_hprune.distillation.arguments import add_distill_arguments, config_from_args
from diffusers_hprune.distillation.trainer import distill


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil the pruned student from its teacher (PWP + SGDistill; Accelerate, resumable)",
        description="Stage 2 of HierarchicalPrune: the student is the teacher's transformer with the plan applied; "
        "it learns from the teacher's outputs and block features. Same options as examples/distill.py; run under "
        "`accelerate launch -m diffusers_hprune distill ...` for several processes.",
    )
    add_distill_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    distill(config_from_args(args))
    return 0
