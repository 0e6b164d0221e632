"""Loading pipelines and drawing with them: the one place every stage gets a pipeline and its call settings.

``load_pipeline`` takes a pipeline object, a folder, a Hub repo id in the local cache or a
toy name; ``generation_settings`` gives the call arguments the stages draw with (the toy's
own for the toys); ``generate`` draws a list of prompts with fixed seeds in batches.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download

from diffusers_hprune import toy
from diffusers_hprune.profiles import generation_kwargs
from diffusers_hprune.utils.errors import HPruneError


class PipelineLoadError(HPruneError):
    """A model argument that names no loadable pipeline."""


# -- calibration ------------------------------------------------------------------------------
def is_toy(pipe) -> str | None:
    """The toy family of a pipeline loaded from a shipped toy's folder, else None."""
    return toy.family_of(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", ""), names=False)


def generation_settings(pipe, num_inference_steps=None, height=None, width=None, guidance_scale=None) -> dict:
    """Pipeline call arguments for drawing with ``pipe``: its model's profile (:mod:`diffusers_hprune.profiles`),
    then the given overrides."""
    return generation_kwargs(pipe, num_inference_steps, height, width, guidance_scale)


@contextlib.contextmanager
def swapped_transformer(pipe, transformer):
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        yield pipe
    finally:
        pipe.transformer = original


def generate(pipe, prompts, seeds, kwargs, batch_size, on_step=None):
    images = []
    device = pipe._execution_device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + batch_size]]
        extra = {}
        if on_step is not None:
            on_step(0)

            def callback(p, i, t, cb_kwargs):
                on_step(i + 1)
                return {}

            extra["callback_on_step_end"] = callback
        images += pipe(chunk, generator=generators, **kwargs, **extra).images
    return images


# -- the runner --------------------------------------------------------------------------------
def pipeline_folder(model) -> Path | None:
    """The local folder a pipeline was loaded from (a folder, a toy name, a Hub id in the local cache), or None."""
    name = str(model if isinstance(model, (str, os.PathLike)) else
               getattr(model, "name_or_path", "") or model.config.get("_name_or_path", ""))
    family = toy.family_of(name)
    if family:
        return toy.model_path(family)
    if name and (Path(name) / "model_index.json").is_file():
        return Path(name)
    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not a repo id, or not in the cache: the caller saves what it loaded instead
        return None
    return path if (path / "model_index.json").is_file() else None


def load_pipeline(model, device, torch_dtype, **components):
    """``(pipeline, name)``: ``model`` (a pipeline, folder, cached Hub id or toy name) in ``torch_dtype`` on ``device``.

    ``components`` replace the pipeline's own (e.g. an already loaded transformer); with
    ``device=None`` nothing is moved.
    """
    if not isinstance(model, (str, os.PathLike)):
        return model, str(getattr(model, "name_or_path", type(model).__name__))
    name = str(model)
    family = toy.family_of(name)
    path = toy.model_path(family) if family else name
    try:
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, **components)
    except (OSError, ValueError) as e:
        raise PipelineLoadError(
            f"Could not load the pipeline {name!r} ({type(e).__name__}: {e}). Pass a pipeline folder, a Hub repo id "
            "available in the local cache, or a toy name (sd3, flux)."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return (pipe if device is None else pipe.to(device)), name


