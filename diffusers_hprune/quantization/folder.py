"""``quantize_pipeline``: a pipeline folder in, the same pipeline with an NF4 transformer out (``hprune quantize``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffusers_hprune.pipelines.pruned import with_pruned_transformer
from diffusers_hprune.quantization.nf4 import QuantizeError, is_quantized, quantize
from diffusers_hprune.utils.fileio import atomic_directory
from diffusers_hprune.utils.nf4_cpu import accelerator_available

# Records of how a pipeline folder was made, copied into its quantised version.
PROVENANCE_FILES = ("distill_summary.json",)


def quantize_pipeline(source: str | os.PathLike, output_dir: str | os.PathLike, *, skip_modules=None,
                      compute_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.bfloat16,
                      overwrite: bool = False) -> Path:
    """Quantise the transformer of the pipeline folder ``source`` into a new pipeline folder ``output_dir``.

    The transformer's linear weights become NF4; its other parameters (norms, biases, the skip
    list) are stored in ``dtype`` (16-bit by default: W4A16). Loading casts them to the
    ``torch_dtype`` asked for. The other components are saved as they were. The folder is
    written next to its final place and renamed into it when complete. Returns ``output_dir``.
    """
    source, output_dir = Path(source), Path(output_dir)
    if not (source / "model_index.json").is_file():
        raise QuantizeError(f"{source} is not a pipeline folder (no model_index.json); give the folder that "
                            "`save_pretrained` or `hprune distill` wrote.")
    if output_dir.exists() and not overwrite:
        raise QuantizeError(f"{output_dir} exists; choose another --out or pass --overwrite.")
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    if is_quantized(pipe.transformer):
        raise QuantizeError(f"The transformer in {source} is already quantised; quantise the 16- or 32-bit model.")
    pipe.transformer.to("cuda" if accelerator_available() else "cpu", dtype)
    quantized = quantize(pipe.transformer, skip_modules=skip_modules, compute_dtype=compute_dtype)
    pruned_pipe = with_pruned_transformer(pipe, quantized)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        pruned_pipe.save_pretrained(tmp)
        for record in PROVENANCE_FILES:  # how the source was made travels with it (the model card reads it)
            if (source / record).is_file():
                shutil.copyfile(source / record, Path(tmp) / record)
    return output_dir
