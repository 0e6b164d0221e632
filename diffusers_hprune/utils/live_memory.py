"""Bytes of the tensors a piece of code holds at once, counted from every operation's outputs.

* :class:`LiveTensorBytes`: a ``TorchDispatchMode`` that counts each tensor storage an
  operation creates from its creation until the last tensor on it is gone, and keeps the peak.
  It works on real devices (``evaluation.measure.step_memory`` on a CPU) and on the meta
  device, where nothing is allocated: running the real model code on meta tensors gives the
  exact bytes it would hold, at any size (the budget, :mod:`diffusers_hprune.budget`).
* :func:`fused_attention_on_meta`: on the meta device PyTorch's ``scaled_dot_product_attention``
  falls back to the unfused math kernel (a ``tokens x tokens`` score matrix per head); on a GPU
  (flash / memory-efficient) and on a CPU (flash for CPU) the models here run a fused kernel
  that keeps only the output and one float32 log-sum-exp per query. Within the context, meta
  calls without a mask go to the fused kernel's meta implementation, so traces hold what the
  devices hold.
* :func:`process_memory` and :func:`reset_peak_rss`: this process's resident size and its peak
  (Linux ``/proc/self``), for measuring what a stage really took on a CPU.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from diffusers_hprune.utils.compat import TorchDispatchMode, meta_flash_attention, storage_identity, tree_leaves


def storage_key(tensor: torch.Tensor) -> int:
    """An identity of the tensor's storage, valid on every device (the meta device included)."""
    return storage_identity(tensor)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created while active, and their peak while alive at once.

    ``exclude``: tensors that existed before (weights, inputs); their storages are never counted.
    ``current`` is what is alive now, ``peak`` the most at once since entering (or :meth:`reset_peak`).
    """

    def __init__(self, exclude: Iterable = ()):
        super().__init__()
        self.known = {storage_key(t) for t in tree_leaves(list(exclude)) if isinstance(t, torch.Tensor)}
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive on it]
        self.current = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key, nbytes = storage_identity(tensor), tensor.untyped_storage().nbytes()
            if key in self.known or not nbytes:
                continue
            entry = self.live.get(key)
            if entry is None:
                self.live[key] = entry = [nbytes, 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Within the block, ``scaled_dot_product_attention`` on meta tensors (no mask) runs the fused kernel's meta version.

    The function is replaced on ``torch.nn.functional`` for the duration (Diffusers looks it up
    at every call), so recomputation under gradient checkpointing sees it too. Not thread-safe.
    """
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == "meta" and attn_mask is None and not enable_gqa:
            return meta_flash_attention(query, key, value, dropout_p, is_causal, scale)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def process_memory(field: str = "VmRSS") -> int:
    """Bytes of a field of ``/proc/self/status``: ``VmRSS`` (resident now) or ``VmHWM`` (its peak); Linux only."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        raise OSError("process memory is read from /proc/self/status, which this system lacks (Linux only).") from None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no field {field!r}; use VmRSS or VmHWM.")


def reset_peak_rss() -> None:
    """Reset this process's peak resident size (``VmHWM``) to its current size (Linux ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


__all__ = ["LiveTensorBytes", "fused_attention_on_meta", "process_memory", "reset_peak_rss", "storage_key"]
