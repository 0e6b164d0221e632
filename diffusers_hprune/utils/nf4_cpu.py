"""Correct 4-bit (NF4 / FP4) dequantisation on the CPU, whatever the processor.

bitsandbytes computes a 4-bit layer on the CPU by dequantising its weight with the
``bitsandbytes::dequantize_4bit`` operator. The CPU kernel it registers for that operator
calls a native routine that, on processors with AVX-512, returns wrong weights when the
weight's last dimension is not a multiple of the 64-element block (bitsandbytes 0.49 and
0.50; the toys are 96 wide: 25 % relative weight error instead of NF4's 9 %). The same
kernel is right on other processors, so a model's outputs depended on the CPU it ran on.
docs/nf4-cpu.md has the reproduction.

:func:`install_cpu_dequantize` replaces that CPU kernel, for the whole process, with one
that is exact for every shape and the same on every processor: bitsandbytes' own generic
(pure torch) dequantisation, the path its CPU kernel itself takes for odd widths, or, in a
bitsandbytes without it, :func:`dequantize_4bit` (the same computation written here: a
256-entry table of the two codes in each byte, then one scale per block; tested bit for bit
against bitsandbytes' generic path). Both equal the native kernel's output where the latter
is right. GPU kernels are untouched.

:func:`keep_cpu_layout` keeps bitsandbytes' AVX512-BF16 inference path (which re-packs a
layer's weight on its first CPU call, absmax reshaped to one scale per row and block) off
every 4-bit layer: it fails on layers whose ``in_features`` is not a multiple of the block
size or whose ``out_features`` is not a multiple of 32, and on the others its numbers differ
from every other processor's and do not survive ``save_pretrained`` (which packs the weight
back, changing its quantisation state), so a model computed other outputs after being saved.

:func:`cpu_nf4_loading` lets Diffusers' loader read pre-quantised NF4 weights, and quantise 16-bit ones
while it loads them, on a machine without a GPU (Diffusers' 4-bit quantizer refuses to start there;
bitsandbytes runs NF4 on the CPU).

Importing this module imports nothing but torch (and the tensor counter of :mod:`.live_memory`); bitsandbytes and Diffusers' quantizer are
imported when used. It knows nothing of the project's models, so the pruned model classes
(below every stage) and the quantisation stage both use it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import threading
import warnings
from collections.abc import Sequence

import torch

from diffusers_hprune.utils.compat import bitsandbytes_generic_dequantize
from diffusers_hprune.utils.live_memory import LiveTensorBytes

_lock = threading.Lock()
_library = None  # the torch.library.Library holding our CPU kernel, once installed
_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _HUB_KERNEL_NOTICE not in record.getMessage()


def import_bitsandbytes():
    """``bitsandbytes``, imported without fetching code from the Hugging Face Hub.

    On a processor with AVX512-BF16, importing bitsandbytes 0.50 calls ``kernels.get_kernel`` to download
    and run ``kernels-community/quantization-bitsandbytes`` (a CPU matmul for the re-packed layout that
    :func:`keep_cpu_layout` keeps off every layer anyway), and logs a warning when that fails, as it does
    offline or without trust: a network request and, where it succeeds, Hub code run at import. While this
    imports bitsandbytes, ``kernels`` cannot be imported (bitsandbytes falls back to its own kernels, as it
    does without the package) and that one warning is dropped. Once imported, bitsandbytes is returned as it is.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice = _DropHubKernelNotice()
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    logger.addFilter(notice)
    try:
        import bitsandbytes
    finally:
        logger.removeFilter(notice)
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return bitsandbytes


@functools.cache
def _code(quant_type: str) -> torch.Tensor:
    """The 16 values of a 4-bit code (bitsandbytes' table), float32 on the CPU."""
    from bitsandbytes.functional import get_4bit_type

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"Unknown 4-bit quantisation type {quant_type!r}; bitsandbytes knows 'nf4' and 'fp4'.")
    return get_4bit_type(quant_type, device="cpu").float()


@functools.cache
def _pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) float32: the codes of the high and the low nibble of every byte value."""
    code, byte = _code(quant_type), torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()


def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The weight of ``shape`` held in the packed 4-bit codes ``A`` (two a byte, high nibble first).

    The codes are read in storage order, ``blocksize`` of them share one scale ``absmax[i]``,
    and a last, shorter block takes the last scale: the layout ``bitsandbytes.functional.quantize_4bit``
    writes. Computed in float32, returned in ``dtype``. The signature is the operator's.
    """
    n = math.prod(shape)
    codes = A.reshape(-1)
    if codes.dtype != torch.uint8:  # another quant_storage: the same bytes
        codes = codes.view(torch.uint8)
    if codes.numel() * 2 < n:
        raise ValueError(f"{codes.numel()} bytes of 4-bit codes cannot hold a weight of shape {tuple(shape)}.")
    values = torch.nn.functional.embedding(codes.long(), _pair_table(quant_type).to(codes.device)).reshape(-1)[:n]
    scales = absmax.reshape(-1).float()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    if full:
        torch.mul(values[:full].view(-1, blocksize), scales[: full // blocksize, None],
                  out=out[:full].view(-1, blocksize))
    if full < n:
        torch.mul(values[full:], scales[full // blocksize], out=out[full:])
    return out.view(*shape).to(dtype)


@functools.cache
def _code_on(quant_type: str, device: str) -> torch.Tensor:
    return _code(quant_type).to(device)


def _cpu_kernel(generic):
    if generic is None:
        return dequantize_4bit

    def kernel(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
               shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        packed = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return generic(packed.reshape(-1), absmax, _code_on(quant_type, str(packed.device)), blocksize, shape, dtype)

    return kernel


def cpu_dequantize(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
                   dtype: torch.dtype) -> torch.Tensor:
    """The computation :func:`install_cpu_dequantize` installs as the CPU kernel, callable directly (meta tensors too)."""
    return _cpu_kernel(bitsandbytes_generic_dequantize())(A, absmax, blocksize, quant_type, shape, dtype)


def cpu_dequantize_bytes(shape: Sequence[int], quant_type: str = "nf4", blocksize: int = 64) -> int:
    """Most bytes the CPU dequantisation of one 4-bit weight of ``shape`` holds at once, its fp32 output included.

    Traced on the meta device through the computation :func:`install_cpu_dequantize` installs
    (bitsandbytes' generic path holds int32 codes and their fp32 values together: twice the fp32
    weight), so a budget counts what a CPU call of a 4-bit layer really holds.
    """
    n = math.prod(shape)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device="meta")
    absmax = torch.empty(math.ceil(n / blocksize), device="meta")
    _code_on(quant_type, "meta"), _pair_table(quant_type)  # the code tables exist before: not the weight's
    counter = LiveTensorBytes([packed, absmax])
    with torch.compiler.set_stance("force_eager"), counter:
        cpu_dequantize(packed, absmax, blocksize, quant_type, tuple(shape), torch.float32)
    return counter.peak


def install_cpu_dequantize() -> bool:
    """Replace bitsandbytes' CPU kernel of ``bitsandbytes::dequantize_4bit`` in this process (see the module).

    Idempotent and thread-safe; called by the project's quantisation and CPU loading paths.
    Returns True when our kernel is in place, False (with a warning saying what to do) when
    this torch refuses to override a kernel registered from Python.
    """
    global _library
    if _library is not None:
        return True
    with _lock:
        if _library is not None:
            return True
        import_bitsandbytes()  # registers its own kernels first, so ours comes after them

        library = torch.library.Library("bitsandbytes", "IMPL")
        try:
            with warnings.catch_warnings():  # torch says it overrides bitsandbytes' kernel: that is the point
                warnings.simplefilter("ignore")
                library.impl("dequantize_4bit", _cpu_kernel(bitsandbytes_generic_dequantize()), "CPU")
        except RuntimeError as e:
            warnings.warn(
                f"diffusers-hprune could not replace bitsandbytes' CPU 4-bit dequantisation kernel ({e}). On a "
                "processor with AVX-512, NF4 layers whose input width is not a multiple of 64 may compute wrong "
                "outputs on the CPU; install a torch whose torch.library allows the override (2.13 does).",
                RuntimeWarning, stacklevel=2)
            return False
        _library = library
    return True


def keep_cpu_layout(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' AVX512-BF16 re-packing off every 4-bit layer of ``model`` (see the module).

    Returns how many layers were excluded.
    """
    bnb = import_bitsandbytes()
    excluded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            excluded += 1
    return excluded


def compute_in_fp32_on_cpu(model: torch.nn.Module) -> int:
    """Make the CPU-resident 4-bit layers of ``model`` compute in float32; returns how many.

    A checkpoint records the compute dtype of the GPUs it is published to (bf16). On a CPU the
    layers compute in float32, as before that dtype was recorded: CPU bf16 matmuls are slow on
    most processors and change the numbers a CPU run gives.
    """
    bnb = import_bitsandbytes()
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            module.compute_dtype = torch.float32
            module.compute_type_is_set = True
            changed += 1
    return changed


# -- loading on a machine without a GPU
def accelerator_available() -> bool:
    """True where a CUDA or XPU device computes."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _cpu_quantizer_class():
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    class CPUBnB4BitQuantizer(BnB4BitDiffusersQuantizer):
        """Diffusers' 4-bit quantizer, allowed on the CPU: it reads pre-quantised weights, or quantises 16-bit ones
        as they load (bitsandbytes quantises on the CPU; ``quantize()`` takes the same steps)."""

        def validate_environment(self, *args, **kwargs):
            return None  # Diffusers' check is "a GPU is there": here bitsandbytes' CPU kernels compute

        def update_device_map(self, device_map):
            return device_map if device_map is not None else {"": "cpu"}

        def update_torch_dtype(self, torch_dtype):
            return torch.float32 if torch_dtype is None else torch_dtype

    return CPUBnB4BitQuantizer


@contextlib.contextmanager
def cpu_nf4_loading():
    """Within the block, Diffusers loads bitsandbytes 4-bit models on a machine without a GPU.

    Diffusers' 4-bit quantizer refuses to run without a GPU; bitsandbytes runs NF4 on the CPU. Both
    pre-quantised weights and ``quantization_config=`` on a 16-bit checkpoint (quantised as it loads,
    as ``hprune distill --teacher_4bit`` loads its teacher) then load on the CPU. On a machine with a
    GPU nothing changes. On every machine it first installs the project's CPU 4-bit dequantisation
    kernel (:func:`install_cpu_dequantize`).
    """
    install_cpu_dequantize()
    if accelerator_available():
        yield
        return
    from diffusers.quantizers import auto

    key = "bitsandbytes_4bit"
    previous = auto.AUTO_QUANTIZER_MAPPING[key]
    auto.AUTO_QUANTIZER_MAPPING[key] = _cpu_quantizer_class()
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING[key] = previous


__all__ = ["accelerator_available", "compute_in_fp32_on_cpu", "cpu_nf4_loading", "dequantize_4bit", "install_cpu_dequantize", "keep_cpu_layout"]
