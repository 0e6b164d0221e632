"""``hprune push``: export a pipeline folder for stock Diffusers and publish it with its model card."""

from __future__ import annotations

import argparse

from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.folders import FORMATS
from diffusers_hprune.hub.gguf_file import GGUF_KINDS
from diffusers_hprune.hub.push import push_folder, upload_tree
from diffusers_hprune.hub.single_file import DTYPES, FILE_FORMATS
from diffusers_hprune.utils.checks import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="export a pipeline folder for stock Diffusers and publish it with its model card (one commit)",
        description="Export the folder as `hprune export` does (into a temporary folder beside it; the folder "
        "itself is not changed), create the repository if needed and upload the export (pipeline, README.md "
        "card, sample images; not checkpoints, caches or logs) in one commit. With --base-model a new card is "
        "written into the export first.",
    )
    p.add_argument("folder", help="a pipeline folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--format", choices=FORMATS + FILE_FORMATS, help="stock: the stock Diffusers classes (plans that "
                   "remove whole blocks only; their default); remote: the pruned classes with their code (the default "
                   "otherwise); single-file / gguf: the transformer alone as one file in the original key layout, with "
                   "transformer/config.json and a card saying how to load it (needs --base-model)")
    p.add_argument("--quant", choices=GGUF_KINDS, help="with --format gguf: the GGUF kind (default Q8_0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="with --format single-file: the weights' dtype in the file")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a Hugging Face token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--base-model", help="write the model card first, naming this base model (Hub id)")
    p.add_argument("--evaluation", help="with --base-model: a metrics.json from `hprune evaluate TEACHER STUDENT`")
    p.add_argument("--grid", help="with --base-model: the sample grid from `hprune evaluate --grid`")
    p.add_argument("--license", help="with --base-model: the base model's license id (default: other)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    uploaded: list[str] = []  # push_folder checks the repo id, the folder and the token before it writes anything
    files = args.format in FILE_FORMATS
    for flag, value, applies in (("--quant", args.quant, args.format == "gguf"),
                                 ("--dtype", args.dtype, args.format == "single-file"),
                                 ("--evaluation", args.evaluation, not files), ("--grid", args.grid, not files)):
        if value is not None and not applies:
            raise InputError(f"{flag} does not apply to --format {args.format or 'the default'}; leave it out.")
    options = dict(quant=args.quant, dtype=args.dtype, base_model=args.base_model, license=args.license) if files else None

    def card(export) -> None:
        if args.base_model and not files:  # a file export writes its own card
            path = write_model_card(export, base_model=args.base_model, evaluation=args.evaluation, grid=args.grid,
                                    repo_id=args.repo_id, license=args.license)
            print(f"wrote the model card {path.name} into the export")
        uploaded.extend(upload_tree(export))

    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token, format=args.format,
                      card=card, file_options=options)
    print(f"uploaded {len(uploaded)} files to https://huggingface.co/{args.repo_id} ({url})")
    return 0
