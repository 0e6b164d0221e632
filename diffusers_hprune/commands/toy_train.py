"""``hprune toy-train``: train the embedded toy pipelines."""

from __future__ import annotations

import argparse

from diffusers_hprune.toy import NAMES
from diffusers_hprune.toy.train import train_all
from diffusers_hprune.utils.checks import check_output_folder, nonnegative_int, positive_float


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "toy-train",
        help="train the embedded toy pipelines (VAE, then SD3 and FLUX in parallel; about an hour on 2 cores); "
             "resumable",
    )
    p.add_argument("--out", default="build/toy", help="output folder (default build/toy)")
    p.add_argument("--toys", nargs="+", choices=NAMES, default=["sd3", "flux"],
                   help="which toys to train, all at once (default sd3 flux; the deep toys sd3-deep and flux-deep "
                        "take the shipped toys' VAE and text encoders)")
    p.add_argument("--minutes", type=positive_float, default=55.0,
                   help="wall-clock budget of this run per transformer (default 55); running the same command again "
                        "continues each toy from its state in OUT/NAME.state")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed, 0 or more (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    toys = list(dict.fromkeys(args.toys))
    paths = train_all(args.out, minutes=args.minutes, seed=args.seed, toys=toys)
    print(f"trained: {', '.join(str(p) for p in paths.values())}")
    print(f"to ship them, copy the {', '.join(toys)} folders to diffusers_hprune/toy/models/ "
          "(run the same command again to train them further)")
    return 0
