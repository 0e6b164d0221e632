"""``hprune export``: a pipeline folder as `hprune push` uploads it, loadable with stock Diffusers alone."""

from __future__ import annotations

import argparse

from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.export import export_folder
from diffusers_hprune.hub.folders import FORMATS, folder_format, folder_plan
from diffusers_hprune.utils.checks import check_not_inside, check_output_folder, check_replaceable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a pipeline folder as `hprune push` uploads it: stock classes, or the pruned classes' code",
        description="Write a copy of a pruned pipeline folder that loads with stock Diffusers alone. With --stock "
        "(the default for plans that remove whole blocks only) the transformer becomes the stock "
        "SD3Transformer2DModel / FluxTransformer2DModel with fewer blocks, renumbered; the plan with the original "
        "indices stays in transformer/hprune_plan.json. Otherwise the transformer folder carries its modeling code "
        "(transformer/hprune_transformer.py, auto_map) for trust_remote_code=True. The model card's loading "
        "section is rewritten for the format. Training leftovers (checkpoints, caches, logs) are left out.",
    )
    p.add_argument("folder", help="a pruned pipeline folder (from `hprune compress`, `distill`, `quantize` or "
                   "save_pretrained)")
    p.add_argument("--out", required=True, help="the folder to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stock", dest="format", action="store_const", const="stock",
                       help="export to the stock Diffusers classes (plans that remove whole blocks only)")
    group.add_argument("--format", choices=FORMATS, help="stock or remote (default: stock when the plan removes "
                       "whole blocks only, remote otherwise)")
    p.add_argument("--base-model", help="write a new model card into the export, naming this base model (Hub id)")
    p.add_argument("--repo-id", help="the repository the card's loading code names (default: OUT itself, where the "
                   "snippet then loads it from)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is a pipeline folder (an earlier output); a folder holding anything else is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    check_not_inside(args.out, args.folder, "--out", "FOLDER")
    if args.overwrite:
        check_replaceable(args.out, "--out")  # a pipeline folder, never a folder of the user's files
    out = export_folder(args.folder, args.out, format=args.format, overwrite=args.overwrite, repo_id=args.repo_id)
    if args.base_model:
        write_model_card(out, base_model=args.base_model, repo_id=args.repo_id)
    _, plan = folder_plan(out)
    format = folder_format(out)
    how = ("DiffusionPipeline.from_pretrained(OUT)" if format == "stock"
           else "DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)")
    print(f"wrote {out} ({format} format: {plan.describe()}); it loads with stock Diffusers: {how}")
    return 0
