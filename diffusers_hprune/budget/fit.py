"""The check before a stage loads any weight: does its predicted peak fit this GPU, and if not, which flags would.

``hprune analyze``, ``hprune distill`` and ``hprune compress`` (its analysis and distillation) call :func:`check_fits` on a CUDA
device (``--no-budget-check`` skips it). A stage that would not fit stops with a
:class:`~diffusers_hprune.budget.stages.BudgetError` naming the stage, the predicted need, the
device's memory and the first of the stage's memory-saving flags (taken cumulatively, in the
order below) with which the budget fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffusers_hprune.budget.stages import BudgetError, BudgetOptions, predict
from diffusers_hprune.budget.terms import CUDA_RESERVE, GIB
from diffusers_hprune.distillation.data import read_prompts
from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.utils.distributed import local_device_index, resolved_mixed_precision
from diffusers_hprune.utils.errors import HPruneError

# Each stage's memory-saving flags, tried one after another (each on top of the ones before).
REMEDIES = {
    "analysis": [("--cache-device cpu", {"cache_device": "cpu"}), ("--batch-size 1", {"analysis_batch_size": 1}),
                 ("--vae-tiling", {"vae_tiling": True})],
    "evaluation": [("--batch-size 1", {"eval_batch_size": 1}), ("--vae-tiling", {"vae_tiling": True})],
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


@dataclass(frozen=True)
class StageFit:
    """How one stage fits a GPU of ``capacity`` bytes: the flags it needs beyond those given (the stage command's
    own flags, the first of its :data:`REMEDIES` taken cumulatively with which it fits), the options with them, its
    predicted peak with them, and whether that fits (peak plus 1 GiB within the capacity)."""

    stage: str
    capacity: int
    given_peak: int
    flags: tuple[str, ...]
    options: BudgetOptions
    device_peak: int

    @property
    def fits(self) -> bool:
        return self.device_peak + CUDA_RESERVE <= self.capacity

    def to_dict(self) -> dict:
        return {"flags": list(self.flags), "device_peak": self.device_peak, "fits": self.fits,
                "given_peak": self.given_peak}


def fit_stage(stage: str, model, plan=None, options: BudgetOptions | None = None, *, capacity: int,
              ratio: float | None = None) -> StageFit:
    """The flags with which ``stage`` (``analysis``, ``distillation``, ``quantisation``, or a budget row's name such
    as ``inference (pruned, NF4)``) fits ``capacity`` bytes: none when it fits as given; else its remedies one after
    another until it fits (or all of them, when even they do not suffice: then ``fits`` is false)."""
    options = options or BudgetOptions()
    kind = stage.split(" (")[0]

    def peak(opts: BudgetOptions) -> int:
        return predict(model, plan, ratio=ratio, options=opts, stages=(kind,)).stage(stage).device_peak

    given = after = peak(options)
    flags, tried = [], options
    if given + CUDA_RESERVE > capacity:
        for label, changes in REMEDIES.get(kind, []):
            if all(getattr(tried, k) == v for k, v in changes.items()):
                continue
            tried = replace(tried, **changes)
            flags.append(label)
            after = peak(tried)
            if after + CUDA_RESERVE <= capacity:
                break
    return StageFit(stage, capacity, given, tuple(flags), tried, after)


def cache_placement(model, options: BudgetOptions, capacity: int | None = None) -> str | None:
    """Where the analysis keeps its block-output cache when the user does not say: ``"cpu"`` (host memory) when the
    budget says the analysis fits this GPU only with it there, else ``None`` (beside the model, the faster). Without
    a GPU (``capacity`` None and no CUDA) the cache stays with the model (the host)."""
    capacity = gpu_memory() if capacity is None else capacity
    if capacity is None or options.cache_device == "cpu":
        return options.cache_device
    fit = fit_stage("analysis", model, None, options, capacity=capacity)
    return "cpu" if "--cache-device cpu" in fit.flags else None


def check_fits(stage: str, model, plan=None, options: BudgetOptions | None = None, *, ratio: float | None = None,
               capacity: int | None = None) -> None:
    """Raise ``BudgetError`` when ``stage``'s predicted peak (plus 1 GiB) exceeds the GPU's memory.

    ``capacity``: the device's bytes (default: the current CUDA device's; without one nothing is checked).
    """
    capacity = gpu_memory() if capacity is None else capacity
    if capacity is None:
        return
    fit = fit_stage(stage, model, plan, options, capacity=capacity, ratio=ratio)
    if not fit.flags and fit.fits:
        return
    flags = fit.flags
    advice = (f"With {' '.join(flags)} it would need about {fit.device_peak / GIB:.1f} GiB: add "
              f"{'these flags' if len(flags) > 1 else 'this flag'}." if fit.fits
              else f"Even with {' '.join(flags)} it would not fit; use a larger GPU or a smaller plan/resolution."
              if flags else "Use a larger GPU or a smaller resolution.")
    raise BudgetError(
        f"The {stage} stage would need about {fit.given_peak / GIB:.1f} GiB on the GPU (predicted by `hprune budget`, "
        f"plus 1 GiB of CUDA context), but this GPU has {capacity / GIB:.1f} GiB. {advice} `hprune budget` shows every "
        "term; --no-budget-check runs anyway.")


__all__ = ["REMEDIES", "StageFit", "cache_placement", "check_fits", "distill_options", "fit_stage", "gpu_memory"]
