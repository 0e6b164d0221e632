"""The budget's units and terms shared by every stage: bytes per dtype, the cards, one stage's budget, phases.

A stage runs in phases; its peak is the largest phase, on the device and on the host separately (on a CPU the device
is the host: one column).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.sizes import is_skipped
from diffusers_hprune.distillation.saving import MAX_SHARD_SIZE
from diffusers_hprune.utils.nf4_cpu import cpu_dequantize_bytes

GIB = 2**30
CARDS_GIB = (16, 24, 48, 80)
CUDA_RESERVE = GIB  # CUDA context and allocator slack, on top of the predicted peak
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

@dataclass
class StageBudget:
    """One stage's predicted peak: the terms alive at the device's peak and at the host's peak (bytes)."""

    stage: str
    device: dict[str, int]
    host: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    def fits(self) -> dict[int, bool]:
        """Card size (GiB) -> whether the device peak, plus 1 GiB of CUDA context and slack, fits it."""
        return {gib: self.device_peak + CUDA_RESERVE <= gib * GIB for gib in CARDS_GIB}

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "device_peak": self.device_peak, "host_peak": self.host_peak,
                "device": dict(self.device), "host": dict(self.host),
                "fits": {f"{k} GB": v for k, v in self.fits().items()}, "notes": list(self.notes)}


def merge_on_cpu(where: str, device: dict[str, int], host: dict[str, int]) -> tuple[dict, dict]:
    """On a CPU the device is the host: one column."""
    if where == "cpu":
        return {**device, **{k: v for k, v in host.items() if k not in device}}, {}
    return device, host


def peak_phase(where: str, phases: list[tuple[str, dict[str, int], dict[str, int]]]):
    """The phase with the largest device peak, and the one with the largest host peak (``where``: the device)."""
    merged = [(name, *merge_on_cpu(where, d, h)) for name, d, h in phases]
    dev = max(merged, key=lambda p: sum(p[1].values()))
    host = max(merged, key=lambda p: sum(p[2].values()))
    return dev, host


def nf4_working_bytes(model: torch.nn.Module, device: str) -> int:
    """One quantised linear weight of ``model`` (on meta) dequantised for its matmul, the largest: its 16-bit copy on a
    GPU; on a CPU what the CPU dequantisation holds at once (traced: int32 codes beside their fp32 values)."""
    skip = get_family(model).default_nf4_skip_modules
    shapes = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not is_skipped(name, skip)]
    if not shapes:
        return 0
    largest = max(shapes, key=math.prod)
    return cpu_dequantize_bytes(largest) if device == "cpu" else 2 * math.prod(largest)



def optimizer_state_bytes(trainable: int, use_8bit_adam: bool = False) -> int:
    """AdamW's state for ``trainable`` parameters: two fp32 moments, or bitsandbytes' two 8-bit moments plus one
    fp32 scale per block of 2048 values for each."""
    if use_8bit_adam:
        return 2 * trainable + 2 * 4 * math.ceil(trainable / 2048)
    return 8 * trainable


#: The shard size ``hprune distill`` writes its student in (Diffusers' default ``max_shard_size``, 10GB).
SHARD_BYTES = MAX_SHARD_SIZE


def shard_bytes(total: int) -> int:
    return min(total, SHARD_BYTES)



__all__ = ["CARDS_GIB", "CUDA_RESERVE", "DTYPE_BYTES", "GIB", "SHARD_BYTES", "StageBudget", "merge_on_cpu",
           "nf4_working_bytes", "optimizer_state_bytes", "peak_phase", "shard_bytes"]
