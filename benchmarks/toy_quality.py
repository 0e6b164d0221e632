"""ShapeEval of the shipped toy pipelines on held-out prompts (issue 3's quality bar).

    python benchmarks/toy_quality.py [--n 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section

from diffusers_hprune import toy

BARS = {"sd3": 0.40, "flux": 0.30, "sd3-deep": 0.50, "flux-deep": 0.50}  # the deep toys: issue 36


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts = toy.prompts(split="heldout", n=args.n, seed=args.seed)
    rows, results = [], {}
    for family in toy.shipped():
        pipe = toy.load_pipeline(family)
        start = time.perf_counter()
        images = toy.generate(pipe, prompts, seed=args.seed)
        seconds = (time.perf_counter() - start) / len(prompts)
        r = toy.shapeeval(images, prompts)
        training = json.loads((toy.model_path(family) / "training.json").read_text())
        results[family] = r
        rows.append([family, training["steps"], r["overall"], *(r[c] for c in toy.CATEGORIES),
                     *(r[f"attribute_{a}"] for a in ("color", "shape", "count", "position")),
                     f"{seconds * 1000:.0f} ms", f">= {BARS[family]:.2f}", "yes" if r["overall"] >= BARS[family] else "no"])
        print(family, json.dumps({k: round(v, 3) for k, v in r.items()}))
    header = ["toy", "training steps", "overall", *toy.CATEGORIES, "color", "shape", "count", "position",
              "time / image", "bar", "met"]
    kwargs = {f: toy.generation_kwargs(f) for f in toy.shipped()}
    body = (
        f"{args.n} held-out prompts (balanced over the six categories, `toy.prompts('heldout', {args.n}, seed={args.seed})`), "
        "one image each (seed = index), strict GenEval-style scoring: an image passes only if every requested "
        "attribute is right. The last four score columns are per-attribute accuracies over the prompts that ask "
        "for that attribute.\n\n" + markdown_table(header, rows) + "\n\nGeneration settings: "
        + "; ".join(f"{f}: `{json.dumps(k)}`" for f, k in kwargs.items()) + "\n"
    )
    update_section("toy-quality", "Toy pipelines: ShapeEval on held-out prompts", body)


if __name__ == "__main__":
    main()
