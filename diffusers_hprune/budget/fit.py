"""The check before a stage loads any weight: does its predicted peak fit this GPU, and if not, which flags would.

``hprune analyze``, ``hprune distill`` and ``hprune compress`` (its analysis and distillation) call :func:`check_fits` on a CUDA
device (``--no-budget-check`` skips it). A stage that would not fit stops with a
:class:`~diffusers_hprune.budget.stages.BudgetError` naming the stage, the predicted need, the
device's memory and the first of the stage's memory-saving flags (taken cumulatively, in the
order below) with which the budget fits.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from diffusers_hprune.budget.stages import CUDA_RESERVE, GIB, BudgetError, BudgetOptions, predict
from diffusers_hprune.distillation.data import read_prompts
from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.utils.distributed import local_device_index, resolved_mixed_precision
from diffusers_hprune.utils.errors import HPruneError

# Each stage's memory-saving flags, tried one after another (each on top of the ones before).
REMEDIES = {
    "analysis": [("--cache-device cpu", {"cache_device": "cpu"}), ("--batch-size 1", {"analysis_batch_size": 1})],
    "distillation": [
        ("--mixed_precision bf16", {"mixed_precision": "bf16"}),
        ("--gradient_checkpointing", {"gradient_checkpointing": True}),
        ("--train_batch_size 1", {"train_batch_size": 1}),
        ("--use_8bit_adam", {"use_8bit_adam": True}),
        ("--lora_rank 64", {"lora_rank": 64}),
        ("--teacher_4bit", {"teacher_4bit": True}),
    ],
}


def gpu_memory() -> int | None:
    """Free bytes of this process's CUDA device (``LOCAL_RANK`` under ``accelerate launch``), or ``None`` without one.

    Read before the process has chosen its device, so the device is named by its local rank, not taken
    as the current one (always GPU 0 then); free, not total, memory: what another process holds there
    is not this stage's.
    """
    if not torch.cuda.is_available():
        return None
    index = local_device_index()
    if index >= torch.cuda.device_count():
        index = 0  # a LOCAL_RANK beyond the visible devices: Accelerate will refuse it; check against the first
    free, _ = torch.cuda.mem_get_info(index)
    return int(free)


def distill_options(config: DistillConfig) -> BudgetOptions:
    """The budget options of a distillation run."""
    samples = config.max_samples or 1000
    if config.prompts:
        try:
            samples = min(samples, len(read_prompts(config.prompts)))
        except (HPruneError, UnicodeDecodeError):  # the run itself refuses an unreadable prompt file, with its message
            pass
    return BudgetOptions(
        resolution=config.resolution, mixed_precision=resolved_mixed_precision(config.mixed_precision),
        train_batch_size=config.train_batch_size, validation=bool(config.validation_steps),
        validation_prompts=len(config.validation_prompts) or 4,
        lora_rank=config.lora_rank, teacher_4bit=config.teacher_4bit, use_8bit_adam=config.use_8bit_adam,
        gradient_checkpointing=config.gradient_checkpointing, pwp=config.pwp, sgdistill=config.sgdistill,
        r_thres=config.r_thres, train_samples=max(samples, 1), steps=config.teacher_steps)


def check_fits(stage: str, model, plan=None, options: BudgetOptions | None = None, *, ratio: float | None = None,
               capacity: int | None = None) -> None:
    """Raise ``BudgetError`` when ``stage``'s predicted peak (plus 1 GiB) exceeds the GPU's memory.

    ``capacity``: the device's bytes (default: the current CUDA device's; without one nothing is checked).
    """
    capacity = gpu_memory() if capacity is None else capacity
    if capacity is None:
        return
    options = options or BudgetOptions()
    need = predict(model, plan, ratio=ratio, options=options, stages=(stage,)).stage(stage).device_peak
    if need + CUDA_RESERVE <= capacity:
        return
    flags, tried, fix = [], options, None
    for label, changes in REMEDIES.get(stage, []):
        if all(getattr(tried, k) == v for k, v in changes.items()):
            continue
        tried = replace(tried, **changes)
        flags.append(label)
        after = predict(model, plan, ratio=ratio, options=tried, stages=(stage,)).stage(stage).device_peak
        if after + CUDA_RESERVE <= capacity:
            fix = (flags, after)
            break
    advice = (f"With {' '.join(fix[0])} it would need about {fix[1] / GIB:.1f} GiB: add {'these flags' if len(fix[0]) > 1 else 'this flag'}."
              if fix else f"Even with {' '.join(flags)} it would not fit; use a larger GPU or a smaller plan/resolution."
              if flags else "Use a larger GPU or a smaller resolution.")
    raise BudgetError(
        f"The {stage} stage would need about {need / GIB:.1f} GiB on the GPU (predicted by `hprune budget`, plus "
        f"1 GiB of CUDA context), but this GPU has {capacity / GIB:.1f} GiB. {advice} `hprune budget` shows every "
        "term; --no-budget-check runs anyway.")


__all__ = ["REMEDIES", "check_fits", "distill_options", "gpu_memory"]
