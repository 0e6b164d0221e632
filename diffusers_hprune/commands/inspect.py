"""``hprune inspect``: the blocks and components of a transformer with their sizes, from its config alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_hprune.architecture.inventory import builtin_configs, format_inventory, inspect_transformer
from diffusers_hprune.architecture.sizes import DTYPES
from diffusers_hprune.hub.folders import folder_format, folder_plan


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="table of blocks and components with parameter counts and bytes (no weights needed)",
        description="Print every block and component of a transformer with its parameter count and size, "
        "built on the meta device from the config alone.",
    )
    p.add_argument(
        "source",
        metavar="CONFIG_OR_FOLDER",
        help="a transformer config.json, a transformer or pipeline folder, a Hub repo id, or a built-in config: "
        + ", ".join(builtin_configs()),
    )
    p.add_argument("--dtype", choices=DTYPES,
                   help="weight dtype for sizes (default: nf4 for a 4-bit folder, else bf16; nf4 = 4-bit weights "
                   "with double quantisation)")
    p.add_argument("--json", action="store_true", help="print the inventory as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = args.source
    folder = Path(source)
    if folder.is_dir() and folder_format(folder) == "stock":
        # a stock export holds the kept blocks renumbered; its side file has the original model and the plan
        config, plan = folder_plan(folder)
        source = {**config, "prune_plan": plan.to_dict()}
    inventory = inspect_transformer(source)
    inventory.name = str(args.source)
    if args.json:
        print(json.dumps(inventory.to_dict(), indent=2))
    else:
        quantized = (inventory.config.get("quantization_config") or {}).get("load_in_4bit")
        print(format_inventory(inventory, dtype=args.dtype or ("nf4" if quantized else "bf16")))
    return 0
