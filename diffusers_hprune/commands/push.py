"""``hprune push``: publish a pipeline folder with its model card to the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.push import push_folder, require_token, upload_tree


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish a pipeline folder with its model card to the Hugging Face Hub (one commit)",
        description="Create the repository if needed and upload the folder (pipeline, README.md card, sample "
        "images; not checkpoints, caches or logs) in one commit. With --base-model the card is written first.",
    )
    p.add_argument("folder", help="a pipeline folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="a Hugging Face token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--base-model", help="write the model card first, naming this base model (Hub id)")
    p.add_argument("--evaluation", help="with --base-model: a metrics.json from `hprune evaluate TEACHER STUDENT`")
    p.add_argument("--grid", help="with --base-model: the sample grid from `hprune evaluate --grid`")
    p.add_argument("--license", help="with --base-model: the base model's license id (default: other)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_token(args.token)  # before writing a card or anything else
    if args.base_model:
        card = write_model_card(args.folder, base_model=args.base_model, evaluation=args.evaluation, grid=args.grid,
                                repo_id=args.repo_id, license=args.license)
        print(f"wrote the model card {card}")
    files = upload_tree(args.folder) if Path(args.folder).is_dir() else []
    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {len(files)} files to https://huggingface.co/{args.repo_id} ({url})")
    return 0
