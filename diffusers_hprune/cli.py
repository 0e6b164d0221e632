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
        summary = run_demo(args.out, families=args.family, n_prompts=args.prompts, overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"hprune demo: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    return 0


def _cmd_toy_train(args: argparse.Namespace) -> int:
    from .toy.train import train_all

    paths = train_all(args.out, minutes=args.minutes, seed=args.seed)
    print(f"trained: {', '.join(str(p) for p in paths.values())}")
    print("to ship them, copy the sd3 and flux folders to diffusers_hprune/toy/models/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import diffusers

    from . import toy
    from .fileio import atomic_write_json

    diffusers.utils.logging.disable_progress_bar()
    pipe = toy.load_pipeline(args.model)
    prompt_list = toy.prompts(split=args.split, n=args.n, seed=args.seed)
    images = toy.generate(pipe, prompt_list, seed=args.seed)
    result = {"model": str(args.model), "metric": args.metric, "split": args.split, "n": args.n, "seed": args.seed}
    result.update(toy.shapeeval(images, prompt_list))
    if args.grid:
        toy.save_grid(images[: args.grid_size], args.grid)
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
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
        help="run the flow on the embedded toy SD3 and FLUX pipelines (CPU, under a minute)",
        description="Draw and score (ShapeEval) the embedded toy SD3 and FLUX pipelines, prune them with an "
        "example plan, save them, load them back with DiffusionPipeline.from_pretrained and score them again.",
    )
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--family", nargs="+", choices=["sd3", "flux"], default=["sd3", "flux"], help="families to run")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts to draw and score (default 24)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "evaluate",
        help="score a pipeline's prompt adherence (ShapeEval on the toy prompts)",
        description="Generate one image per held-out toy prompt and score them with ShapeEval "
        "(overall, per category, per attribute).",
    )
    p.add_argument("model", help="a toy name (sd3, flux) or a pipeline folder trained on the toy shapes")
    p.add_argument("--metric", choices=["shapeeval"], default="shapeeval", help="metric (default shapeeval)")
    p.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--grid", help="write a PNG grid of the first images here")
    p.add_argument("--grid-size", type=int, default=32, help="images in the grid (default 32)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "toy-train",
        help="train the embedded toy pipelines (VAE, then SD3 and FLUX in parallel; about an hour on 2 cores)",
    )
    p.add_argument("--out", default="build/toy", help="output folder (default build/toy)")
    p.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget per transformer (default 55)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy_train)
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
