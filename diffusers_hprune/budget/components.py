"""The pipeline around the transformer: text encoders, VAE and tokenizer lengths, by model.

A pipeline folder (a toy, a downloaded model, one the project wrote) is read exactly: the
parameter count of every component from its safetensors headers (no weights are read), the VAE
config, the CLIP tokenizer's length. A built-in name or an uncached Hub id gets the published
components of its family: SD3 / SD3.5 take CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders
(with projections) and the T5 v1.1 XXL encoder; FLUX.1 takes CLIP ViT-L/14 and T5 v1.1 XXL;
both take a 16-channel VAE of the same layout.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_hprune.loading import TEXT_ENCODERS, pipeline_folder

# Parameter counts of the published components (the safetensors headers of the Hub checkpoints).
CLIP_L = 123_650_304  # CLIPTextModelWithProjection, ViT-L/14 (FLUX's CLIPTextModel: 123,060,480)
CLIP_G = 694_659_840 + 1280 * 1280  # OpenCLIP ViT-bigG/14 text model + projection
T5_XXL = 4_762_310_656  # T5EncoderModel, t5-v1_1-xxl
VAE = 83_653_863
PUBLISHED_PARAMS = {
    "sd3": {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL, "vae": VAE},
    "flux": {"text_encoder": 123_060_480, "text_encoder_2": T5_XXL, "vae": VAE},
}
_VAE_LAYOUT = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "mid_block_add_attention": True, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024,
}
PUBLISHED_VAE = {"sd3": dict(_VAE_LAYOUT, scaling_factor=1.5305, shift_factor=0.0609),
                 "flux": dict(_VAE_LAYOUT, scaling_factor=0.3611, shift_factor=0.1159)}


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
    """``(elements, bytes)`` of every tensor in the ``*.safetensors`` files of ``folder``, from their headers alone."""
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


def pipeline_parts(model, family: str) -> PipelineParts:
    """The components beside the transformer of ``model`` (folder, cached Hub id, toy name or built-in name)."""
    folder = pipeline_folder(model) if isinstance(model, (str, Path)) else None
    if folder is None or not (folder / "model_index.json").is_file():
        return PipelineParts(dict(PUBLISHED_PARAMS[family]), dict(PUBLISHED_VAE[family]),
                             {k: 2 * v for k, v in PUBLISHED_PARAMS[family].items()},
                             notes=["text encoders and VAE: the published sizes of the family's components"])
    params, stored = {}, {}
    for name in (*TEXT_ENCODERS, "vae", "transformer"):
        if (folder / name).is_dir():
            numel, nbytes = safetensors_sizes(folder / name)
            stored[name] = nbytes
            if name != "transformer":
                params[name] = numel
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    clip_length = 77
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    if tokenizer.is_file():
        clip_length = int(json.loads(tokenizer.read_text(encoding="utf-8")).get("model_max_length", 77))
    return PipelineParts(params, vae_config, stored, clip_length, str(folder))


__all__ = ["PUBLISHED_PARAMS", "PUBLISHED_VAE", "PipelineParts", "pipeline_parts", "safetensors_sizes"]
