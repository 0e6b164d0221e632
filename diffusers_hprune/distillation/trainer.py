"""The distillation run (Algorithm 1, stage 2) with Accelerate: ``hprune distill`` and ``examples/distill.py``.

teacher pipeline + plan (+ analysis) -> student = prune_transformer(copy of the teacher's
transformer, plan) -> PWP freezing -> SGDistill parameter groups (ratio >= r_thres) ->
cached training data -> steps of ``L_KD + lambda_feat L_feat (+ lambda_task L_task)`` at
logit-normal noise levels -> a pruned pipeline in ``output_dir`` that loads with
``DiffusionPipeline.from_pretrained`` after ``import diffusers_hprune``.

Runs on one process or under ``accelerate launch`` (DDP; FSDP / DeepSpeed through Accelerate
configs). Checkpoints (``accelerator.save_state``) go to ``output_dir/checkpoint-<step>``;
``resume_from_checkpoint="latest"`` continues from the newest, refused when the checkpoint was
made with settings that change the result (``run_folder._run_identity``, also in
``output_dir/hprune_run.json``, the marker of a run folder).

This module is the run and its loop; the rest is split along its seams: :mod:`.settings` (``DistillConfig``, which
options change the result), :mod:`.run_folder` (resume, checkpoints, progress, leftovers), :mod:`.models` (teacher
and student, their parameter groups, the saved student) and :mod:`.launch` (Accelerate, process timeouts, data).
"""

from __future__ import annotations

import pickle
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffusers_hprune.contributions import components_fingerprint
from diffusers_hprune.distillation import validation
from diffusers_hprune.distillation.data import data_identity
from diffusers_hprune.distillation.launch import (
    _accelerator,
    _checked_data_spec,
    _process_timeout,
    _training_data,
    _validation_settings,
)
from diffusers_hprune.distillation.loss import BlockFeatures, distillation_loss, kept_blocks
from diffusers_hprune.distillation.models import (
    _check_resolution,
    _gradient_record,
    _Models,
    _optimizer,
    _own_trainable_copies,
    _precision_record,
    _rank_checksums,
    _resharded,
    _teacher_and_student,
    _trainable_groups,
)
from diffusers_hprune.distillation.pwp import apply_pwp
from diffusers_hprune.distillation.run_folder import (
    SUMMARY_FILE,
    _checked_output_dir,
    _checkpoint,
    _checkpoint_step,
    _damaged,
    _latest_checkpoint,
    _prepare_output_dir,
    _Progress,
    _remove_unfinished,
    _resume_point,
    _run_identity,
)
from diffusers_hprune.distillation.saving import (
    empty_twin,
    final_student,
    saved_tensors,
    staging_folder,
    write_transformer,
)
from diffusers_hprune.distillation.saving import save_pipeline as _save_pipeline
from diffusers_hprune.distillation.settings import DistillConfig, DistillError, _checked_precision, weight_dtype
from diffusers_hprune.loading import pipeline_folder
from diffusers_hprune.pipelines.pruned import with_pruned_transformer
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.distributed import from_main_process, full_tensor
from diffusers_hprune.utils.fileio import atomic_write_json


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
    if warning := pwp.warning():
        say(warning)
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
                parts["grad_norm"] = float(full_tensor(torch.as_tensor(norm)))
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


def _save_student(run: _Run, models: _Models, lora_config, summary: dict, say) -> None:
    """The trained student (LoRA merged) as a pruned pipeline in output_dir, with plan.json and the summary.

    Written in the weight dtype, one shard at a time (:mod:`.saving`): every process walks the student (gathers
    are collective), the main one writes.
    """
    from accelerate.utils import DistributedType

    finite = torch.tensor(all(bool(torch.isfinite(p.detach()).all()) for p in run.inner.parameters()
                              if p.is_floating_point()))
    if not _all_finite(run.accelerator, torch.where(finite, 0.0, torch.nan)):  # every process refuses, together
        raise DistillError("The trained weights hold values that are not finite: nothing was saved (the checkpoints "
                           "stay). Lower --learning_rate or --max_grad_norm and start a new run (--overwrite, or "
                           "another --output_dir).")
    main = run.accelerator.is_main_process
    deepspeed = run.accelerator.distributed_type == DistributedType.DEEPSPEED
    # ZeRO partitions every weight: Accelerate gathers the student whole (collective), then the main process walks it
    final = final_student(run.accelerator, run.student, run.family, lora_config) if deepspeed else run.inner
    twin = empty_twin(run.inner, run.family)
    staging = staging_folder(run.output_dir) if main else None
    try:
        if main or not deepspeed:  # the others walk the student only to join its gathers (FSDP2)
            write_transformer(staging / "transformer" if main else None, twin,
                              saved_tensors(final, run.weight_dtype), run.weight_dtype)
        if main:
            _save_pipeline(with_pruned_transformer(run.pipe, twin), staging, run.output_dir,
                           pipeline_folder(models.teacher_name))
            models.plan.save(run.output_dir / "plan.json")
            atomic_write_json(run.output_dir / SUMMARY_FILE, summary)
            say(f"distilled {summary['steps']} steps in {summary['seconds'] / 60:.1f} min; saved the pruned pipeline "
                f"({str(run.weight_dtype).removeprefix('torch.')}) to {run.output_dir}")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


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


def _validate(run: _Run, step: int) -> None:
    """Draw the validation prompts (given, or held out of --prompts) with the student; the main process writes them."""
    config, accelerator = run.config, run.accelerator
    path = run.output_dir / validation.FOLDER / f"step-{step}.png" if accelerator.is_main_process else None
    validation.draw_validation(
        run.pipe, run.inner, run.validation_embeds, _validation_settings(run.pipe, config),
        [config.seed + k for k in range(len(config.validation_prompts))], device=accelerator.device,
        dtype=run.weight_dtype, autocast=accelerator.autocast(), path=path)


__all__ = ["DistillConfig", "DistillError", "distill"]
