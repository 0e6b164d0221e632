"""``hprune push``: export a pipeline folder for stock Diffusers and publish it with its model card."""

from __future__ import annotations

import argparse

from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.folders import FORMATS
from diffusers_hprune.hub.push import push_folder, upload_tree


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
    p.add_argument("--format", choices=FORMATS, help="stock: the stock Diffusers classes (plans that remove whole "
                   "blocks only; their default); remote: the pruned classes with their code (the default otherwise)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a Hugging Face token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--base-model", help="write the model card first, naming this base model (Hub id)")
    p.add_argument("--evaluation", help="with --base-model: a metrics.json from `hprune evaluate TEACHER STUDENT`")
    p.add_argument("--grid", help="with --base-model: the sample grid from `hprune evaluate --grid`")
    p.add_argument("--license", help="with --base-model: the base model's license id (default: other)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    uploaded: list[str] = []  # push_folder checks the repo id, the folder and the token before it writes anything

    def card(export) -> None:
        if args.base_model:
            path = write_model_card(export, base_model=args.base_model, evaluation=args.evaluation, grid=args.grid,
                                    repo_id=args.repo_id, license=args.license)
            print(f"wrote the model card {path.name} into the export")
        uploaded.extend(upload_tree(export))

    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token, format=args.format,
                      card=card)
    print(f"uploaded {len(uploaded)} files to https://huggingface.co/{args.repo_id} ({url})")
    return 0
