"""The embedded default (DESIGN.md section 7): tiny genuine SD3 and FLUX pipelines trained on
a procedural captioned-shapes dataset, and ShapeEval, a GenEval-like prompt-adherence metric.

```python
from diffusers_hprune import toy

pipe = toy.load_pipeline("sd3")                      # stock StableDiffusion3Pipeline, fp32, CPU
prompts = toy.prompts(split="heldout", n=8)
images = pipe(prompts, **toy.generation_kwargs("sd3")).images
print(toy.shapeeval(images, prompts))               # {'overall': ..., 'position': ..., ...}
```
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from diffusers_hprune.toy.dataset import CATEGORIES, parse_prompt, prompts, render, sample, to_array
from diffusers_hprune.toy.shapeeval import detect_objects, score_image, shapeeval
from diffusers_hprune.utils.checks import InputError

#: The toy families (the Diffusers pipeline each toy is: ``StableDiffusion3Pipeline`` or ``FluxPipeline``).
FAMILIES = ("sd3", "flux")
#: The shipped toys by name: the two 12-block toys, and two as deep as the seed models (SD3.5 Large's 38 joint
#: blocks; FLUX.1's 19 double + 38 single blocks) with the same text encoders, VAE and data.
NAMES = ("sd3", "flux", "sd3-deep", "flux-deep")
#: The toy `hprune demo` compresses.
DEMO_TOY = "sd3"

_GENERATION = {
    "sd3": dict(height=32, width=32, num_inference_steps=20, guidance_scale=5.0, max_sequence_length=10),
    "flux": dict(height=32, width=32, num_inference_steps=20, true_cfg_scale=5.0, negative_prompt="",
                 max_sequence_length=10),
}


def toy_family(name: str) -> str:
    """The family (``"sd3"`` or ``"flux"``) of the toy ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"Unknown toy {name!r}; choose one of {', '.join(NAMES)}.")
    return name.removesuffix("-deep")


def check_prompts(prompts, source: str) -> list[str]:
    """``prompts`` if ShapeEval can score every one (the toy grammar), else an ``InputError`` naming the first that is
    not and ``source`` (where they came from), raised before any work: ShapeEval scores the toy's own grammar only."""
    prompts = list(prompts)
    for number, prompt in enumerate(prompts, 1):
        try:
            parse_prompt(prompt)
        except ValueError:
            raise InputError(
                f"Prompt {number} of {source}, {prompt!r}, is not in the toy grammar that ShapeEval scores: one to "
                "three shapes (circle, square, triangle), optionally coloured (red, green, blue, yellow), e.g. 'a red "
                "circle', 'two squares', 'a circle left of a square', 'a red circle and a blue square'. Use such "
                "prompts, or leave ShapeEval out (--metric fidelity; on a toy, omit --prompts for its own)."
            ) from None
    return prompts


def _folder(name: str) -> Path:
    """Where the installation keeps the toy ``name``'s pipeline (whether or not it is there)."""
    return Path(str(resources.files("diffusers_hprune") / "toy" / "models" / name))


def model_path(name: str = "sd3") -> Path:
    """The folder of the shipped toy pipeline ``name`` (one of :data:`NAMES`)."""
    toy_family(name)
    path = _folder(name)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy {name} pipeline is missing from {path}; reinstall diffusers-hprune, or train it with "
            f"`hprune toy-train --toys {name} --out DIR` and copy DIR/{name} there."
        )
    return path


def shipped() -> tuple[str, ...]:
    """The toys of :data:`NAMES` whose pipelines this installation holds (a toy in training is not yet shipped)."""
    return tuple(n for n in NAMES if (_folder(n) / "model_index.json").is_file())


def name_of(name, *, names: bool = True) -> str | None:
    """The toy ``name`` stands for (one of :data:`NAMES`), or None.

    A toy name (``"sd3"``, ``"toy-flux-deep"``; with ``names=False`` these do not count) or the folder
    of a shipped toy pipeline.
    """
    text = str(name or "")
    if names and text.removeprefix("toy-") in NAMES:
        return text.removeprefix("toy-")
    for toy in NAMES:
        try:
            if text and Path(text).resolve() == model_path(toy).resolve():
                return toy
        except (FileNotFoundError, OSError):
            continue
    return None


def generation_kwargs(name: str = "sd3") -> dict:
    """The call arguments the toy pipelines were trained for (size, steps, guidance, text length); a deep toy's
    are its family's."""
    return dict(_GENERATION[toy_family(name)])


def load_pipeline(name_or_path: str | Path = "sd3", dtype=None):
    """Load a toy pipeline (a shipped toy's name or a folder) in float32 with stock ``DiffusionPipeline``."""
    import torch
    from diffusers import DiffusionPipeline

    path = model_path(name_or_path) if str(name_or_path) in NAMES else Path(name_or_path)
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _family_of(pipe) -> str:
    from diffusers import FluxPipeline

    return "flux" if isinstance(pipe, FluxPipeline) else "sd3"


def generate(pipe, prompt_list, seed: int = 0, batch_size: int = 25, **overrides):
    """Images for ``prompt_list`` (one per prompt, image ``i`` seeded with ``seed + i``), as PIL images."""
    import torch

    kwargs = generation_kwargs(_family_of(pipe)) | overrides
    images = []
    for start in range(0, len(prompt_list), batch_size):
        chunk = list(prompt_list[start : start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, **kwargs).images
    return images


def save_grid(images, path, columns: int = 8, scale: int = 3):
    """Save images (PIL or arrays) as one PNG grid, enlarged ``scale`` times."""
    import numpy as np
    from PIL import Image

    arrays = [to_array(im) for im in images]
    rows = [arrays[i : i + columns] for i in range(0, len(arrays), columns)]
    h, w = arrays[0].shape[:2]
    rows = [np.concatenate(r + [np.zeros((h, w, 3), np.float32)] * (columns - len(r)), axis=1) for r in rows]
    grid = Image.fromarray((np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def evaluate_pipeline(pipe, n: int = 200, seed: int = 0, split: str = "heldout", **overrides) -> dict:
    """ShapeEval of ``pipe`` on ``n`` prompts of ``split`` (one image each)."""
    prompt_list = prompts(split=split, n=n, seed=seed)
    return shapeeval(generate(pipe, prompt_list, seed=seed, **overrides), prompt_list)


__all__ = [
    "CATEGORIES",
    "DEMO_TOY",
    "FAMILIES",
    "NAMES",
    "check_prompts",
    "detect_objects",
    "evaluate_pipeline",
    "generate",
    "generation_kwargs",
    "load_pipeline",
    "model_path",
    "name_of",
    "parse_prompt",
    "prompts",
    "render",
    "sample",
    "save_grid",
    "score_image",
    "shapeeval",
    "shipped",
    "toy_family",
]
