"""Analytic weight bytes for the dtypes the method uses: fp32, bf16, fp16 and NF4 (W4A16).

NF4 follows bitsandbytes' 4-bit format with double quantisation (DESIGN.md section 6,
step 8): every ``nn.Linear`` weight outside the skip list is stored as packed 4-bit
codes (``ceil(n / 2)`` bytes) plus its quantisation state: one 8-bit absmax per block of
64 weights, one float32 absmax per 256 of those blocks (the nested quantisation), the
16-entry NF4 code table and the 256-entry nested code table (float32 each). Everything
else (biases, norms, embeddings, the skip list) stays 16-bit. The figures count weights
only: activations, the CUDA context and allocator slack come on top (measured peaks are
reported separately by the benchmarks).
"""

from __future__ import annotations

import math

from diffusers_hprune.architecture import get_family
from diffusers_hprune.utils.compat import persistent_buffer
from diffusers_hprune.utils.errors import UnsupportedModelError

DTYPES = ("fp32", "bf16", "fp16", "nf4")
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
_NF4_TABLES = 16 * 4 + 256 * 4  # quant_map + nested_quant_map, float32

# Modules kept in 16-bit when quantising, unless the family says otherwise (the input
# embedders, the output norm and projection): quantising them costs quality for little memory.
# Each family's own list is ``family.default_nf4_skip_modules``.
DEFAULT_SKIP_MODULES = (
    "pos_embed",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "norm_out",
    "proj_out",
)


def nf4_weight_bytes(numel: int, tables: bool = True) -> int:
    """Bytes of one NF4 linear weight of ``numel`` elements with double quantisation."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    nbytes = math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
    return nbytes + (_NF4_TABLES if tables else 0)


def param_bytes(numel: int, dtype: str, quantizable: bool = False, tables: bool = True) -> int:
    """Bytes of a parameter of ``numel`` elements at ``dtype``.

    For ``nf4`` only ``quantizable`` parameters (linear weights outside the skip list)
    are 4-bit; the rest stay at 16 bits. ``tables=False`` counts a slice of a weight
    (no quantisation tables of its own).
    """
    if dtype == "nf4":
        return nf4_weight_bytes(numel, tables) if quantizable else 2 * numel
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"Unknown weight dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return BYTES_PER_PARAM[dtype] * numel


def is_skipped(name: str, skip_modules=DEFAULT_SKIP_MODULES) -> bool:
    """True when the linear layer ``name`` (a dotted module path) stays 16-bit under ``skip_modules``.

    The rule of Diffusers' bitsandbytes loader: the layer's own name is listed, or a listed
    name is the path or one of its leading parts.
    """
    own = name.rsplit(".", 1)[-1]
    return own in skip_modules or any(name == s or f"{s}." in f"{name}." for s in skip_modules)


def _stored_tensors(model, skip_modules):
    """``(numel, quantizable, fixed element size)`` of every parameter and persistent buffer a checkpoint
    stores; the size is None for floating tensors (their bytes depend on the dtype)."""
    import torch

    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            quantizable = isinstance(module, torch.nn.Linear) and pname == "weight" and not is_skipped(module_name,
                                                                                                        skip_modules)
            yield p.numel(), quantizable, None
        for bname, b in module.named_buffers(recurse=False):
            if b is None or not persistent_buffer(module, bname):
                continue
            yield b.numel(), False, None if b.is_floating_point() else b.element_size()


def model_weight_bytes(model, dtype: str, skip_modules=None) -> int:
    """Weight bytes of ``model`` (works on the meta device) at ``dtype``: parameters and the
    persistent buffers a checkpoint stores (e.g. SD3's positional-embedding table).

    ``skip_modules``: kept 16-bit under ``nf4`` (default: the model family's list, else
    ``DEFAULT_SKIP_MODULES``).
    """
    if skip_modules is None:
        skip_modules = _family_skip_modules(model)
    return sum(numel * size if size else param_bytes(numel, dtype, quantizable)
               for numel, quantizable, size in _stored_tensors(model, skip_modules))


def unquantized_bytes(model, skip_modules=None) -> int:
    """Bytes of what stays 16-bit when ``model`` is stored in NF4: biases, norms, embeddings, the
    modules of the skip list and the persistent buffers (``skip_modules`` as in :func:`model_weight_bytes`)."""
    if skip_modules is None:
        skip_modules = _family_skip_modules(model)
    return sum(numel * size if size else 2 * numel
               for numel, quantizable, size in _stored_tensors(model, skip_modules) if not quantizable)


def _family_skip_modules(model) -> tuple[str, ...]:
    try:
        return get_family(model).default_nf4_skip_modules
    except UnsupportedModelError:
        return DEFAULT_SKIP_MODULES


def format_bytes(nbytes: int) -> str:
    """``"3.24 GB (3.02 GiB)"``."""
    return f"{nbytes / 1e9:.2f} GB ({nbytes / 2**30:.2f} GiB)"
