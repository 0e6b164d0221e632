"""Loading pipelines and drawing with them: the one place every stage gets a pipeline and its call settings.

``load_pipeline`` takes a pipeline object, a folder, a Hub repo id in the local cache or a
toy name; its weight files are checked first (safetensors only, not damaged:
``check_weight_files``). ``generation_settings`` gives the call arguments the stages draw with
(the toy's own for the toys), checked against what the pipeline can draw (``check_image_size``);
``generate`` draws a list of prompts with fixed seeds in batches.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from diffusers_hprune import toy
from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.pipelines.pruned import check_pipeline_family, known_pipeline
from diffusers_hprune.profiles import generation_kwargs
from diffusers_hprune.utils.checks import InputError, check_number, read_text_file, refuse_pickled
from diffusers_hprune.utils.compat import execution_device, set_vae_tile_settings, vae_tile_settings
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.untrusted import check_model_index


class PipelineLoadError(HPruneError):
    """A model argument that names no loadable pipeline."""


class WeightFileError(InputError):
    """A weight file that is damaged (truncated, not safetensors) or pickled."""


# -- weight files ------------------------------------------------------------------------------
def check_weight_files(folder: str | os.PathLike, what: str = "weights") -> None:
    """Refuse a folder whose weights are pickles only, or a ``*.safetensors`` file in it that does not open.

    Opening reads the header and checks that the file covers every tensor it lists (a
    truncated download fails here), without reading the tensors.
    """
    folder = Path(folder)
    refuse_pickled(folder, what)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise WeightFileError(
                f"The {what} file {path} is damaged ({e}): it is truncated or not a safetensors file. Download it "
                "again (or save the model again with `save_pretrained`) and try again."
            ) from None


def check_pipeline_weights(folder: str | os.PathLike) -> None:
    """Check the pipeline folder ``folder`` before Diffusers reads it: its ``model_index.json`` (``check_model_index``:
    shape, plain component names, component folders present), its transformer config's sizes, an SD3 / FLUX
    pipeline class of its transformer's family, and ``check_weight_files`` for every component folder."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return  # not a pipeline folder: Diffusers says so when it loads
    try:
        index = json.loads(read_text_file(folder / "model_index.json", "pipeline index"))
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{folder / 'model_index.json'} is not valid JSON ({e}); download or save the pipeline "
                         "again.") from None
    check_model_index(index, folder)  # its shape, and no "../x" component Diffusers would read outside the folder
    if (folder / "transformer" / "config.json").is_file():
        config = load_transformer_config(folder)  # sizes bounded before Diffusers builds the model (num_layers 1e8)
        if known_pipeline(index["_class_name"]):
            check_pipeline_family(index["_class_name"], config, folder)
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and (folder / name).is_dir():
            check_weight_files(folder / name, f"{name} weights")


# -- image sizes -------------------------------------------------------------------------------
def pixel_multiple(model) -> int | None:
    """What image heights and widths must be a multiple of for ``model`` (a pipeline, a folder, a cached Hub id or
    a toy name): the VAE's downsampling times the transformer's 2x2 patches (16 for SD3 and FLUX.1, 4 for the toys).

    ``None`` when it cannot be told without loading the model.
    """
    if not isinstance(model, (str, os.PathLike)):
        vae_scale = getattr(model, "vae_scale_factor", None)
        transformer = getattr(model, "transformer", None)
        patch = getattr(getattr(transformer, "config", None), "patch_size", 2)
        return int(vae_scale) * max(2, int(patch or 2)) if vae_scale else None
    folder = pipeline_folder(model)
    if folder is None:
        return None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        transformer = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(vae["block_out_channels"]) - 1) * max(2, int(transformer.get("patch_size") or 2))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_image_size(height, width, multiple: int | None, model: str = "this model") -> None:
    """Refuse a height or width that is not a positive multiple of ``multiple`` (``None``: only positive)."""
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        check_number(f"The image {name}", value, kind=int, minimum=1)
        if multiple and value % multiple:
            lower = max(multiple, value - value % multiple)
            raise InputError(
                f"The image {name} {value} is not a multiple of {multiple}, which {model} needs (its VAE and "
                f"transformer patches divide images into {multiple}x{multiple} pixel tiles); use e.g. {lower} or "
                f"{lower + multiple}."
            )


# -- calibration ------------------------------------------------------------------------------
def is_toy(pipe) -> str | None:
    """The toy family of a pipeline loaded from a shipped toy's folder, else None."""
    return toy.name_of(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", ""), names=False)


def generation_settings(pipe, num_inference_steps=None, height=None, width=None, guidance_scale=None) -> dict:
    """Pipeline call arguments for drawing with ``pipe``: its model's profile (:mod:`diffusers_hprune.profiles`),
    then the given overrides.

    Raises :class:`~diffusers_hprune.utils.checks.InputError` for settings the pipeline cannot
    draw with: steps below 1, a size that is not a positive multiple of :func:`pixel_multiple`,
    a guidance scale that is negative or not finite.
    """
    if num_inference_steps is not None:
        check_number("The number of denoising steps", num_inference_steps, kind=int, minimum=1)
    if guidance_scale is not None:
        check_number("The guidance scale", guidance_scale, minimum=0)
    kwargs = generation_kwargs(pipe, num_inference_steps, height, width, guidance_scale)
    check_image_size(kwargs.get("height"), kwargs.get("width"), pixel_multiple(pipe),
                     str(getattr(pipe, "name_or_path", "") or "this pipeline"))
    return kwargs


#: The pipeline components that encode prompts, and with the VAE every component beside the transformer that computes.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
ENCODERS = (*TEXT_ENCODERS, "vae")


@contextlib.contextmanager
def components_on(pipe, device, names=ENCODERS):
    """The pipeline's components ``names`` (default: text encoders and VAE) on ``device`` within the block, on the
    CPU after it (also when the block fails). Components the pipeline lacks or holds as ``None`` are skipped; with
    ``device=None`` nothing moves (every component stays where it is)."""
    if device is None:
        yield pipe
        return
    modules = [getattr(pipe, name, None) for name in names]
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    for m in modules:
        m.to(device)
    try:
        yield pipe
    finally:
        for m in modules:
            m.to("cpu")


@contextlib.contextmanager
def swapped_transformer(pipe, transformer):
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        yield pipe
    finally:
        pipe.transformer = original


def without_text_encoders(pipe):
    """``pipe``'s pipeline class around its components without the text encoders: it draws from encoded prompts
    (:func:`prompt_embeddings`) and computes where its transformer (SD3) or VAE (FLUX) is."""
    components = {name: (None if name in TEXT_ENCODERS else value) for name, value in pipe.components.items()}
    drawing = type(pipe)(**components)
    drawing.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return drawing


@torch.no_grad()
def prompt_embeddings(pipe, prompts: list[str], max_sequence_length: int, negative: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """``prompts`` encoded with the pipeline's text encoders (wherever they are), as pipeline call arguments:
    ``prompt_embeds``, ``pooled_prompt_embeds`` and, for a ``negative`` prompt, ``negative_prompt_embeds`` and
    ``negative_pooled_prompt_embeds`` (one row per prompt, as SD3's pipeline encodes it; FLUX's encodes one row and
    broadcasts it, the same values). On the CPU."""
    family = get_family(pipe.transformer)
    text = family.encode_text(pipe, list(prompts), max_sequence_length)
    out = {"prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_projections"]}
    if negative is not None:
        empty = family.encode_text(pipe, [negative] * len(prompts), max_sequence_length)
        out.update(negative_prompt_embeds=empty["prompt_embeds"],
                   negative_pooled_prompt_embeds=empty["pooled_projections"])
    return {k: v.detach().cpu() for k, v in out.items()}


def call_default(pipe, name: str, fallback=None):
    """The default of the pipeline call's argument ``name`` (e.g. ``max_sequence_length``: 256 for SD3, 512 for
    FLUX), or ``fallback`` where its ``__call__`` has none."""
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def negative_prompt(pipe, kwargs: dict) -> str | None:
    """The negative prompt a drawing with ``kwargs`` encodes: the one they name, else the family's default."""
    return kwargs.get("negative_prompt", get_family(pipe.transformer).negative_prompt_default)


#: The tile of tiled VAE decoding (``--vae-tiling``), in pixels: a 1024 px image decodes as 3 x 3 overlapping tiles.
VAE_TILE = 512


@contextlib.contextmanager
def sliced_decoding(pipe, tiled: bool = False):
    """Within the block the pipeline's VAE decodes a batch one image at a time (Diffusers' VAE slicing: the same
    images up to rounding, as some CPUs' kernels sum a batch of one in another order than a batch of several, and the
    decode's memory that of one image whatever the batch); ``tiled``: each image in overlapping
    tiles of :data:`VAE_TILE` pixels as well (Diffusers' VAE tiling: about a quarter of one 1024 px image's decode
    memory; the tiles are blended, so the images differ a little from whole ones). Afterwards as it was."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "use_slicing"):
        yield pipe
        return
    slicing, tiles = vae.use_slicing, vae_tile_settings(vae) if tiled else None
    vae.enable_slicing()
    if tiled:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        set_vae_tile_settings(vae, (True, VAE_TILE, VAE_TILE // factor))
    try:
        yield pipe
    finally:
        if not slicing:
            vae.disable_slicing()
        if tiles is not None:
            set_vae_tile_settings(vae, tiles)


def generate(pipe, prompts, seeds, kwargs, batch_size, on_step=None, embeds=None, tiled: bool = False):
    """Draw ``prompts`` with ``seeds`` in batches of ``batch_size``; ``embeds`` (one :func:`prompt_embeddings` per
    batch) instead of the prompts for a pipeline without text encoders (the negative prompt comes encoded too).
    The VAE decodes one image at a time, ``tiled``: in tiles (:func:`sliced_decoding`)."""
    with sliced_decoding(pipe, tiled):
        return _generate(pipe, prompts, seeds, kwargs, batch_size, on_step, embeds)


def _generate(pipe, prompts, seeds, kwargs, batch_size, on_step, embeds):
    images = []
    device = execution_device(pipe)
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + batch_size]]
        extra = {}
        if on_step is not None:
            on_step(0)

            def callback(p, i, t, cb_kwargs):
                on_step(i + 1)
                return {}

            extra["callback_on_step_end"] = callback
        if embeds is None:
            images += pipe(chunk, generator=generators, **kwargs, **extra).images
        else:
            settings = {key: v for key, v in kwargs.items() if key != "negative_prompt"}
            given = {key: v.to(device) for key, v in embeds[k].items()}
            images += pipe(generator=generators, **settings, **given, **extra).images
    return images


# -- the runner --------------------------------------------------------------------------------
def pipeline_folder(model) -> Path | None:
    """The local folder a pipeline was loaded from (a folder, a toy name, a Hub id in the local cache), or None."""
    name = str(model if isinstance(model, (str, os.PathLike)) else
               getattr(model, "name_or_path", "") or model.config.get("_name_or_path", ""))
    family = toy.name_of(name)
    if family:
        return toy.model_path(family)
    if name and (Path(name) / "model_index.json").is_file():
        return Path(name)
    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not a repo id, or not in the cache: the caller saves what it loaded instead
        return None
    return path if (path / "model_index.json").is_file() else None


def load_pipeline(model, device, dtype, **components):
    """``(pipeline, name)``: ``model`` (a pipeline, folder, cached Hub id or toy name) in ``dtype`` on ``device``.

    ``components`` replace the pipeline's own (e.g. an already loaded transformer); with
    ``device=None`` nothing is moved.
    """
    if not isinstance(model, (str, os.PathLike)):
        return model, str(getattr(model, "name_or_path", type(model).__name__))
    name = str(model)
    family = toy.name_of(name)
    path = toy.model_path(family) if family else name
    local = pipeline_folder(name)
    if local is not None:  # pickles and damaged files are refused before Diffusers reads any of them
        check_pipeline_weights(local)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **components)
    except (OSError, ValueError) as e:
        raise PipelineLoadError(
            f"Could not load the pipeline {name!r} ({type(e).__name__}: {e}). Pass a pipeline folder, a Hub repo id "
            "available in the local cache, or a toy name (sd3, flux)."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return (pipe if device is None else pipe.to(device)), name


