"""The distillation run (`hprune distill`, `examples/distill.py`) on the toy SD3 and FLUX pipelines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import failure_output, free_port, imagefolder, run_process_group

from diffusers_hprune import toy
from diffusers_hprune.analysis import analyze
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.cli import main
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning import make_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per family: analysis, a 30 % plan and a prompt file (data-free distillation)."""
    base = tmp_path_factory.mktemp("distill")
    out = {}
    for family in ("sd3", "flux"):
        pipe = toy.load_pipeline(family)
        report = analyze(pipe, base / f"{family}-analysis.json", metric="velocity", n_prompts=2, eval_steps=2,
                         progress=False)
        outcome = make_plan(report.contributions(), inspect_transformer(pipe.transformer), ratio=0.3)
        outcome.plan.save(base / f"{family}-plan.json")
        out[family] = (base / f"{family}-analysis.json", base / f"{family}-plan.json", outcome.plan)
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=8, seed=1)) + "\n")
    return base, out


def _args(base, family, analysis, plan, out, *extra):
    return ["distill", "--teacher", family, "--plan", str(plan), "--analysis", str(analysis),
            "--prompts", str(base / "prompts.txt"), "--output-dir", str(out), "--train_batch_size", "4",
            "--cache-dir", str(base / "cache"), "--no-progress", *extra]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_distill_saves_a_loadable_pruned_pipeline(setup, family, capsys):
    from diffusers import DiffusionPipeline

    base, plans = setup
    analysis, plan_path, plan = plans[family]
    out = base / f"{family}-out"
    assert main(_args(base, family, analysis, plan_path, out, "--max_train_steps", "6", "--checkpointing_steps",
                      "3", "--learning-rate", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert "PWP: first pruned location is block" in printed and "parameter group" in printed
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["steps"] == 6 and summary["sgdistill"] and summary["ranks_identical"]
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    umask = os.umask(0)
    os.umask(umask)
    weights = [*out.glob("checkpoint-3/*.safetensors"), *out.glob("*/*.safetensors")]
    assert len(weights) >= 4 and {w.stat().st_mode & 0o777 for w in weights} == {0o666 & ~umask}  # not 0600
    pipe = DiffusionPipeline.from_pretrained(out)
    saved = sum(float(p.detach().double().sum()) for p in pipe.transformer.parameters())
    assert saved == pytest.approx(summary["rank_checksums"][0], rel=1e-12)  # the trained weights were saved
    assert type(pipe).__name__.startswith("HierarchicalPruned")
    assert pipe.transformer.prune_plan.removed_blocks == plan.removed_blocks
    # PWP: what runs before the first pruned location is bit-identical to the teacher; the rest trained.
    teacher = dict(toy.load_pipeline(family).transformer.named_parameters())
    first = summary["first_pruned_block"]
    from diffusers_hprune import get_family

    fam = get_family(pipe.transformer)
    frozen_paths = list(fam.input_modules) + [s.path for s in fam.block_specs(pipe.transformer.config)
                                               if s.index < first]
    changed = 0
    for name, p in pipe.transformer.named_parameters():
        if any(name.startswith(f + ".") for f in frozen_paths):
            assert torch.equal(p, teacher[name]), name
        elif name.startswith(("norm_out.", "proj_out.")):
            changed += not torch.equal(p, teacher[name])
    assert changed  # the output layers (m = 1) trained
    images = pipe(toy.prompts(n=2), **{**toy.generation_kwargs(family), "num_inference_steps": 2}).images
    assert len(images) == 2


def test_resume_continues_exactly_where_the_run_stopped(setup, capsys):
    """4 steps straight = 2 steps, stop, resume from `latest` to 4: same losses and weights."""
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]

    def args(out):
        return _args(base, "sd3", analysis, plan_path, out, "--checkpointing_steps", "2", "--learning_rate", "1e-3",
                     "--train_batch_size", "3")  # 3 does not divide 8 samples: batches wrap across epochs

    straight, stopped = base / "straight-out", base / "resume-out"
    assert main(args(straight) + ["--max_train_steps", "4"]) == 0
    assert main(args(stopped) + ["--max_train_steps", "2"]) == 0
    first = json.loads((stopped / "distill_summary.json").read_text())
    capsys.readouterr()
    assert main(args(stopped) + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    assert f"resumed from {stopped / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    second = json.loads((stopped / "distill_summary.json").read_text())
    whole = json.loads((straight / "distill_summary.json").read_text())
    assert [e["step"] for e in first["losses"]] == [1, 2]
    # The resumed run's summary covers the whole run, as the uninterrupted one's does.
    assert [e["step"] for e in second["losses"]] == [e["step"] for e in whole["losses"]] == [1, 2, 3, 4]
    assert second["losses"][:2] == first["losses"]
    for a, b in zip(second["losses"], whole["losses"]):
        assert a["total"] == pytest.approx(b["total"], abs=1e-6, rel=1e-6)
    assert second["fixed_batch_loss"]["start"] == pytest.approx(whole["fixed_batch_loss"]["start"], rel=1e-6)
    assert second["rank_checksums"][0] == pytest.approx(whole["rank_checksums"][0], rel=1e-9)


def test_resume_and_output_folder_mistakes_are_refused_before_training(setup, tmp_path, capsys):
    from diffusers_hprune import PrunePlan

    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    run = tmp_path / "run"
    assert main(_args(base, "sd3", analysis, plan_path, run, "--max_train_steps", "2", "--checkpointing_steps", "2",
                      "--no-sgdistill")) == 0
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    # The same folder again without --resume_from_checkpoint: refused, nothing touched.
    assert main(_args(base, "sd3", analysis, plan_path, run, "--max_train_steps", "2", "--no-sgdistill")) == 2
    assert "already holds a distillation run" in capsys.readouterr().err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # Resuming another run's checkpoint (other plan): refused before any step, the new folder stays empty.
    other = tmp_path / "other-plan.json"
    PrunePlan(removed_blocks=[10], family="sd3", num_blocks=12).save(other)
    new = tmp_path / "new"
    assert main(_args(base, "sd3", analysis, other, new, "--no-sgdistill", "--resume_from_checkpoint",
                      str(run / "checkpoint-2"))) == 2
    assert "checkpoint of another run (different plan" in capsys.readouterr().err
    assert not new.exists() or not any(new.iterdir())
    assert main(_args(base, "sd3", analysis, plan_path, new, "--resume_from_checkpoint", str(tmp_path))) == 2
    assert "not a checkpoint-<step> folder" in capsys.readouterr().err
    # --overwrite starts afresh and removes the old run's checkpoints.
    assert main(_args(base, "sd3", analysis, plan_path, run, "--max_train_steps", "1", "--no-sgdistill",
                      "--checkpointing_steps", "0", "--overwrite")) == 0
    assert not list(run.glob("checkpoint-*"))
    assert json.loads((run / "distill_summary.json").read_text())["steps"] == 1


def test_data_and_plan_mistakes_are_refused_before_training(setup, tmp_path, capsys):
    from diffusers_hprune import PrunePlan

    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    too_big = tmp_path / "plan-24.json"
    PrunePlan(removed_blocks=[20], family="sd3", num_blocks=24).save(too_big)
    out = tmp_path / "out"
    assert main(_args(base, "sd3", analysis, too_big, out, "--no-sgdistill")) == 2
    assert "with 24 blocks, but the model has 12 blocks" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = _args(base, "sd3", analysis, plan_path, out)
    args[args.index("--prompts") + 1] = str(empty)
    assert main(args) == 2
    assert "has no prompts" in capsys.readouterr().err
    folder = imagefolder(tmp_path / "images", n=2)
    (folder / "metadata.jsonl").unlink()  # images without captions
    args = _args(base, "sd3", analysis, plan_path, out)
    args[args.index("--prompts"):args.index("--prompts") + 2] = ["--train_data_dir", str(folder)]
    assert main(args) == 2
    assert "no column 'text'" in capsys.readouterr().err
    assert not (out / "model_index.json").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--train_data_dir", "somewhere"], "exactly one data source"),
        (["--lora_rank", "-1"], "lora_rank must be >= 0"),
        (["--report_to", "nonsense"], "not an Accelerate tracker"),
    ],
)
def test_bad_options(setup, extra, message, capsys):
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    assert main(_args(base, "sd3", analysis, plan_path, base / "bad", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (base / "bad" / "model_index.json").exists()


def test_analysis_of_another_model_is_refused(setup, capsys):
    base, plans = setup
    assert main(_args(base, "sd3", plans["flux"][0], plans["sd3"][1], base / "mismatch")) == 2
    assert "made for a flux model" in capsys.readouterr().err


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_two_processes_end_with_identical_weights(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) runs examples/distill.py."""
    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "examples" / "distill.py"), *_args(base, "sd3", analysis, plan_path, out)[1:],
           "--max_train_steps", "12", "--learning_rate", "1e-3", "--no-sgdistill", "--checkpointing_steps", "0"]
    result = run_process_group(cmd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, failure_output(result.stderr)
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["processes"] == 2
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_identical"]
    from diffusers import DiffusionPipeline

    saved = DiffusionPipeline.from_pretrained(out).transformer  # gathered with accelerator.get_state_dict
    assert sum(float(p.double().sum()) for p in saved.parameters()) == pytest.approx(summary["rank_checksums"][0],
                                                                                    rel=1e-12)
    assert summary["fixed_batch_loss"]["end"] < summary["fixed_batch_loss"]["start"]


def test_lora_with_gradient_checkpointing_is_merged_into_the_saved_model(setup):
    """Only the adapters train; the saved (merged) model computes what the adapted model computed."""
    import copy

    from diffusers import DiffusionPipeline
    from helpers import transformer_inputs
    from safetensors.torch import load_file

    from diffusers_hprune import prune_transformer
    from diffusers_hprune.distillation import apply_pwp
    from diffusers_hprune.distillation.models import _lora_config

    base, plans = setup
    analysis, plan_path, plan = plans["sd3"]
    out = base / "lora-out"
    assert main(_args(base, "sd3", analysis, plan_path, out, "--max_train_steps", "4", "--lora_rank", "4",
                      "--gradient_checkpointing", "--no-sgdistill", "--learning_rate", "1e-2",
                      "--checkpointing_steps", "4")) == 0
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["lora_rank"] == 4
    saved = DiffusionPipeline.from_pretrained(out).transformer  # strict loading: no adapter keys left
    assert not [n for n, _ in saved.named_parameters() if "lora" in n]

    # The adapted model as training left it (checkpoint-4), rebuilt from the teacher.
    teacher = toy.load_pipeline("sd3").transformer
    adapted = prune_transformer(copy.deepcopy(teacher), plan)
    adapted.add_adapter(_lora_config(adapted, apply_pwp(adapted).trainable_modules, 4, None))
    trained = load_file(out / "checkpoint-4" / "model.safetensors")
    reference = prune_transformer(copy.deepcopy(teacher), plan).state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" not in key:  # every base weight is the teacher's, untouched
            assert torch.equal(value, reference[key.replace(".base_layer", "")]), key
    adapted.load_state_dict(trained, strict=True)
    inputs = transformer_inputs(adapted, batch=2, seed=1)
    with torch.no_grad():
        expected = adapted(**inputs, return_dict=False)[0]
        got = saved(**inputs, return_dict=False)[0]
        untrained = prune_transformer(copy.deepcopy(teacher), plan)(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - untrained).abs().max() > 1e-3  # the adapters did change the model


def test_image_caption_data_is_encoded_once(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusers_hprune.distillation.data import DataError, DataSpec, build_training_cache

    folder = imagefolder(tmp_path / "images")
    rows = (folder / "metadata.jsonl").read_text().splitlines()
    pipe = toy.load_pipeline("sd3")
    spec = DataSpec(train_data_dir=str(folder), batch_size=4)
    ds, path = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert len(ds) == 6 and tuple(ds[0]["latents"].shape) == (4, 16, 16)
    assert ds["prompt"] == [json.loads(r)["text"] for r in rows]
    # The latents are the VAE's (scaled) encoding of the image; the cache is reused on the next call.
    vae = pipe.vae
    image = Image.open(folder / "0.png")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        z = (vae.encode(x).latent_dist.mean - (vae.config.shift_factor or 0)) * vae.config.scaling_factor
    torch.testing.assert_close(ds[0]["latents"], z[0], rtol=1e-4, atol=1e-4)
    again, path2 = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert path2 == path and len(list((tmp_path / "cache").iterdir())) == 1
    # Issue 32: the cache is the text encoders' and the VAE's output too; another text encoder is another cache.
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).mul_(1.5)
    _, path3 = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert path3 != path and len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(DataError, match="no column 'caption'"):
        build_training_cache(pipe, DataSpec(train_data_dir=str(folder), caption_column="caption"), tmp_path / "c2")


def test_parquet_and_webdataset_shards_give_the_imagefolder_samples(tmp_path):
    """--dataset_name parquet / webdataset with --data_files: same latents and captions as the imagefolder."""
    import io
    import tarfile

    import datasets

    from diffusers_hprune.distillation.data import DataSpec, build_training_cache

    folder = imagefolder(tmp_path / "images")
    rows = [json.loads(r) for r in (folder / "metadata.jsonl").read_text().splitlines()]
    pipe = toy.load_pipeline("sd3")
    reference, _ = build_training_cache(pipe, DataSpec(train_data_dir=str(folder)), tmp_path / "cache", progress=False)

    parquet = tmp_path / "train.parquet"
    table = datasets.Dataset.from_dict(
        {"picture": [str(folder / r["file_name"]) for r in rows], "caption": [r["text"] for r in rows]},
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}),
    )
    table.to_parquet(str(parquet))
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, part in enumerate((rows[:3], rows[3:])):  # two shards, as webdataset data comes
        with tarfile.open(shards / f"train-{shard:05d}.tar", "w") as tar:
            for r in part:
                key = Path(r["file_name"]).stem
                for name, payload in ((f"{key}.png", (folder / r["file_name"]).read_bytes()),
                                      (f"{key}.txt", r["text"].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    specs = {
        "parquet": DataSpec(dataset_name="parquet", data_files=str(parquet), image_column="picture",
                            caption_column="caption"),
        "webdataset": DataSpec(dataset_name="webdataset", data_files=str(shards / "train-*.tar"), image_column="png",
                               caption_column="txt"),
    }
    for name, spec in specs.items():
        ds, _ = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
        order = [ds["prompt"].index(p) for p in reference["prompt"]]  # shards may list samples in another order
        assert sorted(ds["prompt"]) == sorted(reference["prompt"]), name
        for k, j in enumerate(order):
            torch.testing.assert_close(ds[j]["latents"], reference[k]["latents"], msg=name)
            torch.testing.assert_close(ds[j]["prompt_embeds"], reference[k]["prompt_embeds"], msg=name)


def test_8bit_adam_and_tensorboard_logging(setup):
    """--use_8bit_adam keeps 8-bit optimizer state (bitsandbytes runs it on CPU); --report_to tensorboard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    out = base / "adam8-out"
    assert main(_args(base, "sd3", analysis, plan_path, out, "--max_train_steps", "3", "--use_8bit_adam",
                      "--report_to", "tensorboard", "--checkpointing_steps", "3", "--learning_rate", "1e-3")) == 0
    state = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)["state"]  # as Accelerate reads it
    # bitsandbytes keeps the moments beside "step" or (newer releases) under "__bnb_optimizer_quant_state__"
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    dtypes = {v.dtype for s in moments for k, v in s.items() if k in ("state1", "state2")}
    assert torch.uint8 in dtypes  # the large matrices' moments are stored in 8 bits
    events = [p for p in (out / "logs").rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    summary = json.loads((out / "distill_summary.json").read_text())
    logged = [e.value for e in acc.Scalars("total")]
    assert logged == pytest.approx([s["total"] for s in summary["losses"]], rel=1e-5)


def test_validation_prompts_are_given_or_held_out_of_training(setup, tmp_path, capsys):
    from diffusers_hprune.distillation.arguments import add_distill_arguments, config_from_args
    from diffusers_hprune.distillation.data import DataSpec, build_training_cache
    from diffusers_hprune.distillation.launch import _held_out_for_validation
    from diffusers_hprune.distillation.trainer import DistillConfig, DistillError

    base, plans = setup
    lines = (base / "prompts.txt").read_text().splitlines()  # 8 distinct prompts
    args = add_distill_arguments(argparse.ArgumentParser()).parse_args(
        ["--teacher", "sd3", "--plan", "p", "--output_dir", "o", "--validation_prompt", "a red circle",
         "--validation_prompt", "a blue square"])
    assert config_from_args(args).validation_prompts == ["a red circle", "a blue square"]
    common = dict(teacher="sd3", plan="p", output_dir="o", prompts=str(base / "prompts.txt"))
    assert _held_out_for_validation(DistillConfig(**common)) == ()  # no validation: nothing held out
    assert _held_out_for_validation(DistillConfig(**common, validation_steps=2, validation_prompts=["x"])) == ()
    assert _held_out_for_validation(DistillConfig(**common, validation_steps=2)) == (lines[-1],)  # a fifth, >= 1
    with pytest.raises(DistillError, match="needs the prompts to draw: pass --validation_prompt"):
        _held_out_for_validation(DistillConfig(teacher="sd3", plan="p", output_dir="o", train_data_dir="d",
                                               validation_steps=2))
    # The held-out prompt is not in the training data; the cache of the full file is another one.
    pipe = toy.load_pipeline("sd3")
    spec = DataSpec(prompts=str(base / "prompts.txt"), teacher_steps=2, held_out=(lines[-1],))
    ds, path = build_training_cache(pipe, spec, tmp_path / "cache", progress=False)
    assert ds["prompt"] == lines[:-1]
    full, full_path = build_training_cache(pipe, DataSpec(prompts=str(base / "prompts.txt"), teacher_steps=2),
                                           tmp_path / "cache", progress=False)
    assert full["prompt"] == lines and full_path != path
    # A distillation with validation on draws the held-out prompt.
    analysis, plan_path, _ = plans["sd3"]
    out = tmp_path / "validated"
    assert main(_args(base, "sd3", analysis, plan_path, out, "--max_train_steps", "2", "--validation_steps", "2",
                      "--cache-dir", str(tmp_path / "cache2"))) == 0
    assert (out / "validation" / "step-2.png").is_file()
    # The teacher's other components are its files, copied, not re-saved from memory.
    for name in ("text_encoder", "text_encoder_3", "vae", "tokenizer"):
        for path in (toy.model_path("sd3") / name).rglob("*"):
            if path.is_file():
                assert (out / name / path.relative_to(toy.model_path("sd3") / name)).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("precision,dtype,lora", [("no", torch.float32, 0), ("bf16", torch.bfloat16, 0),
                                                  ("bf16", torch.bfloat16, 2)])
def test_distillation_holds_one_teacher_and_copies_only_what_trains(setup, precision, dtype, lora):
    """The teacher is loaded in the weight dtype; the student shares its frozen weights; only trainables are copied."""
    from diffusers_hprune import PrunePlan
    from diffusers_hprune.distillation import apply_pwp
    from diffusers_hprune.distillation.trainer import (
        DistillConfig,
        _own_trainable_copies,
        _teacher_and_student,
        _trainable_groups,
    )

    base, plans = setup
    analysis, plan_path, _ = plans["sd3"]
    config = DistillConfig(teacher="sd3", plan=str(plan_path), output_dir=str(base / "unused"), analysis=str(analysis),
                           prompts=str(base / "prompts.txt"), mixed_precision=precision, lora_rank=lora)
    models = _teacher_and_student(config, PrunePlan.load(plan_path), torch.device("cpu"))
    assert {p.dtype for p in models.teacher.parameters()} == {dtype}
    pwp = apply_pwp(models.student, enabled=True)
    _, _, groups, _ = _trainable_groups(config, models, pwp, lambda *a: None)
    copied = _own_trainable_copies(models.student)

    def storage(p):
        return p.untyped_storage().data_ptr()

    teacher = {storage(p): p.untyped_storage().nbytes() for p in models.teacher.parameters()}
    trainable = [p for p in models.student.parameters() if p.requires_grad]
    frozen = [p for n, p in models.student.named_parameters() if not p.requires_grad and "lora_" not in n]
    # Adapters of the components SGDistill's floor freezes (m = 0) are the adapters' own small tensors.
    idle = [p for n, p in models.student.named_parameters() if not p.requires_grad and "lora_" in n]
    assert bool(idle) == bool(lora and config.sensitivity_floor > 0)
    assert trainable and frozen and {p.dtype for p in trainable} == {torch.float32}
    assert all(storage(p) in teacher for p in frozen)  # shared with the teacher, not copied
    assert not any(storage(p) in teacher for p in trainable + idle)
    held = {storage(p): p.untyped_storage().nbytes() for p in [*models.teacher.parameters(), *trainable]}
    held.update({storage(p): p.untyped_storage().nbytes() for p in frozen + idle})
    # the teacher + the trainable copy (+ the idle adapters), nothing else
    assert sum(held.values()) == sum(teacher.values()) + copied + sum(p.untyped_storage().nbytes() for p in idle)
    assert copied == 4 * sum(p.numel() for p in trainable)
    assert {id(p) for g in groups for p in g.params} == {id(p) for p in trainable}  # the optimizer trains the copies
    if not lora:  # the copies start from the teacher's weights
        named = dict(models.teacher.named_parameters())
        for name, p in models.student.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.to(dtype), named[name]), name


def test_text_encoders_and_vae_are_on_the_device_only_within_encoders_on():
    from diffusers_hprune.loading import components_on as encoders_on

    moves = []

    class Module(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def to(self, device):
            moves.append((self.name, str(device)))
            return self

    class Pipe:
        text_encoder, text_encoder_2, vae, transformer = Module("t1"), Module("t2"), Module("vae"), Module("dit")

    with pytest.raises(RuntimeError):
        with encoders_on(Pipe(), "cuda:0"):
            assert moves == [("t1", "cuda:0"), ("t2", "cuda:0"), ("vae", "cuda:0")]
            raise RuntimeError("a failed drawing")
    assert moves[3:] == [("t1", "cpu"), ("t2", "cpu"), ("vae", "cpu")]  # back on the CPU, whatever happened


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_teacher_4bit_is_quantised_as_it_loads_and_the_student_read_from_the_files(setup, family, monkeypatch, tmp_path):
    """--teacher_4bit on a CPU (the project's CPU NF4 path): the teacher is quantised while it loads, with
    `hprune quantize`'s settings (NF4, double quantisation, the family's 16-bit modules), no 16-bit teacher is
    loaded, and the student is read from the checkpoint's kept tensors, sliced where the plan slices (a FLUX single
    block without attn or mlp) -- exactly the weights prune_transformer gives."""
    import bitsandbytes as bnb
    import diffusers

    from diffusers_hprune import PrunePlan, get_family, prune_transformer
    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.distillation import trainer
    from diffusers_hprune.utils.nf4_settings import nf4_config

    base, plans = setup
    config = load_transformer_config(toy.model_path(family))
    fam = get_family(config)
    if family == "flux":  # single blocks without attn and without mlp: proj_out is sliced both ways
        first_single = int(config["num_layers"])
        plan = PrunePlan(family="flux", num_blocks=fam.num_blocks(config), removed_blocks=[1],
                         removed_components={first_single: ["attn"], first_single + 1: ["mlp"]})
    else:
        plan = plans["sd3"][2]
    plan.save(tmp_path / "plan.json")
    reference = prune_transformer(diffusers.DiffusionPipeline.from_pretrained(toy.model_path(family)).transformer,
                                  plan).state_dict()
    base_class = fam.base_class
    original = base_class.from_pretrained.__func__

    def only_quantised(cls, *args, **kwargs):
        assert kwargs.get("quantization_config") is not None, "a 16-bit teacher transformer was loaded"
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(base_class, "from_pretrained", classmethod(only_quantised))
    config_ = trainer.DistillConfig(teacher=family, plan=str(tmp_path / "plan.json"), output_dir=str(tmp_path / "o"),
                                    prompts=str(base / "prompts.txt"), teacher_4bit=True, mixed_precision="bf16",
                                    sgdistill=False)
    models = trainer._teacher_and_student(config_, plan, torch.device("cpu"))
    teacher = models.teacher
    assert models.pipe.transformer is teacher
    expected = nf4_config(fam.default_nf4_skip_modules, torch.bfloat16).to_dict()
    recorded = teacher.config.quantization_config.to_dict()
    for key in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "llm_int8_skip_modules", "load_in_4bit"):
        assert recorded[key] == expected[key], key
    layers = [m for m in teacher.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.nested for m in layers)  # double quantisation
    for name in fam.default_nf4_skip_modules:  # the family's 16-bit modules stay 16-bit
        module = teacher.get_submodule(name)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()), name
    # The student: the checkpoint's kept weights, cut like prune_transformer cuts them, in the weight dtype.
    student = models.student.state_dict()
    assert sorted(student) == sorted(reference)
    for name, value in student.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, reference[name].to(torch.bfloat16)), name


def test_only_the_main_process_loads_the_text_encoders(setup):
    """Under several processes the others read the cache: they never hold T5 and the CLIPs in host memory."""
    from diffusers_hprune import PrunePlan
    from diffusers_hprune.distillation.trainer import DistillConfig, _teacher_and_student

    base, plans = setup
    _, plan_path, _ = plans["sd3"]
    config = DistillConfig(teacher="sd3", plan=str(plan_path), output_dir=str(base / "unused"),
                           prompts=str(base / "prompts.txt"), sgdistill=False)
    main = _teacher_and_student(config, PrunePlan.load(plan_path), torch.device("cpu"), main=True)
    other = _teacher_and_student(config, PrunePlan.load(plan_path), torch.device("cpu"), main=False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert isinstance(getattr(main.pipe, name), torch.nn.Module)
        assert getattr(other.pipe, name) is None
    assert other.pipe.vae is not None and other.pipe.vae_scale_factor == main.pipe.vae_scale_factor


def test_sgdistill_switches_on_the_target_ratio(setup, tmp_path, capsys):
    """The trainer's decision, end to end: plans whose achieved ratio and target lie on either side of r_thres."""
    base, plans = setup
    analysis = plans["sd3"][0]
    inventory = inspect_transformer(toy.load_pipeline("sd3").transformer)
    flat = {(b.spec.index, c): 0.01 for b in inventory.blocks for c in ("block", *b.spec.components)}
    for target, r_thres, expected in ((0.25, 0.25, True), (0.28, 0.29, False)):
        outcome = make_plan(flat, inventory, ratio=target, r_thres=r_thres)
        assert (outcome.ratio >= r_thres) != expected  # the achieved ratio would decide the other way
        plan_path = tmp_path / f"plan-{target}.json"
        outcome.plan.save(plan_path)
        out = tmp_path / f"out-{target}"
        assert main(_args(base, "sd3", analysis, plan_path, out, "--max_train_steps", "1", "--checkpointing_steps",
                          "0", "--r_thres", str(r_thres))) == 0
        assert json.loads((out / "distill_summary.json").read_text())["sgdistill"] is expected
        printed = capsys.readouterr().out
        assert ("plain distillation" in printed) is (not expected)
        if not expected:
            assert f"plan target ratio {target:.1%} < r_thres {r_thres:.0%}" in printed


def test_the_trainer_warns_before_training_when_pwp_leaves_almost_nothing(setup, tmp_path, capsys):
    base, plans = setup
    plan_path = tmp_path / "last.json"
    PrunePlan(family="sd3", num_blocks=12, removed_blocks=[9, 10, 11]).save(plan_path)
    out = tmp_path / "out"
    assert main(_args(base, "sd3", plans["sd3"][0], plan_path, out, "--max_train_steps", "1",
                      "--checkpointing_steps", "0")) == 0
    printed = capsys.readouterr().out
    assert "warning: PWP leaves 0.6% of the student trainable" in printed and "--no-pwp" in printed
    assert printed.index("warning: PWP leaves") < printed.index("optimizer:")  # said before the optimizer is built
    assert main(_args(base, "sd3", plans["sd3"][0], plan_path, tmp_path / "free", "--max_train_steps", "1",
                      "--checkpointing_steps", "0", "--no-pwp")) == 0
    assert "warning: PWP" not in capsys.readouterr().out


def test_the_data_spec_takes_every_data_option_of_the_config(tmp_path):
    """The training data is described by the config's own options, by name (not retyped): each one set differently
    from its default arrives in the DataSpec."""
    from dataclasses import fields

    from diffusers_hprune.distillation.data import DataSpec
    from diffusers_hprune.distillation.launch import _checked_data_spec
    from diffusers_hprune.distillation.settings import DistillConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n", encoding="utf-8")
    config = DistillConfig(teacher="sd3", plan="p.json", output_dir=str(tmp_path / "out"), prompts=str(prompts),
                           image_column="img", caption_column="cap", resolution=64, teacher_steps=3,
                           guidance_scale=1.5, max_samples=7, seed=9)
    spec = _checked_data_spec(config)
    shared = {f.name for f in fields(DataSpec)} & {f.name for f in fields(DistillConfig)}
    assert {"prompts", "image_column", "caption_column", "resolution", "teacher_steps", "guidance_scale",
            "max_samples", "seed"} <= shared
    for name in shared:
        assert getattr(spec, name) == getattr(config, name), name
