"""The settings of a distillation run: :class:`DistillConfig` (every option of ``hprune distill``), the bounds
of its numbers, and which options change the result (the groups a checkpoint and ``hprune compress`` key by)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from diffusers_hprune.utils.checks import check_bool, check_number
from diffusers_hprune.utils.distributed import PRECISIONS
from diffusers_hprune.utils.errors import HPruneError


class DistillError(HPruneError):
    """Distillation options that cannot work together, or inputs that do not match."""


@dataclass(kw_only=True)
class DistillationSettings:
    """The distillation settings that ``hprune compress`` (``HPruneConfig``) and ``hprune distill``
    (:class:`DistillConfig`) both have: declared once, here, with their defaults. Keyword-only."""

    # optimisation
    max_train_steps: int = 1000
    max_train_minutes: float | None = None
    learning_rate: float = 1e-4
    train_batch_size: int = 4
    seed: int = 0
    # the method
    pwp: bool = True
    sgdistill: bool = True
    r_thres: float = 0.25
    # low memory
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    use_8bit_adam: bool = False
    teacher_4bit: bool = False


@dataclass
class DistillConfig(DistillationSettings):
    """Every option of a distillation run (the command-line flags, with dashes or underscores); the ones
    ``hprune compress`` shares come from :class:`DistillationSettings`."""

    teacher: str
    plan: str
    output_dir: str
    analysis: str | None = None
    # data
    prompts: str | None = None
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    data_files: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int | None = None
    teacher_steps: int | None = None
    guidance_scale: float | None = None
    max_samples: int | None = None
    cache_dir: str | None = None
    # optimisation (and DistillationSettings': max_train_steps, max_train_minutes, learning_rate, train_batch_size,
    # seed)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 0.0
    mixed_precision: str | None = None  # None: the launch config's (ACCELERATE_MIXED_PRECISION), else "no"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # the method (and DistillationSettings': pwp, sgdistill, r_thres)
    lambda_feat: float = 1.0
    lambda_task: float = 0.0
    sensitivity_floor: float = 0.2  # measured: BENCHMARKS.md "sgdistill-floor-sd3"
    sensitivity_eps: float | None = None
    binary_freeze: bool = False
    # low memory (and DistillationSettings': gradient_checkpointing, lora_rank, use_8bit_adam, teacher_4bit)
    lora_alpha: float | None = None
    # bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    report_to: str | None = None
    process_timeout_minutes: float | None = None  # None: sized to the work one process does while the others wait
    overwrite: bool = False
    progress: bool = True
    # files of the caller's own in output_dir that the run leaves alone (``hprune compress``: its stage stamps); not a
    # command-line flag
    keep_files: tuple[str, ...] = ()

    def result_settings(self) -> dict[str, Any]:
        """The options that change the trained weights, by value (:data:`IDENTITY_OPTIONS`, :data:`BUDGET_OPTIONS`,
        :data:`DATA_OPTIONS`): what a stage running this distillation keys its result by, beside its inputs'
        contents (:data:`INPUT_OPTIONS`). :data:`BOOKKEEPING_OPTIONS` change nothing the run produces."""
        return {name: getattr(self, name) for name in IDENTITY_OPTIONS + BUDGET_OPTIONS + DATA_OPTIONS}

    def check(self) -> None:
        """Refuse values no run can use, before anything is loaded: a DistillError naming the option and its bounds.

        The command line refuses them at the flag already; this covers a config built in Python.
        """
        for name in ("teacher", "plan", "output_dir"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or not str(getattr(self, name)):
                raise DistillError(f"--{name} is required: give a path (got {getattr(self, name)!r}).")
        if isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank < 0:
            raise DistillError(f"--lora_rank must be >= 0 (0 trains full weights), got {self.lora_rank}.")
        for name, rule in NUMBER_RULES.items():
            value = getattr(self, name)
            if value is None and rule.optional:
                continue
            check_number(f"--{name}", value, kind=rule.kind, minimum=rule.minimum, maximum=rule.maximum,
                         exclusive_minimum=rule.above, error=DistillError)
        for name in ("use_8bit_adam", "pwp", "sgdistill", "binary_freeze", "gradient_checkpointing", "teacher_4bit",
                     "overwrite", "progress"):
            check_bool(name, getattr(self, name), error=DistillError)
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise DistillError(f"--mixed_precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}.")
        if not all(isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise DistillError("validation_prompts must be a list of non-empty prompts (strings); drop the empty ones.")


class _Rule(NamedTuple):
    """The bounds of one numeric option of :class:`DistillConfig`."""

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False  # the minimum itself is refused
    optional: bool = False  # None is allowed (a default taken from elsewhere)


NUMBER_RULES = {
    "resolution": _Rule(int, 1, optional=True),
    "teacher_steps": _Rule(int, 1, optional=True),
    "guidance_scale": _Rule(float, 0, optional=True),
    "max_samples": _Rule(int, 1, optional=True),
    "max_train_steps": _Rule(int, 1),
    "max_train_minutes": _Rule(float, 0, above=True, optional=True),
    "learning_rate": _Rule(float, 0, above=True),
    "train_batch_size": _Rule(int, 1),
    "gradient_accumulation_steps": _Rule(int, 1),
    "max_grad_norm": _Rule(float, 0),
    "adam_weight_decay": _Rule(float, 0),
    "seed": _Rule(int, 0, 2**32 - 1),
    "logit_mean": _Rule(float),
    "logit_std": _Rule(float, 0, above=True),
    "lambda_feat": _Rule(float, 0),
    "lambda_task": _Rule(float, 0),
    "sensitivity_floor": _Rule(float, 0, 1),
    "sensitivity_eps": _Rule(float, 0, above=True, optional=True),
    "r_thres": _Rule(float, 0, 1),
    "lora_rank": _Rule(int, 0),
    "lora_alpha": _Rule(float, 0, above=True, optional=True),
    "checkpointing_steps": _Rule(int, 0),
    "checkpoints_total_limit": _Rule(int, 1, optional=True),
    "validation_steps": _Rule(int, 0),
    "process_timeout_minutes": _Rule(float, 0, above=True, optional=True),
}

#: Options that change the result: a checkpoint resumes only under the same values (the step budget, checkpointing,
#: validation drawings, progress and trackers may change: extending a run is legitimate).
IDENTITY_OPTIONS = (
    "learning_rate", "max_grad_norm", "adam_weight_decay", "use_8bit_adam", "logit_mean", "logit_std", "seed",
    "train_batch_size", "gradient_accumulation_steps", "lambda_feat", "lambda_task", "pwp", "sgdistill",
    "sensitivity_floor", "sensitivity_eps", "binary_freeze", "r_thres", "lora_rank", "lora_alpha", "mixed_precision",
    "teacher_4bit",
)

#: Options that change the result but not what a checkpoint must share: the step budget (extending a run is legitimate).
BUDGET_OPTIONS = ("max_train_steps", "max_train_minutes")

#: Options that choose the training data by value (the data itself is identified by content: ``data.data_identity``).
DATA_OPTIONS = ("image_column", "caption_column", "resolution", "teacher_steps", "guidance_scale", "max_samples")

#: Inputs named by path or Hub id: identified by what they hold (weights, plan, analysis, data), never by the name.
INPUT_OPTIONS = ("teacher", "plan", "analysis", "prompts", "train_data_dir", "dataset_name", "dataset_config_name",
                 "data_files")

#: Options that leave the trained weights as they are: where the run goes, memory, checkpoints, drawings, logs.
BOOKKEEPING_OPTIONS = ("output_dir", "cache_dir", "gradient_checkpointing", "checkpointing_steps",
                       "checkpoints_total_limit", "resume_from_checkpoint", "validation_steps", "validation_prompts",
                       "report_to", "process_timeout_minutes", "overwrite", "progress", "keep_files")


def weight_dtype(config: DistillConfig) -> torch.dtype:
    """The dtype the teacher and the frozen parts of the student hold: ``--mixed_precision``'s, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)


def _checked_precision(mixed_precision: str) -> str:
    """The precision Accelerate settled on, refused (before any loading) when the trainer has no weight dtype for it."""
    if mixed_precision not in PRECISIONS:
        raise DistillError(f"The launch config asks for mixed precision {mixed_precision!r}; distillation runs in "
                           f"{', '.join(PRECISIONS)}: pass --mixed_precision bf16 (or change the launch config).")
    return mixed_precision
