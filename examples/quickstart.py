"""Prune an SD3/SD3.5 or FLUX.1 pipeline with a plan, save it, and load it back.

    python examples/quickstart.py --model stabilityai/stable-diffusion-3.5-large-turbo \
        --remove-blocks 30 33 36 --output sd35-large-turbo-pruned

Without --model it runs on a tiny pipeline built in code (CPU, seconds), which is
what the test suite does.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DiffusionPipeline

import diffusers_hprune  # noqa: F401  (registers the pruned classes with Diffusers)
from diffusers_hprune import PrunePlan, get_family, prune_pipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder or Hub repo id (default: a tiny SD3 pipeline built in code)")
    parser.add_argument("--plan", help="a plan.json; overrides --remove-blocks")
    parser.add_argument("--remove-blocks", type=int, nargs="*", default=None, help="global block indices to remove")
    parser.add_argument("--output", default="quickstart-pruned", help="folder for the pruned pipeline")
    parser.add_argument("--prompt", default="a red circle left of a blue square")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    args = parser.parse_args(argv)

    if args.model:
        pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    else:
        from diffusers_hprune.toy.components import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(num_layers=6)
        args.size = args.size or 32

    family = get_family(pipe.transformer)
    num_blocks = family.num_blocks(pipe.transformer.config)
    if args.plan:
        plan = PrunePlan.load(args.plan)
    else:
        removed = args.remove_blocks if args.remove_blocks is not None else [num_blocks - 2]
        plan = PrunePlan(removed_blocks=removed, family=family.name, num_blocks=num_blocks)

    pruned = prune_pipeline(pipe, plan)
    print("pruned:", pruned.prune_plan.describe())
    pruned.save_pretrained(args.output)

    reloaded = DiffusionPipeline.from_pretrained(args.output, dtype=pruned.transformer.dtype)
    size = {"height": args.size, "width": args.size} if args.size else {}
    image = reloaded(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), **size).images[0]
    image.save(f"{args.output}/sample.png")
    print(f"reloaded {type(reloaded).__name__}; sample written to {args.output}/sample.png")


if __name__ == "__main__":
    main()
