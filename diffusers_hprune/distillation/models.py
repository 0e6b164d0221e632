"""Teacher and student of a distillation: loading them (16-bit or NF4 teacher, the QLoRA student, LoRA adapters) and
the trainable parameter groups (PWP, SGDistill). The trained student as it is saved: :mod:`.saving`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.contributions import ContributionReport
from diffusers_hprune.distillation.qlora import shared_nf4_student
from diffusers_hprune.distillation.reach import parameters_off_the_loss
from diffusers_hprune.distillation.settings import DistillConfig, DistillError, weight_dtype
from diffusers_hprune.distillation.sgdistill import sgdistill_param_groups
from diffusers_hprune.loading import TEXT_ENCODERS, load_pipeline, pipeline_folder, pixel_multiple
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.distributed import full_tensor
from diffusers_hprune.utils.float64 import float64
from diffusers_hprune.utils.nf4_cpu import (
    accelerator_available,
    compute_in_fp32_on_cpu,
    cpu_nf4_loading,
    import_bitsandbytes,
    keep_cpu_layout,
)
from diffusers_hprune.utils.nf4_settings import default_compute_dtype, nf4_config


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
    """``--teacher_4bit``: the NF4 teacher loaded directly. With ``--lora_rank`` the student is the QLoRA student over
    the teacher's own 4-bit layers (:func:`~.qlora.shared_nf4_student`); with full weights it is read, in the weight
    dtype, from the kept tensors of the files."""
    folder = pipeline_folder(config.teacher)
    if folder is None:
        raise DistillError(f"--teacher_4bit reads the teacher's files; {config.teacher!r} is no pipeline folder, toy "
                           "or Hub id in the local cache. Download it first (huggingface-cli download ...).")
    dtype = weight_dtype(config)
    teacher = _load_nf4_transformer(folder, dtype)
    pipe, _ = load_pipeline(folder, None, dtype, transformer=teacher,  # the text encoders stay on the CPU
                            **_without_text_encoders(main))
    if config.lora_rank:
        student = shared_nf4_student(teacher, plan, dtype)
    else:
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


def _gradient_record(run) -> dict:
    """How many trainable parameters had no gradient at the first step, per process (all 0 in a correct run)."""
    missing = run.without_gradient or []
    if missing:
        run.accelerator.print(f"warning: {len(missing)} trainable parameter(s) got no gradient and did not train: "
                              f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    counts = run.accelerator.gather(torch.tensor([len(missing)], device=run.accelerator.device))
    return {"trainable_without_gradient": [int(c) for c in counts.cpu()]}


def _precision_record(run, models: _Models) -> dict:
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


def _rank_checksums(run) -> dict:
    """Every rank must hold the same weights (DDP keeps them in step): each rank's weight sum, gathered.

    A parameter sharded by FSDP2 is gathered whole first, one at a time, so every rank sums the whole model.
    """
    checksum = torch.tensor([sum(float(float64(full_tensor(p.detach())).sum()) for p in run.inner.parameters())],
                            device=run.accelerator.device, dtype=torch.float64)
    checksums = [float(c) for c in run.accelerator.gather(checksum).cpu()]
    return {"rank_checksums": checksums, "ranks_identical": len(set(checksums)) == 1}
