"""``hprune plan``: Hierarchical Position Pruning (steps 2-4), from an analysis to a plan."""

from __future__ import annotations

import argparse

from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.architecture.sizes import DTYPES
from diffusers_hprune.commands.options import parse_bytes
from diffusers_hprune.contributions import AnalysisError, ContributionReport, describe_keys
from diffusers_hprune.planning.hpp import DEFAULT_R_THRES, make_plan
from diffusers_hprune.planning.strategies import strategy_names
from diffusers_hprune.utils.checks import check_apart, check_output_file, finite_float, fraction


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose what to remove from an analysis for a target ratio or memory budget (HPP)",
        description="Hierarchical Position Pruning (DESIGN.md section 6, steps 2-4): rank blocks and components by "
        "Score = -|dP| / W_pos and remove whole blocks, then (above --r-thres) components, until the target is met. "
        "Parameters are counted over the whole transformer.",
    )
    p.add_argument("analysis", help="an analysis.json from `hprune analyze`")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=finite_float,
                        help="fraction of the transformer's parameters to remove, in (0, 1)")
    target.add_argument("--memory", type=parse_bytes, help="weight budget, e.g. 4GB or 3.5GiB (at --weight-dtype)")
    p.add_argument("--weight-dtype", choices=DTYPES, default="bf16",
                   help="dtype the memory budget and estimate are for (default bf16; nf4 = 4-bit weights)")
    p.add_argument("--alpha", type=finite_float, help="position-weight exponent (default: 0.55 SD3 family, 0.01 FLUX)")
    p.add_argument("--r-thres", type=fraction, default=DEFAULT_R_THRES,
                   help=f"above this ratio components are removed after whole blocks (default {DEFAULT_R_THRES})")
    p.add_argument("--strategy", choices=strategy_names(), default="hierarchical",
                   help="hierarchical (the paper, default); baselines: bk-sdm (blocks by the drop of an alignment "
                   "score: analyse with --alignment-metric auto), koala (blocks by input/output similarity), last "
                   "(the last blocks). Whole-block plans take the block set nearest --ratio")
    p.add_argument("--out", required=True, help="the plan.json to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    check_apart(args.out, "--out", (args.analysis, "ANALYSIS"))  # the plan would replace the analysis
    report = ContributionReport.load(args.analysis)
    if not report.complete and args.strategy != "last":
        missing = report.missing_keys()
        what = f"it lacks {describe_keys(missing)}" if missing else "it has no baseline score"
        raise AnalysisError(
            f"{args.analysis} is incomplete ({len(report.expected_keys()) - len(missing)} of "
            f"{len(report.expected_keys())} entries; {what}); finish it with the same `hprune analyze` command (it "
            "resumes), or use --strategy last."
        )
    inventory = inspect_transformer(report.transformer_config)
    outcome = make_plan(
        report.contributions(), inventory, ratio=args.ratio, memory_bytes=args.memory, weight_dtype=args.weight_dtype,
        alpha=args.alpha, r_thres=args.r_thres, strategy=args.strategy, similarity=report.similarity,
        alignment=report.alignment_contributions(),
        metadata={"analysis": str(args.analysis), "analysis_metric": report.metric["name"], "model": report.model},
    )
    outcome.plan.save(args.out)
    print(outcome.summary())
    print("removed, in the order chosen: " + ", ".join(f"{i}:{c}" for i, c in outcome.order))
    print(f"wrote {args.out}")
    return 0
