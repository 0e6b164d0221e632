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
