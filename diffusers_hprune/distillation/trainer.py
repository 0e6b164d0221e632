"""The distillation run (Algorithm 1, stage 2) with Accelerate: ``hprune distill`` and ``examples/distill.py``.

teacher pipeline + plan (+ analysis) -> student = prune_transformer(copy of the teacher's
transformer, plan) -> PWP freezing -> SGDistill parameter groups (ratio >= r_thres) ->
cached training data -> steps of ``L_KD + lambda_feat L_feat (+ lambda_task L_task)`` at
logit-normal noise levels -> a pruned pipeline in ``output_dir`` that loads with
``DiffusionPipeline.from_pretrained`` after ``import diffusers_hprune``.

Runs on one process or under ``accelerate launch`` (DDP; FSDP / DeepSpeed through Accelerate
configs). Checkpoints (``accelerator.save_state``) go to ``output_dir/checkpoint-<step>``;
``resume_from_checkpoint="latest"`` continues from the newest.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HPruneError


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
    mixed_precision: str = "no"
    seed: int = 0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # the method
    lambda_feat: float = 1.0
    lambda_task: float = 0.0
    pwp: bool = True
    sgdistill: bool = True
    sensitivity_floor: float = 0.0
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
    overwrite: bool = False
    progress: bool = True


RUN_FILE = "hprune_run.json"


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


def _run_identity(teacher_fingerprint: str, plan, student, groups, config: DistillConfig) -> dict:
    """What a checkpoint must share with the run resuming from it."""
    return {
        "teacher": teacher_fingerprint, "plan": plan.to_dict(), "lora_rank": config.lora_rank,
        "param_groups": [g.name for g in groups], "trainable": sum(g.numel for g in groups),
        "parameters": sum(p.numel() for p in student.parameters()),
    }


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
    import json

    try:
        saved = json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise DistillError(f"{path} has no readable {RUN_FILE}: it is not a checkpoint of `hprune distill`; resume "
                           "from one of this run's checkpoints, or start without --resume_from_checkpoint.") from None
    differ = [k for k in identity if saved.get(k) != identity[k]]
    if differ:
        raise DistillError(f"{path} is a checkpoint of another run (different {', '.join(differ)}): resume with the "
                           "teacher, plan and options it was made with, or start a new run in another --output_dir.")


def _holds_a_run(output_dir: Path) -> bool:
    if not output_dir.is_dir():
        return False
    return (output_dir / "model_index.json").exists() or _latest_checkpoint(output_dir) is not None


def _checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else ``None``."""
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(step, p) for p in output_dir.glob("checkpoint-*") if (step := _checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _plan_ratio(plan, config) -> float:
    from ..inventory import inspect_transformer

    inventory = inspect_transformer(dict(config, prune_plan=plan.to_dict()))
    return inventory.removed_fraction


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


def _load_teacher(config: DistillConfig, dtype: torch.dtype):
    from ..analysis import _load_pipeline

    pipe, name = _load_pipeline(config.teacher, "cpu", dtype)
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
        final = family.pruned_class.from_config(config)
        if lora_config is not None:
            final.add_adapter(copy.deepcopy(lora_config))
    final.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=True,
                          assign=True)
    final.to(torch.float32)
    if lora_config is not None:
        final.fuse_lora()
        final.unload_lora()
    return final.requires_grad_(False).eval()


def _save_pipeline(pipeline, output_dir: Path) -> None:
    """Write the pipeline's files into ``output_dir`` (which also holds checkpoints); ``model_index.json`` last."""
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline.", dir=output_dir))
    try:
        pipeline.save_pretrained(tmp)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run the distillation; returns the run summary (also written to ``output_dir/distill_summary.json``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from tqdm.auto import tqdm

    from ..analysis import ContributionReport
    from ..architectures import get_family
    from ..distributed import launched_on_cpu
    from ..fileio import atomic_write_json
    from ..pipelines import with_pruned_transformer
    from ..plan import PrunePlan
    from ..prune import prune_transformer
    from .data import DataSpec, build_training_cache
    from .loss import BlockFeatures, distillation_loss, kept_blocks
    from .pwp import apply_pwp
    from .sgdistill import sgdistill_param_groups

    output_dir = Path(config.output_dir)
    _check_trackers(config.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=[t.strip() for t in config.report_to.split(",")] if config.report_to else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=launched_on_cpu(),
    )
    set_seed(config.seed)
    say = accelerator.print
    spec = DataSpec(
        prompts=config.prompts, train_data_dir=config.train_data_dir, dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name, data_files=config.data_files,
        image_column=config.image_column, caption_column=config.caption_column, resolution=config.resolution,
        teacher_steps=config.teacher_steps, guidance_scale=config.guidance_scale, max_samples=config.max_samples,
        seed=config.seed,
    )
    spec.check()
    if config.lora_rank < 0:
        raise DistillError(f"--lora_rank must be >= 0 (0 trains full weights), got {config.lora_rank}.")
    if config.teacher_4bit and not torch.cuda.is_available():
        raise DistillError("--teacher_4bit loads the teacher in NF4 through bitsandbytes, which Diffusers allows on "
                           "CUDA only; drop the flag on this machine.")
    plan = PrunePlan.load(config.plan)
    resume_path = _resume_path(config, output_dir)
    if config.resume_from_checkpoint and resume_path is None:
        say(f"no checkpoint in {output_dir} to resume from; starting at step 0")
    if resume_path is None and not config.overwrite and _holds_a_run(output_dir):
        raise DistillError(f"{output_dir} already holds a distillation run (checkpoints or a saved pipeline); continue "
                           "it with --resume_from_checkpoint latest, replace it with --overwrite, or choose another "
                           "--output_dir.")

    # Teacher and student. The student copies the teacher's transformer, then the plan removes parts.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    pipe, teacher_name = _load_teacher(config, torch.float32)
    teacher = pipe.transformer
    family = get_family(teacher)
    report = ContributionReport.load(config.analysis) if config.analysis else None
    if report is not None:
        report.check_model(teacher)
    student = prune_transformer(copy.deepcopy(teacher), plan)
    plan = student.prune_plan
    ratio = _plan_ratio(plan, dict(teacher.config))
    teacher.requires_grad_(False).eval()
    if config.teacher_4bit:
        from diffusers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        teacher = type(teacher).from_pretrained(config.teacher, subfolder="transformer", quantization_config=quant)
        teacher.requires_grad_(False).eval()
        pipe.transformer = teacher

    pwp = apply_pwp(student, enabled=config.pwp)
    say(pwp.summary())
    use_sg = config.sgdistill and ratio >= config.r_thres
    if config.sgdistill and not use_sg:
        say(f"plan ratio {ratio:.1%} < r_thres {config.r_thres:.0%}: plain distillation (one learning rate)")
    if use_sg and report is None:
        raise DistillError("SGDistill needs the contribution analysis: pass --analysis analysis.json "
                           "(or --no-sgdistill).")
    lora_config = None
    if config.lora_rank:
        student.requires_grad_(False)
        lora_config = _lora_config(student, pwp.trainable_modules, config.lora_rank, config.lora_alpha)
        student.add_adapter(copy.deepcopy(lora_config))
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    groups = sgdistill_param_groups(
        student, report.contributions() if report is not None else None, config.learning_rate, enabled=use_sg,
        floor=config.sensitivity_floor, eps=config.sensitivity_eps, binary=config.binary_freeze,
    )
    trainable = sum(g.numel for g in groups)
    from ..analysis import fingerprint

    identity = _run_identity(fingerprint(teacher), plan, student, groups, config)
    if resume_path is not None:
        _check_resume(resume_path, identity)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.overwrite and resume_path is None and accelerator.is_main_process:
        for old in output_dir.glob("checkpoint-*"):  # a new run: the old run's checkpoints must not be resumed
            shutil.rmtree(old)
    say(f"optimizer: {len(groups)} parameter group(s), {trainable:,} trainable parameters"
        + (f" (LoRA rank {config.lora_rank} on {len(lora_config.target_modules)} layers)" if lora_config else ""))
    for g in groups:
        say(f"  {g.name}: lr {g.lr:.3g} (m = {g.multiplier:.3g}), {g.numel:,} parameters")
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls([g.as_dict() for g in groups], lr=config.learning_rate,
                              weight_decay=config.adam_weight_decay)

    # Data: encoded once (main process), loaded by all.
    cache_dir = Path(config.cache_dir) if config.cache_dir else output_dir / "data-cache"
    pipe.to(accelerator.device)
    if accelerator.is_main_process:
        build_training_cache(pipe, spec, cache_dir, progress=config.progress)
    accelerator.wait_for_everyone()
    dataset, cache_path = build_training_cache(pipe, spec, cache_dir, progress=False)
    say(f"training data: {len(dataset)} samples cached in {cache_path}")
    # Batches, noise and noise levels are functions of (seed, micro-step, rank): a resumed run draws
    # exactly what the uninterrupted run would have drawn.
    sampler = _StepSampler(len(dataset), config.train_batch_size, accelerator.num_processes, config.seed)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device)
    if weight_dtype != torch.float32 and not config.teacher_4bit:
        teacher.to(dtype=weight_dtype)
    inner = accelerator.unwrap_model(student)
    kept = kept_blocks(inner)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas_table = scheduler.sigmas.to(accelerator.device)
    n_train = scheduler.config.num_train_timesteps

    step = 0
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        step = _checkpoint_step(resume_path)
        say(f"resumed from {resume_path} at step {step}")
    if config.report_to:
        accelerator.init_trackers("hprune-distill", {k: v for k, v in asdict(config).items()
                                                     if isinstance(v, (int, float, str, bool))})

    def held_out_loss() -> float:
        return _fixed_batch_loss(accelerator.unwrap_model(student), teacher, family, dataset, kept,
                                 accelerator.device, weight_dtype, config)

    eval_start = held_out_loss()
    losses: list[dict] = []
    start = time.perf_counter()
    # With a wall-clock budget the step total is only a cap: show elapsed time and rate, not a false ETA.
    budget = config.max_train_minutes is not None
    bar = tqdm(total=None if budget else config.max_train_steps, initial=step, unit="step",
               desc=f"distilling ({config.max_train_minutes:g} min budget)" if budget else "distilling",
               disable=not (config.progress and accelerator.is_main_process))
    student.train()
    while step < config.max_train_steps:
        if config.max_train_minutes is not None and (time.perf_counter() - start) / 60 >= config.max_train_minutes:
            break
        for micro in range(step * config.gradient_accumulation_steps, (step + 1) * config.gradient_accumulation_steps):
            batch = dataset[sampler.indices(micro, accelerator.process_index)]
            x0 = batch["latents"].to(accelerator.device, weight_dtype)
            text = {k: batch[k].to(accelerator.device, weight_dtype) for k in ("prompt_embeds", "pooled_projections")}
            b = x0.shape[0]
            seed = sampler.seed(micro, accelerator.process_index)
            gen = torch.Generator().manual_seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                u = compute_density_for_timestep_sampling("logit_normal", b, config.logit_mean, config.logit_std)
            sigmas = sigmas_table[(u * n_train).long().clamp(max=len(sigmas_table) - 1)].to(weight_dtype)
            noise = torch.randn(x0.shape, generator=gen).to(accelerator.device, weight_dtype)
            s = sigmas.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            inputs = family.denoiser_inputs(inner, x_t, sigmas, text, config.guidance_scale)
            with torch.no_grad(), BlockFeatures(teacher, kept) as ft:
                v_t = family.denoiser_output(teacher(**inputs, return_dict=False)[0], x0)
            with accelerator.accumulate(student), accelerator.autocast(), BlockFeatures(inner, kept) as fs:
                v_s = family.denoiser_output(student(**inputs, return_dict=False)[0], x0)
                task = torch.nn.functional.mse_loss(v_s.float(), (noise - x0).float()) if config.lambda_task else None
                loss, parts = distillation_loss(v_s, v_t, fs.outputs, ft.outputs, config.lambda_feat, task,
                                                config.lambda_task)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in groups for p in g.params], config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        step += 1
        losses.append({"step": step, **parts})
        bar.update(1)
        bar.set_postfix(loss=f"{parts['total']:.4g}", kd=f"{parts['kd']:.3g}", feat=f"{parts['feat']:.3g}")
        accelerator.log(parts, step=step)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            _checkpoint(accelerator, output_dir, step, config.checkpoints_total_limit, identity)
        if config.validation_steps and step % config.validation_steps == 0 and accelerator.is_main_process:
            _validate(pipe, accelerator.unwrap_model(student), config, output_dir, step)
    bar.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    eval_end = held_out_loss()
    say(f"loss on a fixed batch (fixed noise and noise levels): {eval_start:.4g} -> {eval_end:.4g}")

    # Every rank must hold the same weights (DDP keeps them in step); check it, then save.
    inner = accelerator.unwrap_model(student)
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in inner.parameters())],
                            device=accelerator.device, dtype=torch.float64)
    checksums = [float(c) for c in accelerator.gather(checksum).cpu()]
    summary = {
        "teacher": teacher_name, "plan": plan.describe(), "ratio": round(ratio, 6), "pwp": config.pwp,
        "sgdistill": use_sg, "binary_freeze": config.binary_freeze, "lora_rank": config.lora_rank,
        "steps": step, "seconds": round(seconds, 2), "processes": accelerator.num_processes,
        "first_pruned_block": pwp.first_pruned, "frozen_params": pwp.frozen_params,
        "trainable_params": trainable, "param_groups": [{"name": g.name, "lr": g.lr} for g in groups],
        "rank_checksums": checksums, "ranks_identical": len(set(checksums)) == 1,
        "fixed_batch_loss": {"start": eval_start, "end": eval_end}, "losses": losses,
    }
    final = _final_student(accelerator, student, family, lora_config)
    if accelerator.is_main_process:
        student_pipe = with_pruned_transformer(pipe, final)
        student_pipe.to("cpu")
        _save_pipeline(student_pipe, output_dir)
        plan.save(output_dir / "plan.json")
        atomic_write_json(output_dir / "distill_summary.json", summary)
        say(f"distilled {step} steps in {seconds / 60:.1f} min; saved the pruned pipeline to {output_dir}")
    accelerator.wait_for_everyone()  # every rank reaches the teardown together, after the main one saved
    accelerator.end_training()  # trackers finished, process group destroyed once
    return summary


@torch.no_grad()
def _fixed_batch_loss(student, teacher, family, dataset, kept, device, dtype, config: DistillConfig) -> float:
    """The distillation loss on the first (up to) 8 samples at fixed noise levels and noise: comparable over time."""
    from .loss import BlockFeatures, distillation_loss

    n = min(8, len(dataset))
    batch = dataset[:n]
    x0 = batch["latents"].to(device, dtype)
    text = {k: batch[k].to(device, dtype) for k in ("prompt_embeds", "pooled_projections")}
    sigmas = torch.linspace(0.1, 0.9, n, device=device, dtype=dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234)).to(device, dtype)
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    inputs = family.denoiser_inputs(student, x_t, sigmas, text, config.guidance_scale)
    was_training = student.training
    student.eval()
    with BlockFeatures(teacher, kept) as ft, BlockFeatures(student, kept) as fs:
        v_t = family.denoiser_output(teacher(**inputs, return_dict=False)[0], x0)
        v_s = family.denoiser_output(student(**inputs, return_dict=False)[0], x0)
    student.train(was_training)
    return float(distillation_loss(v_s, v_t, fs.outputs, ft.outputs, config.lambda_feat)[0])


def _checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, identity: dict) -> None:
    target = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from ..fileio import atomic_write_json

        atomic_write_json(tmp / RUN_FILE, identity)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        if limit:
            found = sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*"))
            for _, old in found[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def _validate(pipe, student, config: DistillConfig, output_dir: Path, step: int) -> None:
    from .. import toy
    from ..analysis import generation_settings
    from ..pipelines import with_pruned_transformer

    prompts = config.validation_prompts or toy.prompts(split="heldout", n=8, seed=config.seed)
    was_training = student.training
    student.eval()
    student_pipe = with_pruned_transformer(pipe, student)
    kwargs = generation_settings(pipe, None, config.resolution, config.resolution, config.guidance_scale)
    gens = [torch.Generator(pipe._execution_device).manual_seed(config.seed + k) for k in range(len(prompts))]
    images = student_pipe(prompts, generator=gens, **kwargs).images
    toy.save_grid(images, output_dir / "validation" / f"step-{step}.png", columns=min(8, len(images)))
    student.train(was_training)


__all__ = ["DistillConfig", "DistillError", "distill"]
