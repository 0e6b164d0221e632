"""Training data for distillation, cached so that training runs no text encoder and no VAE.

Two sources (DESIGN.md section 8: ``datasets`` loads and caches):

* image-caption data: an ``imagefolder`` (``--train_data_dir``, captions in ``metadata.jsonl``
  or ``metadata.csv``) or any ``datasets`` dataset (``--dataset_name``: a Hub name, or a builder
  such as ``parquet`` / ``webdataset`` with ``--data_files``). Images are resized (shorter side),
  centre-cropped, encoded with the VAE (latent mean, shifted and scaled as the pipeline does);
* data-free (``--prompts FILE``, one prompt a line): the teacher draws each prompt (seed
  ``seed + k``) and its final latents are the clean samples.

Either way the prompts are encoded with the pipeline's text encoders and everything lands in
an Arrow dataset (``latents``, ``prompt_embeds``, ``pooled_projections``, ``prompt``) saved in
``cache_dir/<key>``, where the key hashes the teacher's weights digest and every setting. A
second run with the same settings loads it instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.contributions import components_fingerprint, fingerprint
from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.loading import (
    ENCODERS,
    TEXT_ENCODERS,
    components_on,
    generation_settings,
    negative_prompt,
    prompt_embeddings,
    without_text_encoders,
)
from diffusers_hprune.utils.checks import InputError, prompt_lines, read_text_file
from diffusers_hprune.utils.compat import execution_device
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import with_user_mode


class DataError(HPruneError):
    """Training data that is missing, empty or not what the options say."""


@dataclass
class DataSpec:
    """Where the training data comes from and how it is prepared."""

    prompts: str | None = None
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_files: str | None = None
    image_column: str = DistillConfig.image_column  # the options DistillConfig has take its defaults (one source)
    caption_column: str = DistillConfig.caption_column
    resolution: int | None = None
    teacher_steps: int | None = None
    guidance_scale: float | None = None
    max_samples: int | None = None
    seed: int = DistillConfig.seed
    batch_size: int = 8
    held_out: tuple[str, ...] = ()
    """Prompts left out of training (drawn for validation instead)."""

    def check(self) -> None:
        given = [n for n in ("prompts", "train_data_dir", "dataset_name") if getattr(self, n)]
        if len(given) != 1:
            raise DataError(
                "Give exactly one data source: --prompts FILE (data-free: the teacher draws them), "
                f"--train_data_dir DIR (an imagefolder with captions) or --dataset_name NAME (got {given or 'none'})."
            )


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompt file, stripped (``utils.checks.prompt_lines``: lines end at newlines
    only); a DataError when it cannot be read, is too large, has a line too long or has no prompt."""
    try:
        prompts = prompt_lines(read_text_file(path, "prompt file"), path)
    except InputError as e:  # missing, a folder, not UTF-8, too large: said with the path and what to do
        raise DataError(str(e)) from None
    if not prompts:
        raise DataError(f"The prompt file {path} has no prompts; write one prompt a line.")
    return prompts


def held_out_prompts(prompts: list[str], at_most: int) -> list[str]:
    """The last distinct ``prompts`` kept out of training: at most ``at_most``, at most a fifth, at least one.

    Empty when there are fewer than 2 distinct prompts (nothing would be left to train on).
    """
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        return []
    return distinct[-max(1, min(at_most, len(distinct) // 5)):]


def _load_image_dataset(spec: DataSpec):
    import datasets

    try:
        if spec.train_data_dir:
            ds = datasets.load_dataset("imagefolder", data_dir=spec.train_data_dir, split="train")
        else:
            kwargs = {"data_files": spec.data_files} if spec.data_files else {}
            ds = datasets.load_dataset(spec.dataset_name, spec.dataset_config_name, split="train", **kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"Could not load the training images ({type(e).__name__}: {e}).") from None
    for column in (spec.image_column, spec.caption_column):
        if column not in ds.column_names:
            raise DataError(
                f"The dataset has no column {column!r} (columns: {', '.join(ds.column_names)}); choose the image and "
                "caption columns with --image_column / --caption_column (an imagefolder takes captions from "
                "metadata.jsonl)."
            )
    if spec.max_samples:
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    if len(ds) == 0:
        raise DataError("The training dataset is empty.")
    return ds


def _image_tensor(image, resolution: int) -> torch.Tensor:
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def _encode_images(pipe, images: list, resolution: int) -> torch.Tensor:
    vae = pipe.vae
    x = torch.stack([_image_tensor(im, resolution) for im in images]).to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def prompt_lines_digest(spec: DataSpec) -> str | None:
    """A digest of the prompt file's lines (what the teacher draws), or None for image-caption data."""
    return hashlib.sha256("\n".join(read_prompts(spec.prompts)).encode()).hexdigest() if spec.prompts else None


def cache_key(spec: DataSpec, teacher_fingerprint: str, generation: dict, components: str | None = None) -> str:
    """The cache's identity: the options, the prompt file's lines (not its name: a moved file is the same data), the
    teacher (its transformer, and ``components``: the digest of its text encoders, VAE, tokenizers and scheduler,
    which the cached embeddings and latents come from), the drawing."""
    options = {k: v for k, v in asdict(spec).items() if k != "prompts"}
    payload = json.dumps({"spec": options, "prompt_lines": prompt_lines_digest(spec), "teacher": teacher_fingerprint,
                          "components": components, "generation": generation}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _generation(pipe, spec: DataSpec) -> dict:
    """The teacher's drawing settings for ``spec`` (its generation profile, overridden by the options)."""
    generation = generation_settings(pipe, spec.teacher_steps, spec.resolution, spec.resolution, spec.guidance_scale)
    generation["max_sequence_length"] = int(generation.get("max_sequence_length", 256))
    return generation


def data_identity(pipe, spec: DataSpec, components: str | None = None) -> dict:
    """What the training data depends on, by content: the options (not the prompt file's name), its lines, the drawing.

    Part of a distillation run's identity: a run resumed on other data is another run. ``components``: the
    pipeline's :func:`components_fingerprint` when the caller has it (under several processes only the main one
    holds the text encoders, so it is computed there and handed to every process).
    """
    options = {k: v for k, v in asdict(spec).items() if k not in ("prompts", "held_out")}
    return {**options, "prompt_lines": prompt_lines_digest(spec), "held_out": sorted(spec.held_out),
            "generation": _generation(pipe, spec), "components": components or components_fingerprint(pipe)}


def _damaged_cache_file(path: Path) -> tuple[str, str] | None:
    """The first file of a saved dataset that does not read back whole, with the reason; None if all do."""
    import pyarrow as pa

    for file in sorted(path.glob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, ValueError, pa.ArrowException) as e:
            return file.name, str(e)
    return None


def _load_cache(path: Path):
    """The cached dataset at ``path``; a DataError naming the damaged file (and how to rebuild it) if it is damaged."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.load_from_disk(str(path)).with_format("torch")
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        damaged = _damaged_cache_file(path)
        what = f"{path / damaged[0]} ({damaged[1]})" if damaged else f"{path} ({type(e).__name__}: {e})"
        raise DataError(f"The cached training data is damaged: {what}. Delete the folder {path} (the next run "
                        "encodes the data again) and try again.") from None


def build_training_cache(pipe, spec: DataSpec, cache_dir: str | os.PathLike, progress: bool = True,
                         components: str | None = None, device=None):
    """Encode (and for data-free, draw) the training samples once; returns ``(datasets.Dataset, path)``.

    Call on one process; the others load the returned path after a barrier, with the same ``components`` (the
    main process's :func:`components_fingerprint`: theirs lack the text encoders, so their key would differ).
    ``device``: where the text encoders and VAE compute, each only while it does (the teacher already is there):
    for data-free drawing every prompt is encoded first and the text encoders go back to the CPU before the teacher
    draws, beside the VAE alone. ``None`` leaves every component where it is.
    """
    import datasets
    from tqdm.auto import tqdm

    spec.check()
    family = get_family(pipe.transformer)
    generation = _generation(pipe, spec)
    key = cache_key(spec, fingerprint(pipe.transformer), generation, components or components_fingerprint(pipe))
    max_len = generation.pop("max_sequence_length")
    path = Path(cache_dir) / key
    if (path / "dataset_info.json").is_file():
        return _load_cache(path), path

    records = {"latents": [], "prompt_embeds": [], "pooled_projections": [], "prompt": []}
    if spec.prompts:
        prompts = [p for p in read_prompts(spec.prompts) if p not in set(spec.held_out)]
        if spec.max_samples:
            prompts = prompts[: spec.max_samples]
        chunks = [prompts[start : start + spec.batch_size] for start in range(0, len(prompts), spec.batch_size)]
        negative = negative_prompt(pipe, generation)
        with components_on(pipe, device, TEXT_ENCODERS):
            texts = [prompt_embeddings(pipe, chunk, max_len, negative) for chunk in
                     tqdm(chunks, desc="encoding the prompts", disable=not progress)]
        drawing = without_text_encoders(pipe)
        settings = {k: v for k, v in generation.items() if k != "negative_prompt"}  # it comes encoded
        height = generation.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
        width = generation.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
        with components_on(drawing, device, ("vae",)):  # where FLUX's pipeline takes its device from
            start = 0
            for chunk, text in tqdm(list(zip(chunks, texts)), desc="teacher draws the training latents",
                                    disable=not progress):
                where = execution_device(drawing)
                gens = [torch.Generator(where).manual_seed(spec.seed + start + k) for k in range(len(chunk))]
                embeds = {k: v.to(where) for k, v in text.items()}
                out = drawing(generator=gens, output_type="latent", max_sequence_length=max_len, **embeds,
                              **settings).images
                latents = family.pipeline_latents(pipe, out, height, width).float()
                _add(records, chunk, latents, text)
                start += len(chunk)
    else:
        ds = _load_image_dataset(spec)
        resolution = spec.resolution or generation.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
        with components_on(pipe, device, ENCODERS):
            for start in tqdm(range(0, len(ds), spec.batch_size), desc="encoding training images",
                              disable=not progress):
                rows = ds[start : start + spec.batch_size]
                latents = _encode_images(pipe, rows[spec.image_column], resolution)
                captions = [str(c) for c in rows[spec.caption_column]]
                _add(records, captions, latents, prompt_embeddings(pipe, captions, max_len))
    dataset = datasets.Dataset.from_dict(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = with_user_mode(tempfile.mkdtemp(prefix=f".{key}.", dir=path.parent))
    try:
        dataset.save_to_disk(str(tmp))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_cache(path), path


def _add(records, prompts, latents, text):
    for k in range(len(prompts)):
        records["latents"].append(latents[k].cpu().numpy())
        records["prompt_embeds"].append(text["prompt_embeds"][k].float().numpy())
        records["pooled_projections"].append(text["pooled_prompt_embeds"][k].float().numpy())
        records["prompt"].append(prompts[k])
