"""``hprune convert-lora``: a LoRA for the base model, renumbered for a stock export."""

from __future__ import annotations

import argparse

from diffusers_hprune.hub.export import convert_lora_for_export
from diffusers_hprune.utils.checks import check_apart, check_output_file


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-lora",
        help="renumber a LoRA made for the base model so it fits a stock export (whose blocks were renumbered)",
        description="A stock export (`hprune export --stock`) keeps the base model's blocks minus the removed ones, "
        "renumbered from 0, and stock Diffusers applies a LoRA by module names: a base-model LoRA would land in "
        "the wrong blocks. This writes the LoRA with the adapters of removed blocks dropped and the rest renamed "
        "as the export's transformer/hprune_plan.json says. Pruned folders and remote-code exports need no "
        "conversion (load_lora_weights does it).",
    )
    p.add_argument("lora", help="the LoRA: a .safetensors file in Diffusers' format, or its folder")
    p.add_argument("--to", required=True, dest="export", help="the stock export: a folder or a Hub id")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    check_apart(args.out, "--out", (args.lora, "LORA"), (args.export, "--to"))
    out, dropped = convert_lora_for_export(args.lora, args.export, args.out, overwrite=args.overwrite)
    gone = f"; dropped the adapters of {len(dropped)} module(s) in removed blocks" if dropped else ""
    print(f"wrote {out}{gone}. Load it with pipe.load_lora_weights({str(out)!r}).")
    return 0
