"""The one set of bitsandbytes 4-bit settings every NF4 model of the project uses (DESIGN.md section 6, step 8).

``hprune quantize`` writes its checkpoints with them, and ``hprune distill --teacher_4bit`` loads
its teacher with them, so the teacher a student learns from is quantised exactly as the student
will be: NF4 codes, double quantisation, block size 64, the family's input and output modules in
16-bit.
"""

from __future__ import annotations

import torch


def default_compute_dtype() -> torch.dtype:
    """bf16, on every machine: the dtype a checkpoint records for the GPUs it is published to.

    On a CPU the layers compute in fp32 all the same (:func:`~diffusers_hprune.utils.nf4_cpu.compute_in_fp32_on_cpu`,
    applied by ``quantize`` and by the pruned classes' CPU loading).
    """
    return torch.bfloat16


def nf4_config(skip_modules: tuple[str, ...] | list[str], compute_dtype: torch.dtype | None = None):
    """The ``BitsAndBytesConfig`` of our W4A16: NF4, double quantisation, ``skip_modules`` in 16-bit."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(),
        llm_int8_skip_modules=list(skip_modules),
    )


__all__ = ["default_compute_dtype", "nf4_config"]
