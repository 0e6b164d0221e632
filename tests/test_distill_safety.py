"""`hprune distill`: nothing lost, nothing silently wrong (issue 18).

A resumed run is the same run or refused; the summary covers every segment; bad values,
non-finite losses, foreign output folders and damaged files are one clear error (exit 2),
with every file that existed before left byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import folder_state

from diffusers_hprune import toy
from diffusers_hprune.analysis import analyze
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.cli import main
from diffusers_hprune.planning import make_plan


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Analysis, a 30 % plan, 4 prompts, and one finished 4-step run (checkpoints at steps 2 and 4) to copy."""
    base = tmp_path_factory.mktemp("distill-safety")
    pipe = toy.load_pipeline("sd3")
    report = analyze(pipe, base / "analysis.json", metric="velocity", n_prompts=2, eval_steps=2, progress=False)
    make_plan(report.contributions(), inspect_transformer(pipe.transformer), ratio=0.3).plan.save(base / "plan.json")
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=4, seed=1)) + "\n")
    assert main(_args(base, base / "done")) == 0
    return base


def _args(base: Path, out: Path, *extra: str) -> list[str]:
    """The reproduction's command (4 steps, batch 2, checkpoints every 2); later flags override earlier ones."""
    return ["distill", "--teacher", "sd3", "--plan", str(base / "plan.json"), "--analysis", str(base / "analysis.json"),
            "--prompts", str(base / "prompts.txt"), "--output_dir", str(out), "--train_batch_size", "2",
            "--teacher_steps", "2", "--cache_dir", str(base / "cache"), "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--no-progress", *extra]


def _copy_of_done(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base / "done", run)
    return run


def _snapshot(*folders: Path) -> dict:
    """Every entry under the folders: size and modification time (``folder_state``) and the bytes' digest."""
    out = {}
    for folder in folders:
        out.update(folder_state(folder))
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                out[f"{path}#sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _refused(args: list[str], capsys) -> str:
    """Run the command; it must exit 2 with one error line (no traceback). Returns stderr."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hprune distill: error: " in err and "Traceback" not in err
    return err


def _refused_by_argparse(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


# -- 1. run identity --------------------------------------------------------------------------------
def test_the_run_identity_is_written_at_the_start_and_with_every_checkpoint(setup):
    done = setup / "done"
    identity = json.loads((done / "hprune_run.json").read_text())
    assert identity == json.loads((done / "checkpoint-4" / "hprune_run.json").read_text())
    for name in ("teacher", "plan", "analysis", "data", "learning_rate", "max_grad_norm", "adam_weight_decay",
                 "use_8bit_adam", "logit_mean", "logit_std", "seed", "train_batch_size", "gradient_accumulation_steps",
                 "processes", "lambda_feat", "lambda_task", "pwp", "sgdistill", "sgdistill_in_use",
                 "sensitivity_floor", "sensitivity_eps", "binary_freeze", "r_thres", "lora_rank", "lora_alpha",
                 "mixed_precision", "teacher_4bit"):
        assert name in identity, name
    assert identity["analysis"] == hashlib.sha256((setup / "analysis.json").read_bytes()).hexdigest()
    assert identity["data"]["prompt_lines"] and identity["data"]["teacher_steps"] == 2
    assert "max_train_steps" not in identity and "checkpointing_steps" not in identity  # extending a run is fine


@pytest.mark.parametrize("extra,message", [
    (["--learning_rate", "1e-2"], "learning_rate: checkpoint 0.0001, now 0.01"),
    (["--seed", "7"], "seed: checkpoint 0, now 7"),
    (["--train_batch_size", "4"], "train_batch_size: checkpoint 2, now 4"),
    (["--lambda_feat", "0.5", "--teacher_steps", "3"], "lambda_feat: checkpoint 1.0, now 0.5"),
    (["--prompts", "OTHER"], "data.prompt_lines: checkpoint"),
    (["--mixed_precision", "bf16"], 'mixed_precision: checkpoint "no", now "bf16"'),  # another precision, same process
    ([], "learning_rate: checkpoint (not recorded), now 0.0001"),  # an older checkpoint, without the field
])
def test_resuming_with_settings_that_change_the_result_is_refused(setup, tmp_path, capsys, extra, message):
    run = _copy_of_done(setup, tmp_path)
    if extra[:1] == ["--prompts"]:
        other = tmp_path / "other-prompts.txt"
        other.write_text("\n".join(toy.prompts(split="train", n=4, seed=2)) + "\n")
        extra = ["--prompts", str(other)]
    if not extra:
        for checkpoint in run.glob("checkpoint-*"):
            identity = json.loads((checkpoint / "hprune_run.json").read_text())
            del identity["learning_rate"]
            (checkpoint / "hprune_run.json").write_text(json.dumps(identity))
    before = _snapshot(run)
    err = _refused(_args(setup, run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", *extra), capsys)
    assert "checkpoint of another run" in err and message in err
    assert "--overwrite" in err and "another --output_dir" in err
    if extra[:1] == ["--lambda_feat"]:
        assert "data.teacher_steps: checkpoint 2, now 3" in err  # every differing value is named
    assert _snapshot(run) == before


# -- 2. the summary covers the whole run ----------------------------------------------------------
def test_the_summary_of_a_resumed_run_covers_every_step_of_it(setup, tmp_path, capsys):
    """Stopped at step 2, resumed to 4: the summary holds the losses of steps 1-4, equal to those of the 4 steps
    run straight (the fixture's run), the start loss of the run's own start, and the seconds of both segments."""
    straight = json.loads((setup / "done" / "distill_summary.json").read_text())
    run = _copy_of_done(setup, tmp_path)
    saved = json.loads((run / "checkpoint-2" / "hprune_progress.json").read_text())
    assert [e["step"] for e in saved["losses"]] == [1, 2] and saved["seconds"] > 0
    assert main(_args(setup, run, "--resume_from_checkpoint", str(run / "checkpoint-2"))) == 0
    assert "resumed from" in capsys.readouterr().out
    resumed = json.loads((run / "distill_summary.json").read_text())
    assert [e["step"] for e in resumed["losses"]] == [1, 2, 3, 4] and resumed["steps"] == 4
    assert resumed["losses"] == straight["losses"]  # bit-identical: the same batches, noise and updates
    assert resumed["fixed_batch_loss"] == straight["fixed_batch_loss"]
    assert resumed["rank_checksums"] == straight["rank_checksums"]
    assert resumed["seconds"] > saved["seconds"]  # the first segment's seconds, and this one's


# -- 3. and 4. values no run can use --------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--lambda_feat", "nan"), ("--lambda_task", "inf"), ("--gradient_accumulation_steps", "0"),
    ("--train_batch_size", "0"), ("--learning_rate", "-1"), ("--learning_rate", "nan"),
    ("--checkpointing_steps", "-1"), ("--max_train_steps", "0"), ("--checkpoints_total_limit", "0"),
    ("--resolution", "0"), ("--max_grad_norm", "-1"), ("--r_thres", "1.5"), ("--seed", "-3"),
    ("--max_train_minutes", "0"), ("--validation_steps", "-2"),
])
def test_bad_numbers_are_refused_at_the_flag(setup, tmp_path, capsys, flag, value):
    err = _refused_by_argparse(_args(setup, tmp_path / "out", flag, value), capsys)
    assert f"argument {flag}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,message", [
    ("lambda_feat", math.nan, "--lambda_feat must be a finite number"),
    ("lambda_task", -1.0, "--lambda_task must be at least 0"),
    ("learning_rate", 0.0, "--learning_rate must be above 0"),
    ("learning_rate", math.inf, "--learning_rate must be a finite number"),
    ("train_batch_size", 0, "--train_batch_size must be at least 1"),
    ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps must be at least 1"),
    ("max_train_steps", 0, "--max_train_steps must be at least 1"),
    ("max_grad_norm", -0.5, "--max_grad_norm must be at least 0"),
    ("r_thres", 1.5, "--r_thres must be at most 1"),
    ("checkpointing_steps", -1, "--checkpointing_steps must be at least 0"),
    ("checkpoints_total_limit", 0, "--checkpoints_total_limit must be at least 1"),
    ("resolution", 0, "--resolution must be at least 1"),
    ("train_batch_size", 2.5, "--train_batch_size must be an integer"),
    ("lora_rank", -1, "--lora_rank must be >= 0"),
    ("pwp", "yes", "pwp must be true or false"),
    ("mixed_precision", "fp8", "--mixed_precision must be one of"),
])
def test_bad_values_of_a_config_built_in_python_are_refused_before_loading(setup, tmp_path, option, value, message):
    from diffusers_hprune.distillation.trainer import DistillConfig, DistillError, distill

    config = DistillConfig(teacher="sd3", plan=str(setup / "plan.json"), output_dir=str(tmp_path / "out"),
                           analysis=str(setup / "analysis.json"), prompts=str(setup / "prompts.txt"))
    with pytest.raises(DistillError, match=message.replace("(", r"\(")):
        distill(DistillConfig(**{**config.__dict__, option: value}))
    assert not (tmp_path / "out").exists()


def test_a_negative_lora_rank_is_refused_on_the_command_line(setup, tmp_path, capsys):
    assert "--lora_rank must be >= 0 (0 trains full weights)" in _refused(
        _args(setup, tmp_path / "out", "--lora_rank", "-1"), capsys)
    assert not (tmp_path / "out").exists()


def test_a_resolution_the_model_cannot_patch_is_refused_before_training(setup, tmp_path, capsys):
    err = _refused(_args(setup, tmp_path / "out", "--resolution", "7"), capsys)
    assert "--resolution 7 does not fit" in err and "multiple of 4 pixels" in err and "use 4 or 8" in err
    assert not (tmp_path / "out").exists()


def _nan_loss_from_the_second_call(monkeypatch):
    """Step 5 is the first call (the start loss is the run's own, restored from the checkpoint), step 6 the second."""
    from diffusers_hprune.distillation import trainer

    real, calls = trainer.distillation_loss, []

    def nan_loss(*args, **kwargs):
        calls.append(1)
        loss, parts = real(*args, **kwargs)
        return (loss * math.nan, {k: math.nan for k in parts}) if len(calls) >= 2 else (loss, parts)

    monkeypatch.setattr(trainer, "distillation_loss", nan_loss)


def _nan_gradient_norm(monkeypatch):
    import torch
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, *args, **kwargs: torch.tensor(math.inf))


def _nan_weights_after_training(monkeypatch):
    from diffusers_hprune.distillation import trainer

    real = trainer._train

    def train_then_spoil(run, step, progress):
        step = real(run, step, progress)
        next(run.inner.parameters()).data.fill_(math.nan)
        return step

    monkeypatch.setattr(trainer, "_train", train_then_spoil)


@pytest.mark.parametrize("fault,steps,message", [
    (_nan_loss_from_the_second_call, "8", "The loss at step 6 is nan"),
    (_nan_gradient_norm, "8", "The gradient norm at step 5 is inf"),
    (_nan_weights_after_training, "4", "The trained weights hold values that are not finite: nothing was saved"),
])
def test_a_value_that_is_not_finite_stops_the_run_and_saves_nothing(setup, tmp_path, capsys, monkeypatch, fault,
                                                                    steps, message):
    """Resumed at step 4: exit 2 naming the step; checkpoint-4 and the pipeline of step 4 kept as they were."""
    fault(monkeypatch)
    run = _copy_of_done(setup, tmp_path)
    before = _snapshot(run)
    err = _refused(_args(setup, run, "--max_train_steps", steps, "--resume_from_checkpoint", "latest"), capsys)
    assert message in err and "--learning_rate" in err
    if "at step" in message:
        assert f"the last checkpoint, {run / 'checkpoint-4'}, is kept" in err
    assert _snapshot(run) == before  # no new checkpoint, the pipeline of step 4 not replaced


# -- 5. no deletion of user files -----------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_folder_holding_other_files_is_refused_before_any_work(setup, tmp_path, capsys, overwrite):
    user = tmp_path / "U"
    (user / "vae").mkdir(parents=True)
    (user / "scheduler").mkdir()
    (user / "vae" / "NOTES.txt").write_text("my notes\n")
    (user / "scheduler" / "keep.txt").write_text("keep me\n")
    before = _snapshot(user)
    err = _refused(_args(setup, user, *(["--overwrite"] if overwrite else [])), capsys)
    assert "holds no run of `hprune distill` (found scheduler, vae)" in err and "Choose an empty or new folder" in err
    assert _snapshot(user) == before


@pytest.mark.parametrize("where,overwrite", [("same", False), ("same", True), ("inside", True), ("around", True)])
def test_the_teacher_folder_is_never_the_output(setup, tmp_path, capsys, where, overwrite):
    teacher = tmp_path / "models" / "teacher"
    shutil.copytree(toy.model_path("sd3"), teacher)
    out = {"same": teacher, "inside": teacher / "student", "around": teacher.parent}[where]
    before = _snapshot(teacher)
    args = _args(setup, out, *(["--overwrite"] if overwrite else []))
    args[args.index("--teacher") + 1] = str(teacher)
    err = _refused(args, capsys)
    phrase = {"same": "is the same path as --teacher", "inside": "is inside --teacher",
              "around": "is a folder that holds --teacher"}[where]
    assert phrase in err, err
    assert _snapshot(teacher) == before


def test_a_pipeline_folder_that_is_no_distillation_run_is_not_called_one(setup, tmp_path, capsys):
    pipeline = tmp_path / "some-pipeline"
    shutil.copytree(toy.model_path("sd3"), pipeline)
    before = _snapshot(pipeline)
    err = _refused(_args(setup, pipeline), capsys)
    assert "holds no run of `hprune distill`" in err and "model_index.json" in err
    assert "already holds a distillation run" not in err
    assert _snapshot(pipeline) == before


def test_leftovers_of_an_interrupted_save_are_removed_at_the_next_start(setup, tmp_path):
    run = _copy_of_done(setup, tmp_path)
    (run / ".pipeline.ab_cd123").mkdir()  # what _save_pipeline's mkdtemp leaves when killed
    (run / ".pipeline.ab_cd123" / "model_index.json").write_text("{}")
    (run / ".checkpoint-6.tmp").mkdir()
    (run / ".distill_summary.json.x1y2z3w4.tmp").write_text("{")
    (run / ".pipeline.notes").write_text("not ours\n")  # a file: this code makes folders of that name
    (run / "my.checkpoint-6.tmp").write_text("not ours\n")
    assert main(_args(setup, run, "--resume_from_checkpoint", "latest")) == 0
    names = {p.name for p in run.iterdir()}
    assert not {".pipeline.ab_cd123", ".checkpoint-6.tmp", ".distill_summary.json.x1y2z3w4.tmp"} & names
    assert {".pipeline.notes", "my.checkpoint-6.tmp"} <= names


def test_overwrite_and_the_checkpoint_limit_touch_only_this_commands_checkpoints(setup, tmp_path):
    run = _copy_of_done(setup, tmp_path)
    (run / "checkpoint-best").mkdir()
    (run / "checkpoint-best" / "README.txt").write_text("my best one\n")
    # --checkpoints_total_limit beside a checkpoint-best folder (no step number): ignored, kept.
    assert main(_args(setup, run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                      "--checkpoints_total_limit", "1")) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-best"]
    # --overwrite: a new run, the old run's checkpoints go, the user's folder stays.
    assert main(_args(setup, run, "--max_train_steps", "1", "--checkpointing_steps", "0", "--overwrite")) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-best"]
    assert (run / "checkpoint-best" / "README.txt").read_text() == "my best one\n"


# -- 6. damaged inputs ----------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage,message", [
    (lambda c: _truncate(c / "model.safetensors"), "model.safetensors cannot be read"),
    (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin cannot be read"),
    (lambda c: (c / "hprune_progress.json").write_text("{"), "hprune_progress.json cannot be read"),
])
def test_a_damaged_checkpoint_is_one_clear_error(setup, tmp_path, capsys, damage, message):
    run = _copy_of_done(setup, tmp_path)
    damage(run / "checkpoint-4")
    before = _snapshot(run)
    err = _refused(_args(setup, run, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"), capsys)
    assert f"The checkpoint {run / 'checkpoint-4'} is damaged: {message}" in err
    assert "Resume from an earlier checkpoint" in err
    assert _snapshot(run) == before


def test_a_damaged_data_cache_is_one_clear_error_naming_the_file(setup, tmp_path, capsys):
    run = _copy_of_done(setup, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(setup / "cache", cache)
    arrow = sorted(cache.rglob("*.arrow"))
    assert len(arrow) == 1
    _truncate(arrow[0])
    before = _snapshot(run, cache)
    err = _refused(_args(setup, run, "--resume_from_checkpoint", "latest", "--cache_dir", str(cache)), capsys)
    assert f"The cached training data is damaged: {arrow[0]}" in err
    assert f"Delete the folder {arrow[0].parent}" in err
    assert _snapshot(run, cache) == before


@pytest.mark.parametrize("which,message", [("prompts", "The prompt file"), ("plan", "The prune plan"),
                                           ("analysis", "The analysis")])
def test_an_input_that_is_not_utf8_is_one_clear_error(setup, tmp_path, capsys, which, message):
    bad = tmp_path / f"{which}.bin"
    bad.write_bytes(b"\xff\xfe not text \x80\n")
    args = _args(setup, tmp_path / "out")
    args[args.index(f"--{which}") + 1] = str(bad)
    err = _refused(args, capsys)
    assert f"{message} {bad} is not UTF-8" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where there is a CUDA GPU")
def test_fp16_without_a_gpu_is_one_clear_error(setup, tmp_path, capsys, monkeypatch):
    """Issue 32: Accelerate's bare ValueError for fp16 on a CPU was a traceback; the flag or a launch config's."""
    err = _refused(_args(setup, tmp_path / "out", "--mixed_precision", "fp16"), capsys)
    assert "--mixed_precision fp16 needs a CUDA GPU" in err and "bf16 or no" in err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert "needs a CUDA GPU" in _refused(_args(setup, tmp_path / "out2"), capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(setup, tmp_path, capsys, monkeypatch):
    """Issue 32: distill on a full disk left OUT/hprune_run.json behind. A run that made OUT and fails before its
    first checkpoint removes it; a folder that existed before (a compress stage's) is never removed."""
    from safetensors import SafetensorError

    import diffusers_hprune.distillation.trainer as trainer

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer, "_save_pipeline", full)
    out = tmp_path / "new"
    assert main(_args(setup, out, "--checkpointing_steps", "0")) == 2
    assert f"no space left on the device holding {out}" in capsys.readouterr().err
    assert not out.exists()
    existing = tmp_path / "stage"
    existing.mkdir()
    assert main(_args(setup, existing, "--checkpointing_steps", "0")) == 2
    assert existing.is_dir()
    kept = tmp_path / "with-checkpoint"
    assert main(_args(setup, kept)) == 2  # checkpoints at steps 2 and 4 are written before the final save fails
    assert sorted(p.name for p in kept.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
