"""``hprune export``: a pipeline folder as `hprune push` uploads it, loadable with stock Diffusers alone."""

from __future__ import annotations

import argparse

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.export import export_folder
from diffusers_hprune.hub.folders import FORMATS, folder_format, folder_plan
from diffusers_hprune.hub.gguf_file import GGUF_KINDS, export_gguf
from diffusers_hprune.hub.single_file import DTYPES, FILE_FORMATS, export_single_file
from diffusers_hprune.utils.checks import InputError, check_not_inside, check_output_folder, check_replaceable


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a pipeline folder as `hprune push` uploads it: stock classes, or the pruned classes' code",
        description="Write a copy of a pruned pipeline folder that loads with stock Diffusers alone. With --stock "
        "(the default for plans that remove whole blocks only) the transformer becomes the stock "
        "SD3Transformer2DModel / FluxTransformer2DModel with fewer blocks, renumbered; the plan with the original "
        "indices stays in transformer/hprune_plan.json. Otherwise the transformer folder carries its modeling code "
        "(transformer/hprune_transformer.py, auto_map) for trust_remote_code=True. The model card's loading "
        "section is rewritten for the format. Training leftovers (checkpoints, caches, logs) are left out. "
        "--format single-file / gguf write the transformer alone as one file in its family's original key layout "
        "(Black Forest Labs' for FLUX.1, Stability AI's for SD3.5), the layout of single-file checkpoints, for "
        "Diffusers' from_single_file and (FLUX.1) ComfyUI-style tools (plans that remove whole blocks only).",
    )
    p.add_argument("folder", help="a pruned pipeline folder (from `hprune compress`, `distill`, `quantize` or "
                   "save_pretrained)")
    p.add_argument("--out", required=True, help="the folder to write (single-file: a .safetensors file; gguf: a .gguf file)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stock", dest="format", action="store_const", const="stock",
                       help="export to the stock Diffusers classes (plans that remove whole blocks only)")
    group.add_argument("--format", choices=FORMATS + FILE_FORMATS, help="stock or remote: a pipeline folder (default: "
                       "stock when the plan removes whole blocks only, remote otherwise); single-file: the transformer "
                       "as one .safetensors file in the original key layout; gguf: the same, quantised (--quant)")
    p.add_argument("--quant", choices=GGUF_KINDS, help="with --format gguf: the GGUF kind of the weights (default "
                   "Q8_0); biases, norms, embedders and the final layer stay 32-bit")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="with --format single-file: the weights' dtype in the file "
                   "(default: as the folder stores them)")
    p.add_argument("--base-model", help="write a new model card into the export, naming this base model (Hub id)")
    p.add_argument("--repo-id", help="the repository the card's loading code names (default: OUT itself, where the "
                   "snippet then loads it from)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is a pipeline folder (an earlier output); a folder holding anything else is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format in FILE_FORMATS:
        return _run_file(args)
    for flag, value in (("--quant", args.quant), ("--dtype", args.dtype)):
        if value is not None:
            raise InputError(f"{flag} applies to --format {'gguf' if flag == '--quant' else 'single-file'} only; "
                             f"leave it out for a pipeline folder.")
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


def _run_file(args: argparse.Namespace) -> int:
    """--format single-file / gguf: one file of the transformer."""
    wrong = {"--quant": args.quant if args.format != "gguf" else None,
             "--dtype": args.dtype if args.format != "single-file" else None,
             "--base-model": args.base_model, "--repo-id": args.repo_id}
    for flag, value in wrong.items():
        if value is not None:
            raise InputError(f"{flag} does not apply to --format {args.format} (one file, no model card); leave it "
                             "out, or push the file with `hprune push --format ...`, which writes its card.")
    if args.format == "gguf":
        out, counts = export_gguf(args.folder, args.out, quant=args.quant or "Q8_0", overwrite=args.overwrite)
        kinds = ", ".join(f"{n} tensors {k}" for k, n in sorted(counts.items()))
        print(f"wrote {out} (GGUF, {kinds})")
        reader = "from_single_file(FILE, quantization_config=GGUFQuantizationConfig(compute_dtype=...), config=STOCK, "
    else:
        out = export_single_file(args.folder, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out} (one file in the original key layout)")
        reader = "from_single_file(FILE, config=STOCK, "
    config, _ = folder_plan(args.folder)
    layout = get_family(config).original_layout
    tools = ("ComfyUI counts its blocks and loads it as the pruned model" if layout.tools_count_blocks else
             "ComfyUI would build the unpruned depth (it derives SD3's depth from the width): load it with Diffusers")
    print(f"Diffusers reads it with {reader}subfolder='transformer'), STOCK being the stock export of the same folder "
          f"(`hprune export FOLDER --out STOCK`) or a repository `hprune push --format {args.format}` made; {tools} "
          "(docs/sharing.md)")
    return 0
