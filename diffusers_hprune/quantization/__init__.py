"""Step 8 of Algorithm 1: W4A16 post-training quantisation, NF4 weights through bitsandbytes.

``quantize`` (:mod:`.nf4`) quantises a transformer in memory; ``quantize_pipeline``
(:mod:`.folder`) turns a pipeline folder into one with an NF4 transformer. The folder
function needs the pruned pipeline classes, so it is loaded on first use: importing
this package loads neither ``diffusers_hprune.pipelines`` nor Diffusers' pipelines.
"""

import importlib

from diffusers_hprune.quantization.nf4 import QuantizeError, default_compute_dtype, is_quantized, nf4_config, quantize
from diffusers_hprune.utils.nf4_cpu import cpu_nf4_loading


def __getattr__(name: str):
    if name in ("quantize_pipeline", "PROVENANCE_FILES"):
        return getattr(importlib.import_module("diffusers_hprune.quantization.folder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROVENANCE_FILES", "QuantizeError", "cpu_nf4_loading", "default_compute_dtype", "is_quantized",
           "nf4_config", "quantize", "quantize_pipeline"]
