"""``hprune toy-train``: train the embedded toy pipelines."""

from __future__ import annotations

import argparse

from diffusers_hprune.toy.train import train_all
from diffusers_hprune.utils.checks import check_output_folder, nonnegative_int, positive_float


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "toy-train",
        help="train the embedded toy pipelines (VAE, then SD3 and FLUX in parallel; about an hour on 2 cores)",
    )
    p.add_argument("--out", default="build/toy", help="output folder (default build/toy)")
    p.add_argument("--minutes", type=positive_float, default=55.0,
                   help="wall-clock budget per transformer (default 55)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed, 0 or more (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    paths = train_all(args.out, minutes=args.minutes, seed=args.seed)
    print(f"trained: {', '.join(str(p) for p in paths.values())}")
    print("to ship them, copy the sd3 and flux folders to diffusers_hprune/toy/models/")
    return 0
