"""A family's original checkpoint layout: the key names its authors' code (and the tools built on it: ComfyUI,
Forge, stable-diffusion.cpp) reads in one single ``.safetensors`` file, and what GGUF files of it keep in high precision.

A family that can be written as a single file sets ``ModelFamily.original_layout`` to an :class:`OriginalLayout`
(``families/flux/original_layout.py``, ``families/sd3/original_layout.py``). Its ``to_original`` takes the weights
of the *stock* Diffusers model (a whole-block plan's stock export: blocks renumbered, counts reduced) to the
original names; Diffusers' own converters (``from_single_file``) take them back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffusers_hprune.utils.errors import PlanError


@dataclass(frozen=True)
class OriginalLayout:
    """How a family's stock weights are written in its authors' key layout.

    Attributes:
        to_original: ``(stock state dict, stock config) -> state dict in the original layout``; raises
            :class:`PlanError` for a model the layout's readers cannot take (say a FLUX model without
            single-stream blocks).
        architecture: ``(original config) -> the ModelSpec architecture name`` (``modelspec.architecture``, e.g.
            ``flux-1-schnell``) that single-file tools read from the file's metadata.
        implementation: the authors' reference code (``modelspec.implementation``).
        gguf_architecture: ``general.architecture`` of a GGUF file of the family (the community's name).
        high_precision: original key prefixes whose weights a GGUF file keeps unquantised (embedders, the final
            layer: few parameters, much effect), besides every tensor of fewer than two dimensions.
        tools_count_blocks: True when ComfyUI-style tools take the block counts from the file's keys (FLUX.1:
            ``double_blocks.N`` / ``single_blocks.N``), so a pruned file loads there as what it is; False when they
            derive the depth from the width (SD3's MMDiT: hidden size / 64) and would build the unpruned depth, so a
            pruned file is for readers given its config (Diffusers' ``from_single_file(config=...)``).
    """

    to_original: Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]]
    architecture: Callable[[Mapping[str, Any]], str]
    implementation: str
    gguf_architecture: str
    high_precision: tuple[str, ...]
    tools_count_blocks: bool


def halves_swapped(tensor: torch.Tensor) -> torch.Tensor:
    """The two halves of a modulation's output rows exchanged: Diffusers' ``AdaLayerNormContinuous`` computes
    (scale, shift) where the original final layers compute (shift, scale). Its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fused(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], suffix: str) -> torch.Tensor:
    """The rows of several projections stacked into one (the original layouts fuse q, k and v)."""
    return torch.cat([state_dict[prefix + suffix] for prefix in prefixes], dim=0)


def renamed(state_dict: Mapping[str, torch.Tensor], names: Mapping[str, str], out: dict[str, torch.Tensor],
            used: set[str]) -> None:
    """Copy each ``weight`` / ``bias`` (or plain tensor name) of ``names`` (stock prefix -> original prefix) present
    in ``state_dict`` into ``out`` under its original name, recording what was read in ``used``."""
    for stock, original in names.items():
        for suffix in ("", ".weight", ".bias"):
            if stock + suffix in state_dict:
                out[original + suffix] = state_dict[stock + suffix]
                used.add(stock + suffix)


def final_layer(state_dict: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor], used: set[str]) -> None:
    """The output layers both MMDiT layouts name alike: ``proj_out`` as ``final_layer.linear``, and ``norm_out``'s
    modulation (Diffusers: scale, shift) as ``final_layer.adaLN_modulation.1`` (original: shift, scale)."""
    renamed(state_dict, {"proj_out": "final_layer.linear"}, out, used)
    for suffix in (".weight", ".bias"):
        out["final_layer.adaLN_modulation.1" + suffix] = halves_swapped(state_dict["norm_out.linear" + suffix])
        used.add("norm_out.linear" + suffix)


def check_all_used(state_dict: Mapping[str, torch.Tensor], used: set[str], family: str) -> None:
    """Refuse weights the layout has no name for (a component left inside a block, a quantisation's extra tensors)."""
    left = sorted(set(state_dict) - used)
    if left:
        raise PlanError(f"{len(left)} weights have no name in the original {family} layout ({', '.join(left[:4])}"
                        f"{' ...' if len(left) > 4 else ''}); the single-file layout holds the stock model of a "
                        "whole-block plan in 16 or 32 bits. Export this folder with --format remote instead.")


__all__ = ["OriginalLayout", "check_all_used", "final_layer", "fused", "halves_swapped", "renamed"]
