"""The pipeline around the transformer: text encoders, VAE and tokenizer lengths, by model.

A pipeline folder (a toy, a downloaded model, one the project wrote) is read exactly: the
parameter count of every component from its safetensors headers (no weights are read), the VAE
config, the CLIP tokenizer's length. A built-in name or an uncached Hub id gets the published
components of its family (``ModelFamily.published_components`` and ``published_vae_config``, in
the family's folder: e.g. SD3 / SD3.5 take CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders
with projections and the T5 v1.1 XXL encoder).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.base import ModelFamily
from diffusers_hprune.loading import TEXT_ENCODERS, check_pipeline_weights, check_weight_files, pipeline_folder
from diffusers_hprune.utils.checks import InputError, read_text_file


@dataclass
class PipelineParts:
    """What a stage loads beside the transformer: parameter counts per component, the VAE config, text lengths."""

    params: dict[str, int]
    vae_config: dict[str, Any]
    stored: dict[str, int] = field(default_factory=dict)
    """Bytes of each component's checkpoint files (the transformer's too, for a folder); default: 2 per parameter."""
    clip_length: int = 77
    source: str = "published"  # or the folder read
    notes: list[str] = field(default_factory=list)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)


def safetensors_sizes(folder: Path) -> tuple[int, int]:
    """``(elements, bytes)`` of every tensor in the ``*.safetensors`` files of ``folder``, from their headers alone
    (each file opened by safetensors first: a damaged or foreign one is a :class:`WeightFileError`)."""
    check_weight_files(folder, f"{folder.name} weights")
    total = nbytes = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
                start, end = entry["data_offsets"]
                nbytes += end - start
    return total, nbytes


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(read_text_file(path, what))
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"The {what} {path} is not valid JSON ({e}); download or save the pipeline again.") from None
    if not isinstance(data, dict):
        raise InputError(f"The {what} {path} is a JSON {type(data).__name__}, not an object; download or save the "
                         "pipeline again.")
    return data


def pipeline_parts(model, family: ModelFamily | str) -> PipelineParts:
    """The components beside the transformer of ``model`` (folder, cached Hub id, toy name or built-in name)."""
    folder = pipeline_folder(model) if isinstance(model, (str, Path)) else None
    if folder is None or not (folder / "model_index.json").is_file():
        return published_parts(get_family(family))
    return _folder_parts(folder)


def published_parts(family: ModelFamily) -> PipelineParts:
    """The components of the family's published pipeline, as its folder declares them."""
    if not family.published_components or not family.published_vae_config:
        raise InputError(f"The {family.name} family declares no published pipeline components (its "
                         "published_components and published_vae_config are empty), so the budget needs a pipeline "
                         "folder: give one whose model_index.json lists the text encoders and the VAE.")
    return PipelineParts(dict(family.published_components), dict(family.published_vae_config),
                         {k: 2 * v for k, v in family.published_components.items()},
                         notes=["text encoders and VAE: the published sizes of the family's components"])


def _folder_parts(folder: Path) -> PipelineParts:
    """The components of a pipeline folder, from its files' headers and configs."""
    check_pipeline_weights(folder)  # model_index.json, config sizes, every weights file opens: before reading them
    params, stored = {}, {}
    for name in (*TEXT_ENCODERS, "vae", "transformer"):
        if (folder / name).is_dir():
            numel, nbytes = safetensors_sizes(folder / name)
            stored[name] = nbytes
            if name != "transformer":
                params[name] = numel
    vae_config = _json_object(folder / "vae" / "config.json", "VAE config")
    if not (isinstance(vae_config.get("block_out_channels"), list) and 0 < len(vae_config["block_out_channels"]) <= 8):
        raise InputError(f"{folder / 'vae' / 'config.json'} has no block_out_channels list (1 to 8 entries) as an "
                         "AutoencoderKL config has; download or save the pipeline again.")
    clip_length = 77
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    if tokenizer.is_file():
        length = _json_object(tokenizer, "tokenizer config").get("model_max_length", 77)
        clip_length = length if isinstance(length, int) and 0 < length <= 4096 else 77
    return PipelineParts(params, vae_config, stored, clip_length, str(folder))


__all__ = ["PipelineParts", "pipeline_parts", "published_parts", "safetensors_sizes"]
