"""Float64 copies of tensors on any device (Apple's MPS has no float64)."""

from __future__ import annotations

import torch


def float64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as float64: on its own device where that device has float64, else on the CPU.

    Digests and checksums sum in float64 so that they are the same on every device; on MPS (which
    Accelerate picks by default on a Mac) ``.double()`` fails, so the sum is taken on the CPU.
    """
    if tensor.device.type == "mps":
        return tensor.detach().to("cpu", torch.float64)
    return tensor.detach().double()


__all__ = ["float64"]
