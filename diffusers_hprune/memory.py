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

DTYPES = ("fp32", "bf16", "fp16", "nf4")
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
_NF4_TABLES = 16 * 4 + 256 * 4  # quant_map + nested_quant_map, float32

# Top-level modules kept in 16-bit by default when quantising (the input embedders, the
# output norm and projection): quantising them costs quality for little memory.
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
    """True when the parameter or module ``name`` lies under one of ``skip_modules``."""
    return any(name == s or name.startswith(s + ".") for s in skip_modules)


def model_weight_bytes(model, dtype: str, skip_modules=DEFAULT_SKIP_MODULES) -> int:
    """Weight bytes of ``model`` (works on the meta device) at ``dtype``."""
    import torch

    total = 0
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            quantizable = isinstance(module, torch.nn.Linear) and pname == "weight" and not is_skipped(full, skip_modules)
            total += param_bytes(p.numel(), dtype, quantizable)
    return total


def format_bytes(nbytes: int) -> str:
    """``"3.24 GB (3.02 GiB)"``."""
    return f"{nbytes / 1e9:.2f} GB ({nbytes / 2**30:.2f} GiB)"
