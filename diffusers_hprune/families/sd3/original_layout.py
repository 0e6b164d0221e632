"""Stable Diffusion 3 / 3.5 in Stability AI's key layout (``sd3.5_large.safetensors``, the MMDiT of
``sd3_impls``): ``joint_blocks.N.x_block`` / ``.context_block`` with fused ``qkv``, ``x_embedder``,
``t_embedder``, ``y_embedder``, ``final_layer``, and a second image attention ``attn2`` in SD3.5 Medium's blocks.

Diffusers reads it back with ``SD3Transformer2DModel.from_single_file`` given the pruned model's config. ComfyUI
derives an MMDiT's depth from its width (hidden size / 64, ``comfy/model_detection.py``), so it would build the
unpruned depth: a pruned SD3 file is for readers that take a config (``tools_count_blocks=False``).
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
    halves_swapped,
    renamed,
)
from diffusers_hprune.utils.errors import PlanError

_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
}
_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The stock ``SD3Transformer2DModel``'s weights ``sd`` (its ``config``) under Stability's names.

    The last block is ``context_pre_only``: its text modulation computes two chunks, which Diffusers orders
    (scale, shift) and the original code (shift, scale), as in the final layer.
    """
    layers = int(config.get("num_layers", 18))
    if not layers:
        raise PlanError("The pruned model has no joint blocks left; there is nothing to write in SD3's layout. Make a "
                        "plan that keeps at least one block.")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    renamed(sd, _TOP, out, used)
    final_layer(sd, out, used)
    for i in range(layers):
        block, target = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        renamed(sd, {f"{block}.{k}": f"{target}.{v}" for k, v in _BLOCK.items()}, out, used)
        for name, parts in _FUSED.items():
            prefixes = tuple(f"{block}.{part}" for part in parts)
            for suffix in (".weight", ".bias"):
                if prefixes[0] + suffix in sd:
                    out[f"{target}.{name}{suffix}"] = fused(sd, prefixes, suffix)
                    used.update(prefix + suffix for prefix in prefixes)
        modulation = f"{block}.norm1_context.linear"
        for suffix in (".weight", ".bias"):
            rows = sd[modulation + suffix]
            out[f"{target}.context_block.adaLN_modulation.1{suffix}"] = halves_swapped(rows) if i == layers - 1 else rows
            used.add(modulation + suffix)
    check_all_used(sd, used, "SD3")
    return out


def architecture(config: Mapping[str, Any]) -> str:
    """The ModelSpec name of the SD3 model the (unpruned) config describes: SD3.5 Medium has dual-attention
    blocks, SD3.5 Large (and Large Turbo) normalises q and k, SD3 Medium neither."""
    if config.get("dual_attention_layers"):
        return "stable-diffusion-3.5-medium"
    return "stable-diffusion-3.5-large" if config.get("qk_norm") else "stable-diffusion-3-medium"


LAYOUT = OriginalLayout(
    to_original=to_original,
    architecture=architecture,
    implementation="https://github.com/Stability-AI/sd3.5",
    gguf_architecture="sd3",
    high_precision=("pos_embed", "x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "final_layer."),
    tools_count_blocks=False,
)

__all__ = ["LAYOUT", "architecture", "to_original"]
