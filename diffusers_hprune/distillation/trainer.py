"""The distillation run (Algorithm 1, stage 2) with Accelerate: ``hprune distill`` and ``examples/distill.py``.

teacher pipeline + plan (+ analysis) -> student = prune_transformer(copy of the teacher's
transformer, plan) -> PWP freezing -> SGDistill parameter groups (ratio >= r_thres) ->
cached training data -> steps of ``L_KD + lambda_feat L_feat (+ lambda_task L_task)`` at
logit-normal noise levels -> a pruned pipeline in ``output_dir`` that loads with
``DiffusionPipeline.from_pretrained`` after ``import diffusers_hprune``.

Runs on one process or under ``accelerate launch`` (DDP; FSDP / DeepSpeed through Accelerate
configs). Checkpoints (``accelerator.save_state``) go to ``output_dir/checkpoint-<step>``;
``resume_from_checkpoint="latest"`` continues from the newest, refused when the checkpoint was
made with settings that change the result (:func:`_run_identity`, also in
``output_dir/hprune_run.json``, the marker of a run folder).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch

from diffusers_hprune.contributions import ContributionReport, components_fingerprint, fingerprint
from diffusers_hprune.distillation import validation
from diffusers_hprune.distillation.data import (
    DataSpec,
    build_training_cache,
    data_identity,
    held_out_prompts,
    read_prompts,
)
from diffusers_hprune.distillation.loss import BlockFeatures, distillation_loss, kept_blocks
from diffusers_hprune.distillation.pwp import apply_pwp
from diffusers_hprune.distillation.reach import parameters_off_the_loss
from diffusers_hprune.distillation.sgdistill import sgdistill_param_groups
from diffusers_hprune.families import get_family
from diffusers_hprune.families.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.loading import (
    TEXT_ENCODERS,
    components_on,
    generation_settings,
    load_pipeline,
    pipeline_folder,
    pixel_multiple,
)
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.pipelines.pruned import with_pruned_transformer
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.profiles import identify
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.checks import (
    InputError,
    check_apart,
    check_bool,
    check_not_inside,
    check_number,
    check_output_folder,
)
from diffusers_hprune.utils.compat import forget_other_precision
from diffusers_hprune.utils.distributed import (
    DRAW_SECONDS_PER_STEP,
    PRECISIONS,
    from_main_process,
    launched_on_cpu,
    launched_with_deepspeed,
    lone_work_timeout,
    resolved_mixed_precision,
)
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json, copy_files, safetensors_user_modes
from diffusers_hprune.utils.float64 import float64
from diffusers_hprune.utils.interrupts import uninterrupted
from diffusers_hprune.utils.nf4_cpu import (
    accelerator_available,
    compute_in_fp32_on_cpu,
    cpu_nf4_loading,
    import_bitsandbytes,
    keep_cpu_layout,
)
from diffusers_hprune.utils.nf4_settings import default_compute_dtype, nf4_config
from diffusers_hprune.utils.plain_loading import record_fp32_default


class DistillError(HPruneError):
    """Distillation options that cannot work together, or inputs that do not match."""


@dataclass
class DistillConfig:
    """Every option of a distillation run (the command-line flags, with dashes or underscores)."""

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
    # optimisation
    max_train_steps: int = 1000
    max_train_minutes: float | None = None
    learning_rate: float = 1e-4
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 0.0
    use_8bit_adam: bool = False
    mixed_precision: str | None = None  # None: the launch config's (ACCELERATE_MIXED_PRECISION), else "no"
    seed: int = 0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # the method
    lambda_feat: float = 1.0
    lambda_task: float = 0.0
    pwp: bool = True
    sgdistill: bool = True
    sensitivity_floor: float = 0.2  # measured: BENCHMARKS.md "sgdistill-floor-sd3"
    sensitivity_eps: float | None = None
    binary_freeze: bool = False
    r_thres: float = 0.25
    # low memory
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    teacher_4bit: bool = False
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

RUN_FILE = "hprune_run.json"  # the run's identity: in OUTPUT_DIR (the marker of a run folder) and in each checkpoint
PROGRESS_FILE = "hprune_progress.json"  # in each checkpoint: the losses, seconds and start loss so far
SUMMARY_FILE = "distill_summary.json"
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
                       "report_to", "process_timeout_minutes", "overwrite", "progress")
#: What ``hprune compress`` keeps in the stage folder it gives as OUTPUT_DIR (its stage bookkeeping): a folder holding
#: only these is an empty one.
STAGE_FILES = ("hprune_stage.json", "hprune_stage_started.json")
#: What an interrupted run leaves in OUTPUT_DIR, removed at the next start (nothing else is): folders of a pipeline
#: being saved or a checkpoint being written, and files of a JSON file being replaced (``atomic_write_json``).
LEFTOVER_FOLDER = re.compile(r"\.pipeline\.[a-z0-9_]+|\.checkpoint-\d+\.tmp")
LEFTOVER_FILE = re.compile(r"\.(hprune_run|distill_summary|plan)\.json\.(?:[A-Za-z0-9-]+-\d+\.)?[a-z0-9_]+\.tmp")


class _StepSampler:
    """Which samples, and which random seed, micro-step ``m`` of process ``r`` uses.

    The sample stream is a concatenation of seeded permutations of the dataset (one per epoch);
    micro-step ``m`` of process ``r`` of ``W`` takes positions ``[(m W + r) B, (m W + r + 1) B)``.
    """

    def __init__(self, n: int, batch: int, world: int, seed: int):
        self.n, self.batch, self.world, self.base = n, batch, world, seed
        self._perm: tuple[int, list[int]] = (-1, [])

    def indices(self, micro: int, rank: int) -> list[int]:
        start = (micro * self.world + rank) * self.batch
        out = []
        for pos in range(start, start + self.batch):
            epoch, k = divmod(pos, self.n)
            if self._perm[0] != epoch:
                gen = torch.Generator().manual_seed(self.base + epoch)
                self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
            out.append(self._perm[1][k])
        return out

    def seed(self, micro: int, rank: int) -> int:
        return (self.base * 1_000_003 + micro * 1_009 + rank) % (2**63)


def _run_identity(models, groups, config: DistillConfig, *, data: dict, use_sg: bool, processes: int) -> dict:
    """What a checkpoint must share with the run resuming from it: everything that changes the result.

    The teacher's weights, the plan, the analysis (a digest of its file), the training data (by
    content: :func:`data.data_identity`), every option of :data:`IDENTITY_OPTIONS`, whether
    SGDistill is in use, the number of processes, and the parameter groups and counts they give.
    As it reads back from JSON (lists, not tuples), so that a saved identity compares equal.
    """
    identity = {
        "teacher": fingerprint(models.teacher), "plan": models.plan.to_dict(),
        "analysis": _file_digest(config.analysis, "--analysis"), "data": data,
        **{name: getattr(config, name) for name in IDENTITY_OPTIONS},
        "sgdistill_in_use": use_sg, "processes": processes,
        "param_groups": [g.name for g in groups], "trainable": sum(g.numel for g in groups),
        "parameters": sum(p.numel() for p in models.student.parameters()),
    }
    return json.loads(json.dumps(identity, default=str))


def _file_digest(path: str | None, flag: str) -> str | None:
    """The sha256 of a file's bytes (None for no file)."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise DistillError(f"Cannot read {flag} {path} ({e.strerror or e}); check the path and its permissions.") from None


def _resume_path(config: DistillConfig, output_dir: Path) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        return _latest_checkpoint(output_dir) if output_dir.is_dir() else None
    path = Path(config.resume_from_checkpoint)
    if not (path.is_dir() and _checkpoint_step(path) is not None):
        raise DistillError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder; give one written by "
                           "this command, or 'latest'.")
    return path


def _check_resume(path: Path, identity: dict) -> None:
    """Refuse a checkpoint whose run identity differs from this run's, naming each differing value."""
    try:
        saved = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DistillError(f"{path} has no readable {RUN_FILE}: it is not a checkpoint of `hprune distill`; resume "
                           "from one of this run's checkpoints, or start without --resume_from_checkpoint.") from None
    differences = _differences(saved if isinstance(saved, dict) else {}, identity)
    if differences:
        names = list(dict.fromkeys(name.split(".")[0] for name, _ in differences))
        shown = "; ".join(text for _, text in differences[:12])
        more = f"; and {len(differences) - 12} more" if len(differences) > 12 else ""
        raise DistillError(f"{path} is a checkpoint of another run (different {', '.join(names)}): {shown}{more}. "
                           "Resume with the settings it was made with, or start a new run with --overwrite (which "
                           "deletes this run's checkpoints) or in another --output_dir.")


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``(name, "name: checkpoint A, now B")`` for each value that differs; nested dicts compared key by key.

    A value the checkpoint does not record (made by an older version) differs.
    """
    out = []
    for key in list(now) + [k for k in saved if k not in now]:
        name = f"{prefix}{key}"
        if key not in saved:
            out.append((name, f"{name}: checkpoint (not recorded), now {_shown(now[key])}"))
        elif key not in now:
            out.append((name, f"{name}: checkpoint {_shown(saved[key])}, now (none)"))
        elif isinstance(saved[key], dict) and isinstance(now[key], dict):
            out += _differences(saved[key], now[key], f"{name}.")
        elif saved[key] != now[key]:
            out.append((name, f"{name}: checkpoint {_shown(saved[key])}, now {_shown(now[key])}"))
    return out


def _shown(value, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _holds_a_run(output_dir: Path) -> bool:
    """A run of this command with progress in ``output_dir``: checkpoints or a saved pipeline."""
    if not output_dir.is_dir():
        return False
    return (output_dir / "model_index.json").exists() or _latest_checkpoint(output_dir) is not None


def _is_run_folder(folder: Path) -> bool:
    """A folder this command writes into: its marker, a checkpoint of it, or (before the marker) a saved run."""
    return ((folder / RUN_FILE).is_file() or bool(_own_checkpoints(folder))
            or ((folder / SUMMARY_FILE).is_file() and (folder / "model_index.json").is_file()))


def _checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else ``None``."""
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(step, p) for p in output_dir.glob("checkpoint-*") if (step := _checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _own_checkpoints(output_dir: Path) -> list[Path]:
    """This command's ``checkpoint-<step>`` folders (with their ``hprune_run.json``), oldest first; nothing else."""
    found = [(step, p) for p in output_dir.glob("checkpoint-*")
             if (step := _checkpoint_step(p)) is not None and (p / RUN_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _plan_ratio(plan, config) -> float:
    inventory = inspect_transformer(dict(config, prune_plan=plan.to_dict()))
    return inventory.removed_fraction


def sgdistill_ratio(plan, achieved: float) -> tuple[float, str]:
    """The ratio SGDistill compares with r_thres, and where it came from.

    Algorithm 1 switches on ``if r >= r_thres`` with ``r`` the TARGET ratio: the plan's
    ``target_ratio`` (or, for a memory-budget plan, the equivalent ``target_fraction``), as
    ``make_plan`` records them. A plan without either (written by hand) falls back to the
    ratio it achieves.
    """
    meta = plan.metadata or {}
    for key, what in (("target_ratio", "target ratio"), ("target_fraction", "target (from the memory budget)")):
        value = meta.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
            return float(value), what
    return achieved, "achieved ratio (the plan records no target)"


def _check_trackers(report_to: str | None) -> None:
    """Accelerate drops a tracker whose package is missing without a word: refuse instead."""
    if not report_to or report_to == "all":
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in report_to.split(","):
        name = name.strip()
        if name not in LOGGER_TYPE_TO_CLASS:
            raise DistillError(f"--report_to {name!r} is not an Accelerate tracker; choose one of "
                               f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}.")
        if name not in available:
            raise DistillError(f"--report_to {name}: its package is not installed; install it (e.g. "
                               f"`pip install {name}`) or drop the option.")


def weight_dtype(config: DistillConfig) -> torch.dtype:
    """The dtype the teacher and the frozen parts of the student hold: ``--mixed_precision``'s, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)


def _without_text_encoders(main: bool) -> dict:
    """Components to leave unloaded: a process other than the main one never encodes text (it reads the cache)."""
    return {} if main else dict.fromkeys(TEXT_ENCODERS)


def _load_teacher(config: DistillConfig, dtype: torch.dtype, main: bool = True):
    pipe, name = load_pipeline(config.teacher, "cpu", dtype, **_without_text_encoders(main))
    return pipe, name


def _lora_config(student, trainable_paths: list[str], rank: int, alpha: float | None):
    """The LoRA adapter config for every linear layer of the trainable parts."""
    from peft import LoraConfig

    targets = []
    for path in trainable_paths:
        for name, module in student.get_submodule(path).named_modules():
            if isinstance(module, torch.nn.Linear):
                targets.append(f"{path}.{name}" if name else path)
    if not targets:
        raise DistillError("LoRA found no linear layer in the trainable part of the student.")
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def _final_student(accelerator, student, family, lora_config):
    """The trained student as a plain fp32 module on the main process (``None`` elsewhere), LoRA merged.

    ``accelerator.get_state_dict`` runs on every process: under FSDP / DeepSpeed it gathers the
    sharded weights into full tensors on the main process; under DDP it is the module's own
    state dict. The weights go into a fresh module of the student's class and plan (built
    without allocating weights), so nothing depends on how the training wrapper holds them.
    """
    from accelerate import init_empty_weights

    state = accelerator.get_state_dict(student)
    if not accelerator.is_main_process:
        return None
    inner = accelerator.unwrap_model(student)
    config = {k: v for k, v in inner.config.items() if not k.startswith("_")}
    with init_empty_weights():
        final = pruned_class_for(family).from_config(config)
        if lora_config is not None:
            final.add_adapter(copy.deepcopy(lora_config))
    final.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=True,
                          assign=True)
    final.to(torch.float32)
    if lora_config is not None:
        final.fuse_lora()
        final.unload_lora()
    return final.requires_grad_(False).eval()


def _save_pipeline(pipeline, output_dir: Path, teacher_folder: Path | None = None) -> None:
    """Write the pipeline's files into ``output_dir`` (which also holds checkpoints); ``model_index.json`` last.

    The components other than the transformer are the teacher's: with the teacher's folder at
    hand they are its files, copied (their bytes and dtypes as published), not re-saved from
    memory in the dtype they were loaded in.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline.", dir=output_dir))
    try:
        pipeline.save_pretrained(tmp)
        for component in sorted(p for p in tmp.iterdir() if p.is_dir() and p.name != "transformer"):
            if teacher_folder is not None and (teacher_folder / component.name).is_dir():
                shutil.rmtree(component)
                copy_files(teacher_folder / component.name, component, root=teacher_folder)
        record_fp32_default(tmp)  # the copied encoders' configs too: a plain from_pretrained loads one dtype
        # A folder with model_index.json looks complete: the old one goes first, the new one comes last, and
        # SIGTERM / Ctrl-C wait until every component is in place.
        with uninterrupted():
            (output_dir / "model_index.json").unlink(missing_ok=True)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
                target = output_dir / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run the distillation; returns the run summary (also written to ``output_dir/distill_summary.json``).

    Stage 2 of Algorithm 1, one named step a line: options, output folder and resume point,
    teacher and pruned student, PWP, the SGDistill parameter groups (with LoRA), the run's
    identity, the optimizer, the training data, the loop, the saved student. Everything that can
    be refused is refused before anything is written.
    """

    config.check()
    output_dir = _checked_output_dir(config)
    created = not output_dir.exists()
    spec = _checked_data_spec(config)
    plan = PrunePlan.load(config.plan)
    accelerator = _accelerator(config, output_dir, _process_timeout(config, spec, plan))  # every RNG seeded
    try:
        return _distill(config, output_dir, spec, plan, accelerator)
    except BaseException:
        if created and accelerator.is_main_process:
            _remove_unfinished(output_dir)
        raise


def _remove_unfinished(output_dir: Path) -> None:
    """A run that made ``output_dir`` and failed (a full disk, an error, SIGTERM) before its first checkpoint leaves
    nothing: the folder holds only its own bookkeeping then. With a checkpoint, everything stays (for resuming)."""
    if output_dir.is_dir() and not any(_checkpoint_step(p) is not None for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)


def _distill(config: DistillConfig, output_dir: Path, spec, plan: PrunePlan, accelerator) -> dict[str, Any]:
    say = accelerator.print
    # Accelerate's precision (the flag, else the launch config's) is the run's from here on.
    config = replace(config, mixed_precision=_checked_precision(accelerator.mixed_precision),
                     validation_prompts=list(config.validation_prompts) or list(spec.held_out))
    resume_path = _resume_point(config, output_dir, say)

    models = _teacher_and_student(config, plan, accelerator.device, main=accelerator.is_main_process)
    _check_resolution(config, models)
    pwp = apply_pwp(models.student, enabled=config.pwp)
    say(pwp.summary())
    use_sg, lora_config, groups, off_the_loss = _trainable_groups(config, models, pwp, say)
    _own_trainable_copies(models.student)
    # the text encoders and VAE are the main process's alone: their digest is computed there and handed to all
    components = from_main_process(lambda: components_fingerprint(models.pipe))
    identity = _run_identity(models, groups, config, data=data_identity(models.pipe, spec, components),
                             use_sg=use_sg, processes=accelerator.num_processes)
    if models.report is not None and models.report.fingerprint != identity["teacher"]:
        say(f"note: {config.analysis} was measured on other weights of this architecture ({models.report.model}, "
            f"fingerprint {models.report.fingerprint}; the teacher's is {identity['teacher']}): SGDistill's rates come "
            "from that model's contributions. Analyse the teacher itself (`hprune analyze`) if that is not meant.")
    elif models.report is not None and models.report.components not in (None, identity["data"]["components"]):
        say(f"note: {config.analysis} was measured with other text encoders, VAE, tokenizers or scheduler than the "
            "teacher's (the transformer is the same): SGDistill's rates come from that pipeline's contributions. "
            "Analyse the teacher itself (`hprune analyze`) if that is not meant.")
    _prepare_output_dir(config, output_dir, resume_path, identity, accelerator, say)
    optimizer = _optimizer(config, groups, lora_config, say)
    dataset = _training_data(accelerator, models.pipe, spec, config, output_dir, say, components)

    group_records = [{"name": g.name, "lr": g.lr, "numel": g.numel} for g in groups]
    run = _Run.prepare(config, accelerator, models, optimizer, groups, dataset, identity, output_dir)
    step, progress = _resume(run, resume_path, say)
    if config.report_to:
        accelerator.init_trackers("hprune-distill", {k: v for k, v in asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})
    if progress.start_loss is None:  # a resumed run keeps the start loss of the run's own start
        progress.start_loss = run.held_out_loss()
    step = _train(run, step, progress)
    accelerator.wait_for_everyone()
    eval_end = run.held_out_loss()
    _resharded(run.inner)  # FSDP2 leaves its root unit gathered (16-bit) after a forward: read the trained weights
    say(f"loss on a fixed batch (fixed noise and noise levels): {progress.start_loss:.4g} -> {eval_end:.4g}")

    summary = {
        "teacher": models.teacher_name, "plan": models.plan.describe(), "ratio": round(models.ratio, 6),
        "pwp": config.pwp, "sgdistill": use_sg, "binary_freeze": config.binary_freeze, "lora_rank": config.lora_rank,
        **_precision_record(run, models), "distributed": str(accelerator.distributed_type).rsplit(".", 1)[-1],
        "device": str(accelerator.device),
        "steps": step, "seconds": round(progress.seconds, 2), "processes": accelerator.num_processes,
        "first_pruned_block": pwp.first_pruned, "frozen_params": pwp.frozen_params,
        "trainable_params": sum(g["numel"] for g in group_records),
        "param_groups": [{"name": g["name"], "lr": g["lr"]} for g in group_records],
        "frozen_off_the_loss": off_the_loss, **_gradient_record(run),
        **_rank_checksums(run), "fixed_batch_loss": {"start": progress.start_loss, "end": eval_end},
        "losses": progress.losses,
    }
    _save_student(run, models, lora_config, summary, say)
    accelerator.wait_for_everyone()  # every rank reaches the teardown together, after the main one saved
    # The prepared student is freed here, while every rank is alive: DDP's reducer holds the process group, and
    # freed only when distill() returned (after end_training destroyed the group), gloo's destructor could wait
    # forever for a rank that had exited (seen in CI: rank 1 left joining a gloo thread).
    del run
    accelerator.free_memory()  # Accelerate's own references to the prepared student and optimizer; collected
    accelerator.end_training()  # trackers finished, process group destroyed once
    return summary


# -- the steps of distill(), in order ---------------------------------------------------------------
def _checked_output_dir(config: DistillConfig) -> Path:
    """``--output_dir``, refused before any work when writing there could change or delete what is not this run's.

    It must be a folder that can be written, not the teacher's folder nor inside it (with or
    without --overwrite), and either new, empty or a run folder of this command (see
    :func:`_is_run_folder`): saving the pipeline replaces whole component folders.
    """
    output_dir = Path(config.output_dir)
    try:
        check_output_folder(output_dir, "--output_dir")
        for teacher in _teacher_folders(config.teacher):
            check_not_inside(output_dir, teacher, "--output_dir", "--teacher")
        # the training data: --overwrite of a folder that holds it would delete it (the plan may lie in a run folder:
        # the run writes its own copy there)
        check_apart(output_dir, "--output_dir", (config.prompts, "--prompts"), (config.train_data_dir, "--train_data_dir"))
    except InputError as e:
        raise DistillError(str(e)) from None
    if output_dir.is_dir() and not _is_run_folder(output_dir):
        entries = sorted(p.name for p in output_dir.iterdir() if p.name not in STAGE_FILES)
        if entries:
            found = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise DistillError(f"--output_dir {output_dir} is not empty and holds no run of `hprune distill` (found "
                               f"{found}): saving the pipeline there would replace or delete those files. Choose an "
                               "empty or new folder (--overwrite only replaces a run of this command).")
    return output_dir


def _teacher_folders(teacher: str) -> list[Path]:
    """The local folders the teacher is read from: the folder given, and the pipeline folder it resolves to."""
    folders = [Path(teacher)] if Path(teacher).is_dir() else []
    resolved = pipeline_folder(teacher)
    return folders + ([resolved] if resolved is not None else [])


def _accelerator(config: DistillConfig, output_dir: Path, timeout):
    """Accelerate's ``Accelerator`` for the run's precision, accumulation and trackers; every RNG seeded.

    Precision: ``--mixed_precision``, else the launch config's (``None`` lets Accelerate read it). DDP keeps
    each gradient as a view of its all-reduce bucket (no second copy of the gradients); the process group
    waits ``timeout`` at a barrier (:func:`_process_timeout`). Under DeepSpeed, its config gets the
    micro-batch size and, where it says ``auto``, the clipping norm (no DataLoader goes through ``prepare``).
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        InitProcessGroupKwargs,
        ProjectConfiguration,
        set_seed,
    )

    _check_trackers(config.report_to)
    _check_deepspeed_installed()
    precision = resolved_mixed_precision(config.mixed_precision)
    if precision == "fp16" and not torch.cuda.is_available():  # Accelerate raises a bare ValueError for it
        raise DistillError("--mixed_precision fp16 needs a CUDA GPU (fp16 autocast with its gradient scaler); on this "
                           "machine without one use --mixed_precision bf16 or no (or change the launch config).")
    forget_other_precision(precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=[t.strip() for t in config.report_to.split(",")] if config.report_to else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=launched_on_cpu(),
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         InitProcessGroupKwargs(timeout=timeout)],
    )
    if accelerator.distributed_type == DistributedType.FSDP and config.use_8bit_adam:
        raise DistillError("--use_8bit_adam does not work under FSDP: bitsandbytes' 8-bit AdamW cannot update the "
                           "sharded (DTensor) parameters FSDP2 trains. Drop --use_8bit_adam (FSDP already shards the "
                           "optimizer state across the GPUs), or launch with DDP "
                           "(examples/accelerate_configs/multi_gpu.yaml) or DeepSpeed to use it.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if config.use_8bit_adam:
            raise DistillError("--use_8bit_adam is not supported under DeepSpeed: ZeRO partitions the optimizer state "
                               "itself and accepts only the optimizers it knows. Drop --use_8bit_adam (ZeRO-2 already "
                               "shards the AdamW state), or launch with DDP (examples/accelerate_configs/multi_gpu.yaml).")
        settings = accelerator.state.deepspeed_plugin.deepspeed_config
        settings["train_micro_batch_size_per_gpu"] = config.train_batch_size
        if settings.get("gradient_clipping") == "auto":
            settings["gradient_clipping"] = config.max_grad_norm
    set_seed(config.seed)
    return accelerator


def _checked_precision(mixed_precision: str) -> str:
    """The precision Accelerate settled on, refused (before any loading) when the trainer has no weight dtype for it."""
    if mixed_precision not in PRECISIONS:
        raise DistillError(f"The launch config asks for mixed precision {mixed_precision!r}; distillation runs in "
                           f"{', '.join(PRECISIONS)}: pass --mixed_precision bf16 (or change the launch config).")
    return mixed_precision


def _check_deepspeed_installed() -> None:
    """A DeepSpeed launch config without the ``deepspeed`` package: refused before anything is loaded."""
    import importlib.util

    if launched_with_deepspeed() and importlib.util.find_spec("deepspeed") is None:
        raise DistillError("The launch config uses DeepSpeed (distributed_type: DEEPSPEED), but the deepspeed package "
                           "is not installed: install it (`pip install \"diffusers-hprune[deepspeed]\"`; DeepSpeed builds "
                           "its ops for your torch and CUDA), "
                           "or launch with examples/accelerate_configs/fsdp.yaml or multi_gpu.yaml.")


#: What the process-group timeout is sized by besides the drawing (``DRAW_SECONDS_PER_STEP``; docs/combinations.md,
#: "Several processes"): the encoding of one training image, and the disk's write rate.
ENCODE_SECONDS_PER_IMAGE = 0.5
WRITE_BYTES_PER_SECOND = 100e6
UNKNOWN_DATASET_SAMPLES = 100_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _process_timeout(config: DistillConfig, spec: DataSpec, plan) -> timedelta:
    """How long a process waits at a barrier before the job is given up (``InitProcessGroupKwargs``).

    Every process but the main one waits while the main process alone draws (or encodes) the
    training data, and while it writes the trained student and its checkpoints: the timeout
    outlasts that work (:func:`~diffusers_hprune.utils.distributed.lone_work_timeout` of the estimate:
    the samples times the teacher's steps at ``DRAW_SECONDS_PER_STEP``, or the images at
    ``ENCODE_SECONDS_PER_IMAGE``, plus 16 bytes per student parameter at ``WRITE_BYTES_PER_SECOND``).
    ``--process_timeout_minutes`` sets it instead.
    """
    if config.process_timeout_minutes is not None:
        return timedelta(minutes=config.process_timeout_minutes)
    samples = _sample_count(spec)
    if spec.prompts:
        profile, _ = identify(config.teacher)
        steps = spec.teacher_steps or (profile.num_inference_steps if profile is not None else 28)
        work = samples * steps * DRAW_SECONDS_PER_STEP
    else:
        work = samples * ENCODE_SECONDS_PER_IMAGE
    try:
        parameters = inspect_transformer(dict(load_transformer_config(config.teacher), prune_plan=plan.to_dict())).params
    except (HPruneError, OSError, ValueError):  # a model whose config cannot be read without loading it: FLUX.1's size
        parameters = 12_000_000_000
    return lone_work_timeout(work + 16 * parameters / WRITE_BYTES_PER_SECOND)


def _sample_count(spec: DataSpec) -> int:
    """The training samples the options describe (at most ``--max_samples``), without loading the data."""
    if spec.prompts:
        count = len(read_prompts(spec.prompts))
    elif spec.train_data_dir and Path(spec.train_data_dir).is_dir():
        count = sum(1 for p in Path(spec.train_data_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        count = UNKNOWN_DATASET_SAMPLES
    return min(count, spec.max_samples) if spec.max_samples else count


def _checked_data_spec(config: DistillConfig):
    """The training data the options describe, and the option combinations refused before any loading."""

    spec = DataSpec(
        prompts=config.prompts, train_data_dir=config.train_data_dir, dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name, data_files=config.data_files,
        image_column=config.image_column, caption_column=config.caption_column, resolution=config.resolution,
        teacher_steps=config.teacher_steps, guidance_scale=config.guidance_scale, max_samples=config.max_samples,
        seed=config.seed,
    )
    spec.check()
    if config.prompts:
        read_prompts(config.prompts)  # readable, UTF-8, with prompts: said now, not after loading the teacher
    spec.held_out = _held_out_for_validation(config)
    return spec


def _held_out_for_validation(config: DistillConfig) -> tuple[str, ...]:
    """Prompts kept out of training to draw the validation images, when validation is on and none were given.

    The last distinct lines of ``--prompts`` (at most 4, at most a fifth of them), as Diffusers'
    training scripts draw held-out prompts; with image-caption data ``--validation_prompt`` is needed.
    """
    if config.validation_prompts or not config.validation_steps:
        return ()
    if not config.prompts:
        raise DistillError("--validation_steps with image-caption data needs the prompts to draw: pass "
                           "--validation_prompt PROMPT (repeatable).")
    held = held_out_prompts(read_prompts(config.prompts), 4)
    if not held:
        raise DistillError(f"--validation_steps needs --validation_prompt PROMPT, or at least 2 distinct prompts in "
                           f"{config.prompts} (the last ones are held out of training and drawn).")
    return tuple(held)


def _resume_point(config: DistillConfig, output_dir: Path, say) -> Path | None:
    """The checkpoint to resume from, or None; refuses an output folder that holds another run."""
    resume_path = _resume_path(config, output_dir)
    if config.resume_from_checkpoint and resume_path is None:
        say(f"no checkpoint in {output_dir} to resume from; starting at step 0")
    if resume_path is None and not config.overwrite and _holds_a_run(output_dir):
        raise DistillError(f"{output_dir} already holds a distillation run (checkpoints or a saved pipeline); continue "
                           "it with --resume_from_checkpoint latest, replace it with --overwrite, or choose another "
                           "--output_dir.")
    return resume_path


@dataclass
class _Models:
    """The teacher pipeline and transformer, its analysis, and the pruned student."""

    pipe: Any
    teacher_name: str
    teacher: Any
    family: Any
    report: Any
    student: Any
    plan: Any
    ratio: float


def _teacher_and_student(config: DistillConfig, plan, device, main: bool = True) -> _Models:
    """Load the teacher once, in the weight dtype, on the training device; the student is its pruned twin.

    The student shares every kept weight with the teacher (``prune_transformer`` copies nothing);
    what will train gets its own float32 copy later (:func:`_own_trainable_copies`), so the
    teacher is never copied whole. Only the main process loads the text encoders: it alone encodes
    the training data into the cache, which the others read.
    """

    if config.teacher_4bit:
        pipe, teacher_name, student = _nf4_teacher_and_student(config, plan, device, main)
        teacher = pipe.transformer
    else:
        pipe, teacher_name = _load_teacher(config, weight_dtype(config), main)
        teacher = pipe.transformer.to(device)
        student = prune_transformer(teacher, plan)
    family = get_family(teacher)
    report = ContributionReport.load(config.analysis) if config.analysis else None
    if report is not None:
        report.check_model(teacher)
    plan = student.prune_plan
    ratio = _plan_ratio(plan, dict(teacher.config))
    teacher.requires_grad_(False).eval()
    return _Models(pipe, teacher_name, teacher, family, report, student, plan, ratio)


def _check_resolution(config: DistillConfig, models: _Models) -> None:
    """``--resolution`` must give latents of whole patches: a multiple of ``loading.pixel_multiple`` (before any drawing)."""
    multiple = pixel_multiple(models.pipe)  # the VAE's downsampling times the 2 x 2 patches: 16 for SD3 / FLUX
    if config.resolution is None or not multiple or config.resolution % multiple == 0:
        return
    lower = config.resolution // multiple * multiple
    choices = " or ".join(str(r) for r in (lower, lower + multiple) if r > 0)
    raise DistillError(f"--resolution {config.resolution} does not fit {models.teacher_name}: its images must be a "
                       f"multiple of {multiple} pixels (the VAE's downsampling times the transformer's patch); use "
                       f"{choices}.")


def _load_nf4_transformer(folder: Path, dtype: torch.dtype):
    """The teacher's transformer, quantised to NF4 while it loads, with the settings ``hprune quantize`` writes
    (:func:`~diffusers_hprune.utils.nf4_settings.nf4_config`: double quantisation, the family's 16-bit modules).

    On a GPU through Diffusers' bitsandbytes loader (onto this process's device); on a CPU through the
    project's CPU loading path, where the 4-bit layers compute in float32.
    """
    config = load_transformer_config(folder)
    family = get_family(config)
    compute = dtype if dtype != torch.float32 else default_compute_dtype()
    quant = nf4_config(family.default_nf4_skip_modules, compute)
    with cpu_nf4_loading():
        model = family.base_class.from_pretrained(folder, subfolder="transformer", quantization_config=quant,
                                                  dtype=dtype)
    if not accelerator_available():
        keep_cpu_layout(model)
        compute_in_fp32_on_cpu(model)
    return model


def _student_from_files(folder: Path, plan, dtype: torch.dtype, device):
    """The pruned student read from the transformer's files: only the kept tensors, in ``dtype``, on ``device``.

    With an NF4 teacher no 16-bit teacher exists to share weights with; reading the kept
    tensors from the checkpoint, one at a time, never holds the whole 16-bit transformer.
    A tensor the plan slices (a FLUX single block's ``proj_out`` without ``attn`` or ``mlp``) is
    cut as ``prune_transformer`` cuts it (``family.prune_state_dict``).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open

    config = load_transformer_config(folder)
    family = get_family(config)
    plan = family.check_plan(PrunePlan.from_dict(plan), config)
    settings = {k: v for k, v in config.items() if not k.startswith("_") and k != "prune_plan"}
    with init_empty_weights():
        student = pruned_class_for(family).from_config(settings, prune_plan=plan.to_dict())
    wanted = set(student.state_dict())
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt", device="cpu") as f:
            for key in f.keys():
                if key in wanted:
                    kept = family.prune_state_dict({key: f.get_tensor(key)}, plan, config)[key]
                    state[key] = kept.to(device, dtype)
    missing = wanted - set(state)
    if missing:
        raise DistillError(f"The teacher's files in {folder} lack {len(missing)} weight(s) the student keeps (e.g. "
                           f"{sorted(missing)[0]}); give the folder of a complete transformer.")
    student.load_state_dict(state, strict=True, assign=True)
    return student


def _nf4_teacher_and_student(config: DistillConfig, plan, device, main: bool = True):
    """``--teacher_4bit``: the NF4 teacher loaded directly, the student from the kept tensors of the files."""
    folder = pipeline_folder(config.teacher)
    if folder is None:
        raise DistillError(f"--teacher_4bit reads the teacher's files; {config.teacher!r} is no pipeline folder, toy "
                           "or Hub id in the local cache. Download it first (huggingface-cli download ...).")
    dtype = weight_dtype(config)
    teacher = _load_nf4_transformer(folder, dtype)
    pipe, _ = load_pipeline(folder, None, dtype, transformer=teacher,  # the text encoders stay on the CPU
                            **_without_text_encoders(main))
    student = _student_from_files(folder / "transformer", plan, dtype, device)
    return pipe, str(config.teacher), student


def _own_trainable_copies(student) -> int:
    """Give every trainable parameter of the student its own float32 storage; returns how many bytes that took.

    Until now the student shares the teacher's tensors (frozen parts stay shared: PWP's early
    blocks, and with LoRA every base weight). Replacing ``.data`` keeps the Parameter objects the
    optimizer groups hold.
    """
    nbytes = 0
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32, copy=True)
            nbytes += p.numel() * 4
    return nbytes


def _trainable_groups(config: DistillConfig, models: _Models, pwp, say):
    """SGDistill's parameter groups of what PWP left trainable (LoRA adapters on it with --lora_rank).

    Trainable parameters that cannot change the loss (:func:`~.reach.parameters_off_the_loss`: e.g. with
    ``--lambda_feat 0`` the text-stream output of an SD3 student's new last block) are frozen first: they
    would never get a gradient, which stops a multi-process run. Returns ``(use_sg, lora_config, groups,
    frozen names)``.
    """

    student, report = models.student, models.report
    ratio, source = sgdistill_ratio(models.plan, models.ratio)
    use_sg = config.sgdistill and ratio >= config.r_thres
    if config.sgdistill and not use_sg:
        say(f"plan {source} {ratio:.1%} < r_thres {config.r_thres:.0%}: plain distillation (one learning rate)")
    if use_sg and report is None:
        raise DistillError("SGDistill needs the contribution analysis: pass --analysis analysis.json "
                           "(or --no-sgdistill).")
    lora_config = None
    if config.lora_rank:
        student.requires_grad_(False)
        lora_config = _lora_config(student, pwp.trainable_modules, config.lora_rank, config.lora_alpha)
        student.add_adapter(copy.deepcopy(lora_config))
    off_the_loss = parameters_off_the_loss(student, config.lambda_feat)
    if off_the_loss:
        named = dict(student.named_parameters())
        for name in off_the_loss:
            named[name].requires_grad_(False)
        modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in off_the_loss))
        say(f"frozen: {len(off_the_loss)} trainable parameter(s) that no term of the loss reads "
            f"({', '.join(modules[:6])}{', ...' if len(modules) > 6 else ''})"
            + ("; with --lambda_feat 0 only the student's output counts" if not config.lambda_feat else ""))
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    groups = sgdistill_param_groups(
        student, report.contributions() if report is not None else None, config.learning_rate, enabled=use_sg,
        floor=config.sensitivity_floor, eps=config.sensitivity_eps, binary=config.binary_freeze,
    )
    return use_sg, lora_config, groups, off_the_loss


def _prepare_output_dir(config: DistillConfig, output_dir: Path, resume_path, identity: dict, accelerator,
                        say) -> None:
    """Check the checkpoint belongs to this run and is whole, then (main process) make ``output_dir`` this run's.

    Nothing is written before the checks. Then what an interrupted run left is removed
    (:func:`_remove_leftovers`), a new run with --overwrite drops the old run's checkpoints
    (this command's only: the folder is a run folder, :func:`_checked_output_dir`), and the
    run's identity is written to ``output_dir/hprune_run.json``.
    """
    if resume_path is not None:
        _check_resume(resume_path, identity)
        _check_state_files(resume_path, accelerator)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not accelerator.is_main_process:
        return
    _remove_leftovers(output_dir, say)
    if config.overwrite and resume_path is None:
        for old in _own_checkpoints(output_dir):  # a new run: the old run's checkpoints must not be resumed
            shutil.rmtree(old)
    _write_identity(output_dir / RUN_FILE, identity)


def _remove_leftovers(output_dir: Path, say) -> None:
    """Delete the temporary copies an interrupted save or checkpoint left (only names this code creates)."""
    for entry in sorted(output_dir.iterdir()):
        if entry.is_symlink():
            continue
        if entry.is_dir() and LEFTOVER_FOLDER.fullmatch(entry.name):
            say(f"removing {entry}, left by an interrupted save")
            shutil.rmtree(entry)
        elif entry.is_file() and LEFTOVER_FILE.fullmatch(entry.name):
            say(f"removing {entry}, left by an interrupted save")
            entry.unlink()


def _write_identity(path: Path, identity: dict) -> None:
    """Write the run's identity, unless the file already holds it (a resumed run leaves it as it was)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")) == identity:
            return
    atomic_write_json(path, identity)


def _check_state_files(path: Path, accelerator) -> None:
    """The files ``accelerator.load_state`` reads are there and whole (cheap checks, before anything is written).

    Weights in safetensors (their header covers the file), optimizer state as a ``torch.save``
    zip (its directory at the end), and this command's progress record. FSDP / DeepSpeed write
    layouts of their own: there ``load_state`` alone checks.
    """
    from accelerate.utils import DistributedType
    from safetensors import SafetensorError, safe_open

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    model, optimizer = path / "model.safetensors", path / "optimizer.bin"
    if not model.is_file() and not (path / "pytorch_model.bin").is_file():
        _damaged(path, f"{model.name} is missing")
    if not optimizer.is_file():
        _damaged(path, f"{optimizer.name} is missing")
    try:
        if model.is_file():
            with safe_open(str(model), "pt", device="cpu") as f:
                f.keys()
    except (OSError, SafetensorError) as e:
        _damaged(path, f"{model.name} cannot be read ({e})")
    try:
        with zipfile.ZipFile(optimizer):
            pass
    except (OSError, zipfile.BadZipFile) as e:
        _damaged(path, f"{optimizer.name} cannot be read ({e})")
    _Progress.load(path)


def _damaged(path: Path, what: str) -> NoReturn:
    raise DistillError(f"The checkpoint {path} is damaged: {what}. Resume from an earlier checkpoint "
                       f"(--resume_from_checkpoint {path.parent / 'checkpoint-N'}), or delete {path} and resume from "
                       "'latest' (the newest whole one).")


def _optimizer(config: DistillConfig, groups, lora_config, say):
    """AdamW (8-bit with --use_8bit_adam) over the SGDistill groups, each with its own learning rate."""
    trainable = sum(g.numel for g in groups)
    say(f"optimizer: {len(groups)} parameter group(s), {trainable:,} trainable parameters"
        + (f" (LoRA rank {config.lora_rank} on {len(lora_config.target_modules)} layers)" if lora_config else ""))
    for g in groups:
        say(f"  {g.name}: lr {g.lr:.3g} (m = {g.multiplier:.3g}), {g.numel:,} parameters")
    if config.use_8bit_adam:
        optimizer_cls = import_bitsandbytes().optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls([g.as_dict() for g in groups], lr=config.learning_rate, weight_decay=config.adam_weight_decay)


def _training_data(accelerator, pipe, spec, config: DistillConfig, output_dir: Path, say, components: str):
    """The training samples, encoded once by the main process into the cache, then loaded by every process."""

    cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "data-cache"
    if accelerator.is_main_process:
        with components_on(pipe, accelerator.device):  # then back on the CPU: steps need only the cached embeddings
            build_training_cache(pipe, spec, cache_dir, progress=config.progress, components=components)
            if config.validation_steps:  # encoded now: no text encoder comes back to the device mid-training
                validation.encode_validation_prompts(pipe, get_family(pipe.transformer), config.validation_prompts,
                                                     _validation_settings(pipe, config), output_dir)
    accelerator.wait_for_everyone()
    dataset, cache_path = build_training_cache(pipe, spec, cache_dir, progress=False, components=components)
    say(f"training data: {len(dataset)} samples cached in {cache_path}")
    return dataset


@dataclass
class _Run:
    """What the training loop and the save need: the prepared student and optimizer, the teacher, the data."""

    config: DistillConfig
    accelerator: Any
    pipe: Any
    teacher: Any
    family: Any
    student: Any  # as Accelerate prepared it (DDP / FSDP wrapper)
    inner: Any  # the student module itself (unwrapped)
    optimizer: Any
    groups: list
    dataset: Any
    identity: dict
    output_dir: Path
    weight_dtype: torch.dtype
    kept: list
    sampler: _StepSampler
    sigmas: torch.Tensor  # float32: timesteps are computed at full precision, as the pipelines do at inference
    num_train_timesteps: int
    validation_embeds: dict | None = None
    without_gradient: list[str] | None = None  # trainable parameters with no gradient at the first step

    @classmethod
    def prepare(cls, config, accelerator, models: _Models, optimizer, groups, dataset, identity, output_dir):
        """Hand the student and optimizer to Accelerate (DDP / FSDP / DeepSpeed wrap them).

        Afterwards ``groups`` no longer hold their parameters: under FSDP2 those are the unsharded
        tensors from before ``prepare`` (the optimizer now holds the sharded ones), and keeping them
        would keep a full copy of every trainable weight alive on every GPU.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        dtype = weight_dtype(config)
        # Batches, noise and noise levels are functions of (seed, micro-step, rank): a resumed run draws
        # exactly what the uninterrupted run would have drawn.
        sampler = _StepSampler(len(dataset), config.train_batch_size, accelerator.num_processes, config.seed)
        student, optimizer = accelerator.prepare(models.student, optimizer)
        for group in groups:
            group.params = []
        teacher = models.teacher  # on the device, in the weight dtype, since it was loaded
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.pipe.scheduler.config)
        inner = accelerator.unwrap_model(student)
        embeds = (validation.load_validation_embeds(output_dir, config.validation_prompts)
                  if config.validation_steps else None)
        return cls(config, accelerator, models.pipe, teacher, models.family, student, inner, optimizer, groups,
                   dataset, identity, output_dir, dtype, kept_blocks(inner), sampler,
                   scheduler.sigmas.to(accelerator.device, torch.float32), scheduler.config.num_train_timesteps,
                   embeds)

    def held_out_loss(self) -> float:
        return _fixed_batch_loss(self.inner, self.teacher, self.family, self.dataset, self.kept,
                                 self.accelerator.device, self.weight_dtype, self.config)


@dataclass
class _Progress:
    """What the summary covers across resumes: every step's losses, the seconds of all segments, the start loss."""

    losses: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    start_loss: float | None = None

    def to_dict(self, seconds: float) -> dict:
        return {"losses": self.losses, "seconds": seconds, "start_loss": self.start_loss}

    @classmethod
    def load(cls, checkpoint: Path) -> _Progress | None:
        """The progress saved with a checkpoint; None for a checkpoint of an older version (which saved none)."""
        path = checkpoint / PROGRESS_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls([dict(e) for e in data["losses"]], float(data["seconds"]), data["start_loss"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            _damaged(checkpoint, f"{PROGRESS_FILE} cannot be read ({type(e).__name__}: {e})")


def _resume(run: _Run, resume_path: Path | None, say) -> tuple[int, _Progress]:
    """The step to start at and the progress so far: 0, or the checkpoint's, with model, optimizer and RNG restored."""
    from safetensors import SafetensorError

    if resume_path is None:
        return 0, _Progress()
    try:
        run.accelerator.load_state(str(resume_path))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
            SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _damaged(resume_path, f"Accelerate could not load it ({type(e).__name__}: {reason[:300]})")
    step = _checkpoint_step(resume_path)
    progress = _Progress.load(resume_path)
    if progress is None:
        say(f"{resume_path} records no losses (an older checkpoint): the summary covers the steps from {step + 1}")
        progress = _Progress()
    say(f"resumed from {resume_path} at step {step}")
    return step, progress


class _NotFinite(Exception):
    """A loss or gradient norm that is nan or inf (raised before the optimizer step takes it)."""

    def __init__(self, what: str, value: float):
        super().__init__(what)
        self.what, self.value = what, value


def _train(run: _Run, step: int, progress: _Progress) -> int:
    """Optimizer steps until --max_train_steps (or the --max_train_minutes budget), recorded in ``progress``.

    Returns the step reached. A loss or gradient that is not finite stops the run with a
    DistillError before the optimizer step: nothing more is saved, the last checkpoint stays.
    """
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    before = progress.seconds
    start = time.perf_counter()
    # With a wall-clock budget, whichever ends first ends the run: the bar's total is the step budget or the steps
    # the time left allows at the rate so far, whichever is smaller (no false ETA for an unreachable step cap).
    budget = config.max_train_minutes is not None
    first = step
    bar = tqdm(total=config.max_train_steps, initial=step, unit="step",
               desc=f"distilling (at most {config.max_train_minutes:g} min)" if budget else "distilling",
               disable=not (config.progress and accelerator.is_main_process))
    run.student.train()
    while step < config.max_train_steps:
        if budget and (time.perf_counter() - start) / 60 >= config.max_train_minutes:
            break
        accumulation = config.gradient_accumulation_steps
        try:
            for micro in range(step * accumulation, (step + 1) * accumulation):
                parts = _micro_step(run, micro)
        except _NotFinite as e:
            bar.close()
            raise _not_finite_error(run, step + 1, e) from None
        step += 1
        progress.losses.append({"step": step, **parts})
        if budget:
            bar.total = projected_total(step - first, time.perf_counter() - start, config.max_train_minutes * 60,
                                        step, config.max_train_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{parts['total']:.4g}", kd=f"{parts['kd']:.3g}", feat=f"{parts['feat']:.3g}")
        accelerator.log(parts, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            _checkpoint(accelerator, run.output_dir, step, config.checkpoints_total_limit, run.identity,
                        progress.to_dict(before + time.perf_counter() - start))
        if config.validation_steps and step % config.validation_steps == 0:
            _validate(run, step)  # on every process: a sharded student's forward is collective
    bar.close()
    progress.seconds = before + time.perf_counter() - start
    return step


def projected_total(done: int, elapsed: float, allowed: float, step: int, max_steps: int) -> int:
    """The step a run with a wall-clock budget will stop at: ``max_steps``, or earlier if ``done`` steps in
    ``elapsed`` seconds say the remaining ``allowed - elapsed`` seconds end it first (at least ``step``)."""
    if done <= 0 or elapsed <= 0:
        return max_steps
    return max(step, min(max_steps, step + int(done / elapsed * max(allowed - elapsed, 0.0))))


def _not_finite_error(run: _Run, step: int, e: _NotFinite) -> DistillError:
    last = _latest_checkpoint(run.output_dir)
    kept = f"the last checkpoint, {last}, is kept" if last is not None else "no checkpoint was written before it"
    return DistillError(
        f"The {e.what} at step {step} is {e.value} (not a finite number): training stopped before the optimizer step, "
        f"and nothing more was saved ({kept}). Lower --learning_rate or --max_grad_norm, use --mixed_precision bf16 or "
        "no instead of fp16, or check the training data; then start a new run (--overwrite, or another --output_dir)."
    )


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    """``value`` is finite on every process (they all stop together, or none does)."""
    flag = torch.isfinite(value.detach().float()).all().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.gather(flag).min()
    return bool(flag)


def _micro_step(run: _Run, micro: int) -> dict:
    """One micro-batch: noisy latents at logit-normal noise levels, teacher and student, L_KD + L_feat (+ L_task)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    config, accelerator, family, dtype = run.config, run.accelerator, run.family, run.weight_dtype
    batch = run.dataset[run.sampler.indices(micro, accelerator.process_index)]
    x0 = batch["latents"].to(accelerator.device, torch.float32)
    text = {k: batch[k].to(accelerator.device, dtype) for k in ("prompt_embeds", "pooled_projections")}
    seed = run.sampler.seed(micro, accelerator.process_index)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], config.logit_mean, config.logit_std)
    # Noise levels and the timesteps made of them stay float32 (in bf16, SD3's timestep 750 becomes 752); the
    # noisy latents are mixed in float32, then cast to the weight dtype.
    sigmas = run.sigmas[(u * run.num_train_timesteps).long().clamp(max=len(run.sigmas) - 1)]
    noise = torch.randn(x0.shape, generator=gen).to(accelerator.device, torch.float32)
    s = sigmas.view(-1, 1, 1, 1)
    x_t = ((1 - s) * x0 + s * noise).to(dtype)
    inputs = family.denoiser_inputs(run.inner, x_t, sigmas, text, config.guidance_scale)
    with torch.no_grad(), BlockFeatures(run.teacher, run.kept) as ft:
        v_t = family.denoiser_output(run.teacher(**inputs, return_dict=False)[0], x0)
    with accelerator.accumulate(run.student), accelerator.autocast(), BlockFeatures(run.inner, run.kept) as fs:
        v_s = family.denoiser_output(run.student(**inputs, return_dict=False)[0], x0)
        task = torch.nn.functional.mse_loss(v_s.float(), (noise - x0).float()) if config.lambda_task else None
        loss, parts = distillation_loss(v_s, v_t, fs.outputs, ft.outputs, config.lambda_feat, task, config.lambda_task)
        if not _all_finite(accelerator, loss):
            raise _NotFinite("loss", float(loss.detach()))
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.without_gradient is None:
            run.without_gradient = _without_gradient(run)
        if accelerator.sync_gradients and config.max_grad_norm:
            # The prepared model's parameters (under FSDP2 the sharded ones, whose gradients exist): Accelerate
            # recognises the model's own parameter list and clips it as the wrapper needs.
            norm = accelerator.clip_grad_norm_(list(run.student.parameters()), config.max_grad_norm)
            # fp16's grad scaler skips a step with inf gradients itself (and lowers its scale); otherwise: stop
            if norm is not None and accelerator.scaler is None and not _all_finite(accelerator, torch.as_tensor(norm)):
                raise _NotFinite("gradient norm", float(norm))
            if norm is not None:  # before clipping; DeepSpeed clips inside its engine and reports none
                parts["grad_norm"] = float(_full(torch.as_tensor(norm)))
        run.optimizer.step()
        run.optimizer.zero_grad()
    return parts


def _without_gradient(run: _Run) -> list[str]:
    """The trainable parameters without a gradient after the first synchronised backward (none, in a correct run).

    Under several processes that is fatal (DDP stops at the next step, naming no parameter): refused here,
    with the names. DeepSpeed keeps the gradients inside its engine: nothing to look at there.
    """
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
        return []
    missing = [name for name, p in run.student.named_parameters() if p.requires_grad and p.grad is None]
    if missing and run.accelerator.num_processes > 1:
        raise DistillError(f"{len(missing)} trainable parameter(s) got no gradient at the first step ("
                           f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); several processes cannot "
                           "train such a model. This is a bug of diffusers-hprune: please report it with the plan.")
    return missing


def _gradient_record(run: _Run) -> dict:
    """How many trainable parameters had no gradient at the first step, per process (all 0 in a correct run)."""
    missing = run.without_gradient or []
    if missing:
        run.accelerator.print(f"warning: {len(missing)} trainable parameter(s) got no gradient and did not train: "
                              f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    counts = run.accelerator.gather(torch.tensor([len(missing)], device=run.accelerator.device))
    return {"trainable_without_gradient": [int(c) for c in counts.cpu()]}


def _precision_record(run: _Run, models: _Models) -> dict:
    """The precision the run used: Accelerate's mixed precision, the teacher's weights, the trainable copies."""
    teacher = "nf4" if run.config.teacher_4bit else str(run.weight_dtype).removeprefix("torch.")
    # what the optimizer updates (under FSDP2 the sharded master weights, not the gathered 16-bit views)
    trainable = sorted({str(p.dtype).removeprefix("torch.") for g in run.optimizer.param_groups for p in g["params"]})
    return {"mixed_precision": run.config.mixed_precision, "teacher_dtype": teacher,
            "frozen_dtype": str(run.weight_dtype).removeprefix("torch."), "trainable_dtype": ", ".join(trainable)}


def _resharded(module) -> None:
    """Under FSDP2, every unit of ``module`` back in its sharded state (its parameters the trained, sharded ones)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (a parameter sharded by FSDP2) gathered from every rank (call on every rank)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _rank_checksums(run: _Run) -> dict:
    """Every rank must hold the same weights (DDP keeps them in step): each rank's weight sum, gathered.

    A parameter sharded by FSDP2 is gathered whole first, one at a time, so every rank sums the whole model.
    """
    checksum = torch.tensor([sum(float(float64(_full(p.detach())).sum()) for p in run.inner.parameters())],
                            device=run.accelerator.device, dtype=torch.float64)
    checksums = [float(c) for c in run.accelerator.gather(checksum).cpu()]
    return {"rank_checksums": checksums, "ranks_identical": len(set(checksums)) == 1}


def _save_student(run: _Run, models: _Models, lora_config, summary: dict, say) -> None:
    """The trained student (LoRA merged) as a pruned pipeline in output_dir, with plan.json and the summary."""

    finite = torch.tensor(all(bool(torch.isfinite(p.detach()).all()) for p in run.inner.parameters()))
    if not _all_finite(run.accelerator, torch.where(finite, 0.0, torch.nan)):  # every process refuses, together
        raise DistillError("The trained weights hold values that are not finite: nothing was saved (the checkpoints "
                           "stay). Lower --learning_rate or --max_grad_norm and start a new run (--overwrite, or "
                           "another --output_dir).")
    final = _final_student(run.accelerator, run.student, run.family, lora_config)
    if run.accelerator.is_main_process:
        student_pipe = with_pruned_transformer(run.pipe, final)
        student_pipe.to("cpu")
        _save_pipeline(student_pipe, run.output_dir, pipeline_folder(models.teacher_name))
        models.plan.save(run.output_dir / "plan.json")
        atomic_write_json(run.output_dir / SUMMARY_FILE, summary)
        say(f"distilled {summary['steps']} steps in {summary['seconds'] / 60:.1f} min; saved the pruned pipeline to "
            f"{run.output_dir}")


@torch.no_grad()
def _fixed_batch_loss(student, teacher, family, dataset, kept, device, dtype, config: DistillConfig) -> float:
    """The distillation loss on the first (up to) 8 samples at fixed noise levels and noise: comparable over time."""

    n = min(8, len(dataset))
    batch = dataset[:n]
    x0 = batch["latents"].to(device, torch.float32)
    text = {k: batch[k].to(device, dtype) for k in ("prompt_embeds", "pooled_projections")}
    sigmas = torch.linspace(0.1, 0.9, n, device=device, dtype=torch.float32)  # as in _micro_step: float32 timesteps
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234)).to(device, torch.float32)
    x_t = ((1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise).to(dtype)
    inputs = family.denoiser_inputs(student, x_t, sigmas, text, config.guidance_scale)
    was_training = student.training
    student.eval()
    with BlockFeatures(teacher, kept) as ft, BlockFeatures(student, kept) as fs:
        v_t = family.denoiser_output(teacher(**inputs, return_dict=False)[0], x0)
        v_s = family.denoiser_output(student(**inputs, return_dict=False)[0], x0)
    student.train(was_training)
    return float(distillation_loss(v_s, v_t, fs.outputs, ft.outputs, config.lambda_feat)[0])


def _checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, identity: dict, progress: dict) -> None:
    """``save_state`` into ``.checkpoint-<step>.tmp`` with the identity and progress, renamed when complete.

    With ``limit`` only the newest ``limit`` of this command's checkpoints stay (other folders,
    ``checkpoint-best`` say, are never touched).
    """
    target = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            safetensors_user_modes(tmp)  # the weights Accelerate saved (safetensors writes 0600 whatever the umask)
            atomic_write_json(tmp / RUN_FILE, identity)
            atomic_write_json(tmp / PROGRESS_FILE, progress)
            with uninterrupted():  # the old checkpoint or the new one, never neither
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
    except BaseException:  # a full disk, a signal: no half-written checkpoint stays behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process and limit:
        for old in _own_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _validation_settings(pipe, config: DistillConfig) -> dict:
    """The pipeline call arguments of the validation drawings: the teacher's profile, at the training resolution."""
    return generation_settings(pipe, None, config.resolution, config.resolution, config.guidance_scale)


def _validate(run: _Run, step: int) -> None:
    """Draw the validation prompts (given, or held out of --prompts) with the student; the main process writes them."""
    config, accelerator = run.config, run.accelerator
    path = run.output_dir / validation.FOLDER / f"step-{step}.png" if accelerator.is_main_process else None
    validation.draw_validation(
        run.pipe, run.inner, run.validation_embeds, _validation_settings(run.pipe, config),
        [config.seed + k for k in range(len(config.validation_prompts))], device=accelerator.device,
        dtype=run.weight_dtype, autocast=accelerator.autocast(), path=path)


__all__ = ["DistillConfig", "DistillError", "distill"]
