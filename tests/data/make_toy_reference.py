"""Regenerate toy_reference.json after retraining and shipping the toy pipelines.

    python tests/data/make_toy_reference.py

The file pins what each shipped pipeline draws for one prompt and seed, so the
tests notice when the shipped weights, the loading path or the generation
settings change what users get.
"""

import json
from pathlib import Path

import numpy as np
import torch

from diffusers_hprune import toy

PROMPT, SEED = "a red circle left of a blue square", 0

reference = {}
for family in toy.shipped():
    pipe = toy.load_pipeline(family)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **toy.generation_kwargs(family)).images[0]
    reference[family] = {"prompt": PROMPT, "seed": SEED, "pixels": np.round(image * 255).astype(int).tolist()}
path = Path(__file__).with_name("toy_reference.json")
path.write_text(json.dumps(reference) + "\n")
print(f"wrote {path}")
