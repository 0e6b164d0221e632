"""Distillation as users run it (issue 31): bf16 with validation, the launch config's precision, timesteps at full
precision, parameters no loss term reads, what multi-process and DeepSpeed launches need, the budget check's GPU.

The slow option matrix (tests/test_option_matrix.py) runs the combinations end to end; these are the quick checks of
each fix, each of which fails without it.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from diffusers_hprune import PrunePlan, toy
from diffusers_hprune.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("combinations")
    (folder / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=10, seed=2)) + "\n")
    # SD3 toy: a whole block and, in block 3, attn + ff_context (whose text modulation then has no reader)
    PrunePlan(family="sd3", num_blocks=12, removed_blocks=[10],
              removed_components={3: ["attn", "ff_context"]}).save(folder / "plan.json")
    PrunePlan(family="sd3", num_blocks=12, removed_blocks=[9, 11]).save(folder / "last.json")  # block 10 trains
    return folder


def _run(base, out, *extra, plan="plan.json"):
    args = ["distill", "--teacher", "sd3", "--plan", str(base / plan), "--prompts", str(base / "prompts.txt"),
            "--output_dir", str(out), "--max_samples", "4", "--train_batch_size", "2", "--max_train_steps", "1",
            "--no-sgdistill", "--no-progress", "--checkpointing_steps", "0", "--cache_dir", str(base / "cache"),
            *extra]
    assert main(args) == 0
    return json.loads((out / "distill_summary.json").read_text())


def test_bf16_with_validation_draws_and_records_the_precision_it_used(base, tmp_path):
    """The first reproduction of issue 31: a bf16 run that validates ended in a dtype error in the VAE."""
    summary = _run(base, tmp_path / "o", "--mixed_precision", "bf16", "--validation_steps", "1")
    assert (tmp_path / "o" / "validation" / "step-1.png").is_file()
    assert summary["mixed_precision"] == "bf16"
    assert summary["teacher_dtype"] == summary["frozen_dtype"] == "bfloat16"
    assert summary["trainable_dtype"] == "float32"
    assert "norm1_context" in summary["plan"]  # the modulation nobody reads went with its readers


@pytest.mark.parametrize("flag,launch,expected", [(None, "bf16", "bf16"), ("no", "bf16", "no"), (None, None, "no")])
def test_precision_is_the_flag_else_the_launch_config_else_fp32(base, tmp_path, monkeypatch, flag, launch, expected):
    """Accelerate's order: `accelerate launch` passes its config's mixed_precision as ACCELERATE_MIXED_PRECISION; an
    explicit flag wins; without either the run is fp32 (before, the flag's default "no" always won)."""
    if launch is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch)
    summary = _run(base, tmp_path / "o", *(["--mixed_precision", flag] if flag else []))
    assert summary["mixed_precision"] == expected
    assert summary["teacher_dtype"] == {"bf16": "bfloat16", "no": "float32"}[expected]


def test_training_timesteps_stay_float32(base, tmp_path, monkeypatch):
    """In bf16, SD3's timestep 750 became 752: the noise levels and the timesteps made of them are float32, so the
    teacher and the student see exactly the scheduler's timesteps (as the pipeline does at inference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_hprune.distillation import trainer

    seen = []
    load = trainer._teacher_and_student

    def spying(*args, **kwargs):
        models = load(*args, **kwargs)
        models.teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].detach().clone()),
                                                 with_kwargs=True)
        return models

    monkeypatch.setattr(trainer, "_teacher_and_student", spying)
    _run(base, tmp_path / "o", "--mixed_precision", "bf16", "--max_train_steps", "2")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(toy.load_pipeline("sd3").scheduler.config)
    table = {float(t) for t in scheduler.sigmas.float() * 1000.0}
    training = seen[1:-1]  # the first and last calls are the fixed batch's
    assert training and all(t.dtype == torch.float32 for t in training)
    assert all(float(v) in table for t in training for v in t)


def test_parameters_no_loss_term_reads_are_frozen_before_training(base, tmp_path):
    """With --lambda_feat 0 only the output counts: without SD3's last block, the new last block's text-stream output
    (ff_context, attn.to_add_out) is read by nothing; those parameters are frozen (and named), not left without a
    gradient (which stops a multi-process run)."""
    summary = _run(base, tmp_path / "o", "--lambda_feat", "0", plan="last.json")
    frozen = summary["frozen_off_the_loss"]
    assert frozen and all(name.startswith(("transformer_blocks.10.ff_context.", "transformer_blocks.10.attn.to_add_out."))
                          for name in frozen)
    assert summary["trainable_without_gradient"] == [0]
    with_feat = _run(base, tmp_path / "feat", plan="last.json")  # L_feat reads the text stream: all of it trains
    assert with_feat["frozen_off_the_loss"] == [] and with_feat["trainable_without_gradient"] == [0]


def test_the_gradient_norm_is_recorded_and_clipping_uses_the_prepared_model(base, tmp_path, monkeypatch):
    """Clipping is over the prepared model's own parameters (under FSDP2 the parameter objects from before `prepare`
    have no gradient: the norm was 0 and nothing was clipped); the norm before clipping is logged per step."""
    from diffusers_hprune.distillation import trainer

    clipped = []
    prepare = trainer._Run.prepare

    def spying(*args, **kwargs):
        run = prepare(*args, **kwargs)
        original = run.accelerator.clip_grad_norm_

        def clip(parameters, max_norm, *a, **k):
            parameters = list(parameters)
            clipped.append([id(p) for p in parameters] == [id(p) for p in run.student.parameters()])
            return original(parameters, max_norm, *a, **k)

        run.accelerator.clip_grad_norm_ = clip
        return run

    monkeypatch.setattr(trainer._Run, "prepare", staticmethod(spying))
    summary = _run(base, tmp_path / "o", "--max_train_steps", "2")
    assert clipped == [True, True]
    assert all(step["grad_norm"] > 0 for step in summary["losses"])


def test_prepare_keeps_no_reference_to_the_parameters_it_replaced():
    """FSDP2's `prepare` puts sharded parameters in place of the student's; the parameter groups must not keep the old
    (unsharded, float32) ones alive on every GPU."""
    import gc
    from types import SimpleNamespace

    from diffusers_hprune import prune_transformer
    from diffusers_hprune.distillation import trainer
    from diffusers_hprune.distillation.sgdistill import ParamGroup

    student = prune_transformer(toy.load_pipeline("sd3").transformer, PrunePlan(family="sd3", num_blocks=12,
                                                                                removed_blocks=[11]))
    old = [p for p in student.parameters()][:3]
    groups = [ParamGroup("all", 1.0, 1e-4, list(old))]
    refs = [weakref.ref(p) for p in old]

    def prepare(model, optimizer):  # as FSDP2 does: new parameter objects, the optimizer re-pointed at them
        for name, p in list(model.named_parameters()):
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(owner, name.rsplit(".", 1)[1], torch.nn.Parameter(p.detach().clone()))
        return model, optimizer

    accelerator = SimpleNamespace(prepare=prepare, unwrap_model=lambda m: m, num_processes=1,
                                  device=torch.device("cpu"))
    models = SimpleNamespace(student=student, teacher=student, pipe=toy.load_pipeline("sd3"), family=None)
    config = trainer.DistillConfig(teacher="sd3", plan="p", output_dir="o", mixed_precision="no")
    del old
    run = trainer._Run.prepare(config, accelerator, models, object(), groups, [0, 1], {}, None)
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert run.groups is groups and all(not g.params for g in groups)


def test_ddp_gradients_are_views_of_the_buckets_and_the_timeout_is_sized(base, tmp_path):
    """DDP's default copies every gradient into its buckets (twice the gradient memory); the process group's timeout
    outlasts what the main process does alone (PyTorch's NCCL default, 10 minutes, does not)."""
    from datetime import timedelta

    from diffusers_hprune.distillation import trainer
    from diffusers_hprune.distillation.data import DataSpec
    from diffusers_hprune.utils.distributed import DRAW_SECONDS_PER_STEP

    config = trainer.DistillConfig(teacher="sd3", plan=str(base / "plan.json"), output_dir=str(tmp_path),
                                   prompts=str(base / "prompts.txt"), mixed_precision="no")
    timeout = trainer._process_timeout(config, DataSpec(prompts=config.prompts), PrunePlan.load(base / "plan.json"))
    accelerator = trainer._accelerator(config, tmp_path, timeout)
    assert accelerator.ddp_handler.gradient_as_bucket_view
    assert accelerator.init_handler.timeout == timeout >= timedelta(minutes=30)
    # 600 FLUX.1-schnell prompts at 4 steps (15-20 minutes on one H100) plus saving 8 B parameters: hours, not minutes
    flux = trainer.DistillConfig(teacher="flux.1-schnell", plan="p", output_dir="o", prompts=str(tmp_path / "p.txt"))
    (tmp_path / "p.txt").write_text("a prompt\n" * 600)
    flux_plan = PrunePlan(family="flux", num_blocks=57, removed_blocks=list(range(40, 57)))
    sized = trainer._process_timeout(flux, DataSpec(prompts=flux.prompts), flux_plan)
    assert sized >= timedelta(seconds=2 * (600 * 4 * DRAW_SECONDS_PER_STEP))
    given = trainer.DistillConfig(teacher="sd3", plan="p", output_dir="o", prompts=flux.prompts,
                                  process_timeout_minutes=90)
    assert trainer._process_timeout(given, DataSpec(prompts=flux.prompts), flux_plan) == timedelta(minutes=90)


def test_a_deepspeed_launch_without_deepspeed_is_refused_before_loading(base, tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    args = ["distill", "--teacher", "sd3", "--plan", str(base / "plan.json"), "--prompts", str(base / "prompts.txt"),
            "--output_dir", str(tmp_path / "o"), "--no-sgdistill"]
    assert main(args) == 2
    assert "deepspeed package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_budget_check_reads_this_process_gpu(monkeypatch):
    """Under `accelerate launch` the check runs before the process has chosen its GPU: it must read LOCAL_RANK's device
    (and its free memory), not the current device (GPU 0 for every process)."""
    from diffusers_hprune.budget import fit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: {0: (10, 80), 1: (70, 80)}[index])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert fit.gpu_memory() == 70
    monkeypatch.delenv("LOCAL_RANK")
    assert fit.gpu_memory() == 10


def test_the_budget_suggests_bf16_first_and_follows_the_launch_precision(monkeypatch, base):
    """A run that does not fit in fp32 is told about --mixed_precision bf16 before any other flag, and the budget of
    a run launched with a bf16 config is the bf16 one."""
    from diffusers_hprune.budget.fit import REMEDIES, distill_options
    from diffusers_hprune.distillation.trainer import DistillConfig

    assert REMEDIES["distillation"][0] == ("--mixed_precision bf16", {"mixed_precision": "bf16"})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = DistillConfig(teacher="sd3", plan="p", output_dir="o", prompts=str(base / "prompts.txt"),
                           validation_steps=5)
    options = distill_options(config)
    assert options.mixed_precision == "bf16" and options.validation


def test_validation_draws_without_text_encoders_and_moves_only_the_vae(base, tmp_path):
    """The prompts come encoded (written once at the start), so no text encoder comes to the GPU mid-training, and a
    process that loaded none (every one but the main) can draw too."""
    from diffusers_hprune import get_family, prune_transformer
    from diffusers_hprune.distillation import validation

    pipe = toy.load_pipeline("sd3")
    settings = toy.generation_kwargs("sd3") | {"num_inference_steps": 2}
    prompts = ["a red circle", "two blue squares"]
    validation.encode_validation_prompts(pipe, get_family(pipe.transformer), prompts, settings, tmp_path)
    embeds = validation.load_validation_embeds(tmp_path, prompts)
    assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                           "negative_pooled_prompt_embeds"}  # SD3 guidance > 1 draws against the empty prompt
    student = prune_transformer(pipe.transformer, PrunePlan.load(base / "plan.json"))
    moved = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name)
        original = module.to
        module.to = lambda *a, _n=name, _o=original, **k: (moved.append(_n), _o(*a, **k))[1]
    drawing = validation.validation_pipeline(pipe, student)
    assert all(getattr(drawing, n) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    images = validation.draw_validation(pipe, student, embeds, settings, [0, 1], device=torch.device("cpu"),
                                        dtype=torch.float32, path=tmp_path / "grid.png")
    assert len(images) == 2 and (tmp_path / "grid.png").is_file()
    assert set(moved) == {"vae"}
    # Drawn from text by the pipeline with the student: the same images.
    import numpy as np

    from diffusers_hprune.pipelines import with_pruned_transformer

    expected = with_pruned_transformer(pipe, student)(
        prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **settings).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    with pytest.raises(Exception, match="other validation prompts"):
        validation.load_validation_embeds(tmp_path, ["another prompt"])
