"""``hprune report``: plots and a table of an analysis, with a plan marked."""

from __future__ import annotations

import argparse

from diffusers_hprune.contributions import ContributionReport
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning.report import format_table, write_report
from diffusers_hprune.utils.checks import check_output_folder, finite_float


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="plots and a table of an analysis, with a plan marked",
        description="Bar charts and heatmaps of dP per block and component (paper Figs. 4, 8, 9), the "
        "similarity per block, and a text table; with --plan, what it removes is marked.",
    )
    p.add_argument("analysis", help="an analysis.json from `hprune analyze`")
    p.add_argument("--plan", help="a plan.json to mark")
    p.add_argument("--alpha", type=finite_float, help="alpha for the Score panel (default: the family's)")
    p.add_argument("--out", required=True, help="folder for blocks.png, components.png, similarity.png, table.txt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    report = ContributionReport.load(args.analysis)
    plan = PrunePlan.load(args.plan) if args.plan else None
    if plan is not None:
        plan = report.model_family.check_plan(plan, report.transformer_config)
    paths = write_report(report, args.out, plan, alpha=args.alpha)
    print(format_table(report, plan, args.alpha))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
