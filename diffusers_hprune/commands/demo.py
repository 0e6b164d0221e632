"""``hprune demo``: ``hprune compress`` on the embedded SD3 toy pipeline."""

from __future__ import annotations

import argparse
import sys

from diffusers_hprune.commands.options import add_config_flags, config_overrides, ratio
from diffusers_hprune.demo import DEMO_CONFIG, DemoFolderError, format_demo_summary, run_demo
from diffusers_hprune.utils.checks import check_output_folder


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="hprune compress on the embedded SD3 toy pipeline (CPU, about 7 minutes)",
        description="The whole method on the embedded toy StableDiffusion3Pipeline: analyse, plan (HPP, 30%%), "
        "prune, distil (PWP + SGDistill, 400 steps, at most 5 minutes), quantise (NF4), evaluate (ShapeEval of "
        "teacher and student, bytes, latency, sample grid) and write the model card. Every compress setting can be changed with its "
        "flag; a second run in the same folder continues where the first stopped.",
    )
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--ratio", type=ratio, help="fraction of the transformer's parameters to remove (default 0.3)")
    p.add_argument("--quantize", choices=["nf4", "none"], help="quantise the result (default nf4)")
    p.add_argument("--no-distill", action="store_true", help="skip distillation (HPP alone)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run's output folder first and start over (a folder holding anything else is refused)")

    add_config_flags(p, defaults=DEMO_CONFIG)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    overrides = config_overrides(args)
    try:
        summary = run_demo(args.out, overrides=overrides, overwrite=args.overwrite)
    except DemoFolderError as e:
        print(f"hprune demo: error: {e}", file=sys.stderr)
        return 2
    print(format_demo_summary(summary))
    return 0
