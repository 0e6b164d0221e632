"""FLUX.1 in Black Forest Labs' key layout (``flux1-schnell.safetensors``): ``double_blocks.N`` with fused
``qkv`` per stream, ``single_blocks.N`` with q, k, v and the MLP input fused in ``linear1``, ``final_layer``.

Diffusers reads it back with ``FluxTransformer2DModel.from_single_file``; ComfyUI counts the double- and single-stream
blocks in the file's keys (``comfy/model_detection.py``), so it loads a pruned file as the model it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusers_hprune.architecture.original import (
    OriginalLayout,
    check_all_used,
    final_layer,
    fused,
    renamed,
)
from diffusers_hprune.utils.errors import PlanError

_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
# RMSNorm weights are called "scale" in the original code.
_SCALES = ("query_norm.weight", "key_norm.weight")


def _fuse(sd: Mapping[str, torch.Tensor], block: str, parts: tuple[str, ...], target: str,
          out: dict[str, torch.Tensor], used: set[str]) -> None:
    prefixes = tuple(f"{block}.{part}" for part in parts)
    for suffix in (".weight", ".bias"):
        out[target + suffix] = fused(sd, prefixes, suffix)
        used.update(prefix + suffix for prefix in prefixes)


def to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The stock ``FluxTransformer2DModel``'s weights ``sd`` (its ``config``) under BFL's names."""
    doubles, singles = int(config.get("num_layers", 19)), int(config.get("num_single_layers", 38))
    if not doubles or not singles:
        raise PlanError(f"The pruned model has {doubles} double-stream and {singles} single-stream blocks; FLUX.1's "
                        "single-file readers (Diffusers' converter, ComfyUI) need at least one of each. Export it with "
                        "--format stock or --format remote, or make a plan that keeps a block of each kind.")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    renamed(sd, _TOP, out, used)
    final_layer(sd, out, used)
    for i in range(doubles):
        block = f"transformer_blocks.{i}"
        renamed(sd, {f"{block}.{k}": f"double_blocks.{i}.{v}" for k, v in _DOUBLE.items()}, out, used)
        _fuse(sd, block, ("attn.to_q", "attn.to_k", "attn.to_v"), f"double_blocks.{i}.img_attn.qkv", out, used)
        _fuse(sd, block, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), f"double_blocks.{i}.txt_attn.qkv",
              out, used)
    for i in range(singles):
        block = f"single_transformer_blocks.{i}"
        renamed(sd, {f"{block}.{k}": f"single_blocks.{i}.{v}" for k, v in _SINGLE.items()}, out, used)
        _fuse(sd, block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), f"single_blocks.{i}.linear1", out, used)
    check_all_used(sd, used, "FLUX.1")
    return {(k[: -len("weight")] + "scale" if k.endswith(_SCALES) else k): v for k, v in out.items()}


def architecture(config: Mapping[str, Any]) -> str:
    """FLUX.1 [dev] embeds its distilled guidance; [schnell] does not."""
    return "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"


LAYOUT = OriginalLayout(
    to_original=to_original,
    architecture=architecture,
    implementation="https://github.com/black-forest-labs/flux",
    gguf_architecture="flux",
    high_precision=("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    tools_count_blocks=True,
)

__all__ = ["LAYOUT", "architecture", "to_original"]
