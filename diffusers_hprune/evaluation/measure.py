"""Measured cost of a transformer: weight bytes, peak memory and latency of one denoising step.

* ``step_inputs(pipe, ...)``: the transformer's inputs for one denoising step of ``pipe`` at a
  given resolution (text encoded once; random latents), so teacher and student are timed on
  the same inputs.
* ``stored_bytes(transformer)``: bytes of every tensor the model holds (parameters, buffers and
  bitsandbytes' quantisation state), i.e. what its weights occupy in memory.
* ``step_memory(transformer, inputs)``: peak memory of one step: the transformer's weights
  (``stored_bytes``) plus what the step allocates at its peak. CUDA: ``max_memory_allocated``
  during the step less what was allocated before it (so neither another model on the same GPU
  nor the text encoders count). CPU: :func:`live_tensor_peak`, the most bytes
  of tensors the step holds at once, counted per storage from every operation's outputs. (The
  process's peak resident size, used before, did not grow during a warm step: the allocator
  reuses what the warm-up freed, so activations went missing from the figure.)
* ``step_latency(transformer, inputs, warmup=2, repeats=10)``: wall time of each step after
  ``warmup`` untimed steps (CUDA synchronised), summarised as median and spread.
* ``step_flops(transformer, inputs)``: the FLOPs of one step of the model's architecture (its plan, dense
  weights), counted on the meta device: the same for every quantised kind of one model, so a latency can be read
  beside the FLOP bound of the pruning (the latency the FLOP reduction alone would give).
* ``device_description(device)``: the line a table gives about where its latencies were measured.
"""

from __future__ import annotations

import statistics
import time

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.loading import generation_settings
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.live_memory import LiveTensorBytes


class MeasureError(HPruneError):
    """A measurement that cannot be taken here."""


@torch.no_grad()
def step_inputs(pipe, prompt: str = "a photo of a cat", *, height: int | None = None, width: int | None = None,
                batch_size: int = 1, guidance_scale: float | None = None, seed: int = 0) -> dict:
    """Keyword arguments of ``pipe.transformer`` for one denoising step (noise level 0.5)."""

    transformer = pipe.transformer
    family = get_family(transformer)
    settings = generation_settings(pipe, None, height, width, guidance_scale)
    sample = int(getattr(transformer.config, "sample_size", 128) or 128)
    height = settings.get("height") or sample * pipe.vae_scale_factor
    width = settings.get("width") or sample * pipe.vae_scale_factor
    text = family.encode_text(pipe, [prompt] * batch_size, int(settings.get("max_sequence_length", 256)))
    device = next(transformer.parameters()).device
    dtype = compute_dtype(transformer)
    channels = pipe.vae.config.latent_channels
    latents = torch.randn(batch_size, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor,
                          generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    sigmas = torch.full((batch_size,), 0.5, device=device, dtype=dtype)
    text = {k: v.to(device, dtype) for k, v in text.items()}
    return family.denoiser_inputs(transformer, latents, sigmas, text, guidance_scale)


def compute_dtype(transformer) -> torch.dtype:
    """The dtype activations enter in: that of the model's floating parameters (4-bit weights are uint8)."""
    return next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass that flattens into inner tensors (torchao's ``Int8Tensor``: int8 data
    and scales) holds those, not its logical dtype's."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(_tensor_bytes(inner) for name in names if isinstance(inner := getattr(data, name, None), torch.Tensor))
    return t.numel() * t.element_size()


def stored_bytes(transformer: torch.nn.Module) -> int:
    """Bytes of the tensors the model holds: parameters, buffers, bitsandbytes' quantisation state and the inner
    tensors of torchao's quantised weights."""
    total = 0
    seen = set()
    for t in list(transformer.parameters()) + list(transformer.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def logical_params(transformer: torch.nn.Module) -> int:
    """Parameter count as the unquantised model would have it (a 4-bit weight stores two values a byte)."""
    import math

    total = 0
    for p in transformer.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def _quant_state_bytes(state) -> int:
    total = 0
    for name in ("absmax", "code"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def step_latency(transformer: torch.nn.Module, inputs: dict, warmup: int = 2, repeats: int = 10) -> dict:
    """Seconds per denoising step: ``median``, ``min``, ``max``, ``stdev``, ``iqr`` and every timing (``times``)."""
    if repeats < 1:
        raise MeasureError(f"repeats must be at least 1, got {repeats}.")
    device = next(transformer.parameters()).device
    for _ in range(warmup):
        transformer(**inputs, return_dict=False)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        transformer(**inputs, return_dict=False)
        _sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "stdev": statistics.stdev(times) if len(times) >= 2 else 0.0, "iqr": q[2] - q[0], "warmup": warmup,
            "repeats": repeats, "times": times}


@torch.no_grad()
def step_memory(transformer: torch.nn.Module, inputs: dict) -> dict:
    """Peak memory of one denoising step (bytes) and how it was measured; see the module docstring."""
    device = next(transformer.parameters()).device
    weights = stored_bytes(transformer)
    transformer(**inputs, return_dict=False)  # warm-up: kernels, allocator pools
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        transformer(**inputs, return_dict=False)
        torch.cuda.synchronize(device)
        step = torch.cuda.max_memory_allocated(device) - before
        return {"peak": weights + step, "weights": weights, "step": step,
                "method": "cuda: weights (stored_bytes) + max_memory_allocated during the step less what was before"}
    step = live_tensor_peak(transformer, inputs)
    return {"peak": weights + step, "weights": weights, "step": step,
            "method": "cpu: weights (stored_bytes) + the peak of the tensors the step holds at once"}


@torch.no_grad()
def live_tensor_peak(module: torch.nn.Module, inputs: dict) -> int:
    """The most bytes of tensors one call of ``module(**inputs)`` holds at once, beyond its weights and inputs.

    Every tensor an operation returns is counted once per storage, from its creation until the
    last tensor on that storage is gone. This counts what a step allocates (its activations,
    the output included), independent of the allocator's caching, so it is the same on every
    CPU; allocator slack comes on top on a real device.
    """
    counter = LiveTensorBytes([*module.parameters(), *module.buffers(), inputs])
    # Compiled kernels (bitsandbytes compiles its dequantisation) run eagerly here, so every op is seen once.
    with torch.compiler.set_stance("force_eager"), counter:
        out = module(**inputs, return_dict=False)
    del out
    return counter.peak


@torch.no_grad()
def step_flops(transformer: torch.nn.Module, inputs: dict) -> int | None:
    """FLOPs of one call of ``transformer``'s architecture on ``inputs``' shapes (``torch.utils.flop_counter``), or
    ``None`` when it cannot be rebuilt on the meta device. The model is rebuilt from its config without any
    ``quantization_config``, so an NF4 or int8 model counts the matmuls it computes, as its 16-bit self does. On the
    meta device attention runs as its two batched matmuls and is counted; counted on a CPU run it would be missing
    (the CPU's fused attention kernel has no FLOP formula in torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in transformer.config.items() if k != "quantization_config"}
    try:
        with torch.device("meta"):
            dense = type(transformer).from_config(config)
        meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with FlopCounterMode(display=False) as counter:
            dense(**meta, return_dict=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # an op without a meta kernel
        return None
    return int(counter.get_total_flops())


def device_description(device: torch.device | str) -> str:
    """``cuda: NVIDIA H100 80GB HBM3 (torch 2.x, CUDA 12.x)`` or ``cpu: <processor>, N cores, T threads (torch 2.x)``."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return (f"cuda: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{device.type}: {name}, {os.cpu_count()} cores, {threads} thread{'' if threads == 1 else 's'} "
            f"(torch {torch.__version__})")


__all__ = ["MeasureError", "device_description", "step_flops", "live_tensor_peak", "logical_params", "step_inputs", "step_latency", "step_memory",
           "stored_bytes"]
