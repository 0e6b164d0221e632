"""How a distillation is launched: the Accelerate set-up (precision, trackers, DeepSpeed), how long a process waits for
another, and the training data the options describe."""

from __future__ import annotations

from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.distillation import validation
from diffusers_hprune.distillation.data import DataSpec, build_training_cache, held_out_prompts, read_prompts
from diffusers_hprune.distillation.settings import DistillConfig, DistillError
from diffusers_hprune.loading import TEXT_ENCODERS, components_on, generation_settings
from diffusers_hprune.profiles import identify
from diffusers_hprune.utils.compat import forget_other_precision
from diffusers_hprune.utils.distributed import (
    DRAW_SECONDS_PER_STEP,
    launched_on_cpu,
    launched_with_deepspeed,
    lone_work_timeout,
    resolved_mixed_precision,
)
from diffusers_hprune.utils.errors import HPruneError


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
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and config.teacher_4bit and config.lora_rank:
        raise DistillError(f"--teacher_4bit with --lora_rank (the QLoRA student) does not run under "
                           f"{'FSDP' if accelerator.distributed_type == DistributedType.FSDP else 'DeepSpeed'}: the "
                           "student's base is the NF4 teacher's own packed 4-bit layers, which cannot be sharded. "
                           "Launch with DDP (examples/accelerate_configs/multi_gpu.yaml; each GPU holds the NF4 "
                           "teacher once and trains only the adapters), or drop --teacher_4bit.")
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

    options = {f.name for f in fields(DistillConfig)}  # the data options are the config's own, by name
    spec = DataSpec(**{f.name: getattr(config, f.name) for f in fields(DataSpec) if f.name in options})
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


def _training_data(accelerator, pipe, spec, config: DistillConfig, output_dir: Path, say, components: str):
    """The training samples, encoded once by the main process into the cache, then loaded by every process."""

    cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "data-cache"
    if accelerator.is_main_process:
        # each encoder on the device only while it computes, then back on the CPU: steps need only the cache
        build_training_cache(pipe, spec, cache_dir, progress=config.progress, components=components,
                             device=accelerator.device)
        if config.validation_steps:  # encoded now: no text encoder comes back to the device mid-training
            with components_on(pipe, accelerator.device, TEXT_ENCODERS):
                validation.encode_validation_prompts(pipe, get_family(pipe.transformer), config.validation_prompts,
                                                     _validation_settings(pipe, config), output_dir)
    accelerator.wait_for_everyone()
    dataset, cache_path = build_training_cache(pipe, spec, cache_dir, progress=False, components=components)
    say(f"training data: {len(dataset)} samples cached in {cache_path}")
    return dataset


def _validation_settings(pipe, config: DistillConfig) -> dict:
    """The pipeline call arguments of the validation drawings: the teacher's profile, at the training resolution."""
    return generation_settings(pipe, None, config.resolution, config.resolution, config.guidance_scale)
