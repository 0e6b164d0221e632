"""The ``hprune`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import HPruneError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inventory import format_inventory, inspect_transformer

    inventory = inspect_transformer(args.source)
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
    else:
        print(format_inventory(inventory, dtype=args.dtype))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import diffusers
    import transformers

    from .demo import format_summary, run_demo

    # The demo shows its own progress; Diffusers' per-file bars would bury it.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    try:
        summary = run_demo(args.out, families=args.family, steps=args.steps, overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"hprune demo: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .inventory import BUILTIN_CONFIGS, BYTES_PER_PARAM

    parser = argparse.ArgumentParser(
        prog="hprune",
        description="HierarchicalPrune for Diffusers SD3/SD3.5 and FLUX.1 transformers.",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-hprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect",
        help="table of blocks and components with parameter counts and bytes (no weights needed)",
        description="Print every block and component of a transformer with its parameter count and size, "
        "built on the meta device from the config alone.",
    )
    p.add_argument(
        "source",
        metavar="CONFIG_OR_FOLDER",
        help="a transformer config.json, a transformer or pipeline folder, a Hub repo id, or a built-in config: "
        + ", ".join(BUILTIN_CONFIGS),
    )
    p.add_argument("--dtype", choices=sorted(BYTES_PER_PARAM), default="bf16", help="weight dtype for sizes (default bf16)")
    p.add_argument("--json", action="store_true", help="print the inventory as JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "demo",
        help="run the flow on the embedded tiny SD3 and FLUX pipelines (CPU, seconds)",
        description="Prune the embedded tiny SD3 and FLUX pipelines with an example plan, save them, load them "
        "back with DiffusionPipeline.from_pretrained and draw samples.",
    )
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--family", nargs="+", choices=["sd3", "flux"], default=["sd3", "flux"], help="families to run")
    p.add_argument("--steps", type=int, default=4, help="denoising steps for the samples (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HPruneError as e:
        print(f"hprune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
