"""`hprune compress` and HPruneConfig: every stage in one command, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diffusers_hprune.cli import main
from diffusers_hprune.compression.config import ConfigError, HPruneConfig

SMALL = ["--metric", "velocity", "--analysis-prompts", "2", "--eval-steps", "2", "--train-prompts", "16",
         "--train-batch-size", "4",
         "--eval-prompts", "4", "--latency-repeats", "2", "--learning-rate", "0.001"]


def test_config_round_trip_and_validation(tmp_path):
    config = HPruneConfig(memory=3_000_000, weight_dtype="nf4", max_train_steps=10, lora_rank=4)
    assert config.ratio is None
    config.save(tmp_path / "c.json")
    assert HPruneConfig.load(tmp_path / "c.json") == config
    assert HPruneConfig().ratio == 0.3
    for kwargs, message in [({"ratio": 1.2}, "ratio must be in"), ({"ratio": 0.2, "memory": 10}, "not both"),
                            ({"strategy": "magic"}, "strategy must be"), ({"weight_dtype": "int3"}, "weight_dtype"),
                            ({"max_train_steps": 0}, "max_train_steps must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            HPruneConfig(**kwargs)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "diffusers-hprune/config", "version": 1, "colour": 3}))
    with pytest.raises(ConfigError, match="Unknown HPruneConfig field"):
        HPruneConfig.load(tmp_path / "bad.json")


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_compress_runs_every_stage_then_skips_them(tmp_path, capsys, monkeypatch):
    import gc

    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard

    import diffusers_hprune.distillation.trainer as trainer

    def live_pipelines() -> int:
        gc.collect()
        return sum(isinstance(o, DiffusionPipeline) for o in gc.get_objects())

    real_distill, seen = trainer.distill, []
    monkeypatch.setattr(trainer, "distill", lambda config: seen.append(live_pipelines()) or real_distill(config))
    before = live_pipelines()
    out = tmp_path / "run"
    args = ["compress", "sd3", "--out", str(out), "--ratio", "0.3", "--max-train-steps", "4",
            "--checkpointing-steps", "2", *SMALL]
    assert main(args) == 0
    assert seen == [before]  # compress let its teacher go before distill loaded its own
    printed = capsys.readouterr().out
    for number, stage in enumerate(["analysis", "plan", "pruned", "distilled", "quantized", "evaluation"], 1):
        assert json.loads((out / f"{number}-{stage}" / "hprune_stage.json").read_text())["stage"] == stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"] == str(out / "5-quantized") and [r[1] for r in summary["stages"]] == ["ran"] * 6
    student = summary["metrics"]["student"]
    assert student["weight_bytes"] < 0.2 * summary["metrics"]["teacher"]["weight_bytes"]  # 30 % pruned, then NF4
    assert "shapeeval" in student["metrics"] and "fidelity" in student
    card = ModelCard.load(out / "5-quantized" / "README.md")
    assert {"pruned", "4-bit", "distillation"} <= set(card.data.tags)
    assert card.text.lstrip().startswith("# toy-sd3-hprune")  # a toy is no Hub model: named, not linked
    assert "hprune compress sd3" in card.text and (out / "5-quantized" / "samples.png").is_file()
    assert "compressed pipeline:" in printed and "parameters" in printed

    pipe = DiffusionPipeline.from_pretrained(out / "5-quantized")
    assert not pipe.transformer.prune_plan.is_empty
    # Again: nothing to do. A changed setting redoes that stage and the ones after it only.
    assert main(args) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 6
    assert main([a if a != "4" or args[k - 1] != "--eval-prompts" else "3" for k, a in enumerate(args)]) == 0
    rows = json.loads((out / "summary.json").read_text())["stages"]
    assert [r[1] for r in rows] == ["done before (skipped)"] * 5 + ["ran"]
    # Another learning rate: the distillation starts again (no "resume" from the old run's last checkpoint).
    assert main([a if args[k - 1] != "--learning-rate" else "0.002" for k, a in enumerate(args)]) == 0
    printed = capsys.readouterr().out
    assert "[4] distilled: its settings changed; starting the stage again" in printed and "resumed from" not in printed
    rows = json.loads((out / "summary.json").read_text())["stages"]
    assert [r[1] for r in rows] == ["done before (skipped)"] * 3 + ["ran"] * 3
    distilled = json.loads((out / "4-distilled" / "distill_summary.json").read_text())
    assert [g["lr"] for g in distilled["param_groups"]][0] != 0 and distilled["losses"][0]["step"] == 1
    assert json.loads((out / "4-distilled" / "hprune_run.json").read_text())["learning_rate"] == 0.002


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_compress_continues_after_being_killed_during_distillation(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["compress", "sd3", "--out", str(out), "--max-train-steps", "30", "--checkpointing-steps", "5",
            "--quantize", "none", *SMALL]
    proc = subprocess.Popen([sys.executable, "-m", "diffusers_hprune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list((out / "4-distilled").glob("checkpoint-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before a checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "4-distilled" / "hprune_stage.json").exists()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[1] analysis: done before, skipped" in printed and "[3] pruned: done before, skipped" in printed
    assert "resumed from" in printed
    summary = json.loads((out / "4-distilled" / "distill_summary.json").read_text())
    assert summary["steps"] == 30 and [r["step"] for r in summary["losses"]] == list(range(1, 31))  # the whole run
    assert json.loads((out / "summary.json").read_text())["final"] == str(out / "4-distilled")


def test_evaluation_prompts_are_never_training_prompts():
    from diffusers_hprune.compression import CompressError, split_prompts

    prompts = [f"prompt {k}" for k in range(12)] + ["prompt 3"]  # a repeated line is one prompt
    train, held, source = split_prompts(prompts, None, 50)
    assert held == ["prompt 10", "prompt 11"] and "last 2 distinct lines" in source  # at most a fifth
    assert not set(train) & set(held) and set(train) | set(held) == set(prompts)
    train, held, source = split_prompts(prompts, ["prompt 0", "elsewhere"], 50)
    assert held == ["prompt 0", "elsewhere"] and "prompt 0" not in train and source == "--eval-prompts-file"
    toy_train, toy_held = ["a", "b"], ["c"]
    assert split_prompts(None, None, 4, toy_train=toy_train, toy_held_out=toy_held) == (
        ["a", "b"], ["c"], "the toy's held-out prompts")
    with pytest.raises(CompressError, match="at least 2 distinct prompts"):
        split_prompts(["one", "one"], None, 4)
    with pytest.raises(CompressError, match="Every training prompt is also an evaluation prompt"):
        split_prompts(["one", "two"], ["two", "one"], 4)


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_compress_with_a_prompt_file_evaluates_on_held_out_prompts(tmp_path, monkeypatch):
    from diffusers_hprune import toy
    from diffusers_hprune.compression import run

    shared = []
    real_evaluate = run.evaluate_pipelines

    def evaluate(models, *args, **kwargs):  # the student holds its own transformer and the teacher's other parts
        teacher, load = models["teacher"], models["student"]

        def student():  # loaded when its turn comes, after the teacher's
            pipe = load()
            shared.append(pipe.transformer is not teacher.transformer and all(
                getattr(pipe, name) is getattr(teacher, name) for name in ("text_encoder", "text_encoder_3", "vae")))
            return pipe

        return real_evaluate({"teacher": teacher, "student": student}, *args, **kwargs)

    monkeypatch.setattr(run, "evaluate_pipelines", evaluate)

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(toy.prompts(split="train", n=20, seed=3)) + "\n")
    out = tmp_path / "run"
    assert main(["compress", "sd3", "--out", str(out), "--prompts", str(prompt_file), "--max-train-steps", "2",
                 "--quantize", "none", *SMALL]) == 0
    trained = set((out / "train_prompts.txt").read_text().splitlines())
    evaluated = json.loads((out / "6-evaluation" / "metrics.json").read_text())["prompts"]
    assert evaluated and not trained & set(evaluated)
    assert set(evaluated) <= set(prompt_file.read_text().splitlines())
    summary = json.loads((out / "summary.json").read_text())["prompts"]
    assert summary["evaluation"] == len(evaluated) and "held out of --prompts" in summary["evaluation_source"]
    assert shared == [True]


def _another(value):
    """A different value of an option's type (bools flip, numbers grow, None becomes a number, strings change)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return 3
    if isinstance(value, list):
        return [*value, "another"]
    return f"{value}-another"


def test_every_distillation_option_that_changes_the_result_keys_the_distillation_stage():
    """compress redoes its distillation stage exactly when the trained weights could differ: every DistillConfig
    option is classified, and each one that changes the result (not an input identified by content, nor
    bookkeeping) changes the stage's key. A new option left unclassified fails here."""
    from dataclasses import fields, replace

    from diffusers_hprune.compression.run import distill_stage_inputs
    from diffusers_hprune.distillation import settings

    groups = {"identity": settings.IDENTITY_OPTIONS, "budget": settings.BUDGET_OPTIONS, "data": settings.DATA_OPTIONS,
              "inputs": settings.INPUT_OPTIONS, "bookkeeping": settings.BOOKKEEPING_OPTIONS}
    classified = [name for group in groups.values() for name in group]
    assert sorted(classified) == sorted(f.name for f in fields(settings.DistillConfig)), "classify every option once"
    base = HPruneConfig().distill_config(teacher="sd3", plan="p.json", output_dir="out")
    key = distill_stage_inputs(base, "plan-key", ["a red circle"])
    for name in settings.IDENTITY_OPTIONS + settings.BUDGET_OPTIONS + settings.DATA_OPTIONS:
        changed = replace(base, **{name: _another(getattr(base, name))})
        assert distill_stage_inputs(changed, "plan-key", ["a red circle"]) != key, name
    for name in settings.INPUT_OPTIONS + settings.BOOKKEEPING_OPTIONS:  # identified by content, or no effect
        changed = replace(base, **{name: _another(getattr(base, name))})
        assert distill_stage_inputs(changed, "plan-key", ["a red circle"]) == key, name
    assert distill_stage_inputs(base, "other-plan", ["a red circle"]) != key
    assert distill_stage_inputs(base, "plan-key", ["a blue square"]) != key


def test_every_run_setting_keys_the_stages_whose_result_it_changes():
    """Every HPruneConfig field is classified: keyed by the stages it changes (the analysis, the plan, the
    evaluation, or the distillation through distill_config), a choice of which stages run, or unkeyed. Changing a
    keyed field changes its stages' keys; a new field left unclassified fails here."""
    from dataclasses import fields, replace

    from diffusers_hprune.compression import config as run_config
    from diffusers_hprune.compression.run import distill_stage_inputs
    from diffusers_hprune.distillation import settings

    distillation = set(settings.IDENTITY_OPTIONS + settings.BUDGET_OPTIONS + settings.DATA_OPTIONS)
    shared = {f.name for f in fields(settings.DistillConfig)}
    stage_keyed = {**run_config.ANALYSIS_KEY, **run_config.PLAN_KEY, **run_config.EVALUATION_KEY}
    classified = (set(stage_keyed) | {"train_prompts"} | set(run_config.STAGE_CHOICES) | set(run_config.UNKEYED)
                  | ({f.name for f in fields(HPruneConfig)} & shared))
    assert classified == {f.name for f in fields(HPruneConfig)}, "classify every setting"

    base = HPruneConfig()

    def keys(config: HPruneConfig) -> tuple:
        paths = dict(teacher="sd3", plan="p.json", output_dir="out")
        prompts = ["a red circle"] * config.train_prompts
        return (config.analysis_settings(), config.plan_settings(), config.evaluation_settings(),
                distill_stage_inputs(config.distill_config(**paths), "plan-key", prompts))

    for name in sorted(set(stage_keyed) | {"train_prompts"} | (distillation & {f.name for f in fields(HPruneConfig)})):
        changed = {"metric": {"metric": "velocity"}, "weight_dtype": {"weight_dtype": "fp16"},
                   "strategy": {"strategy": "bk-sdm"}, "mixed_precision": {"mixed_precision": "bf16"},
                   "r_thres": {"r_thres": 0.5}, "memory": {"ratio": None, "memory": 4_000_000_000},
                   "ratio": {"ratio": 0.2}}.get(name, {name: _another(getattr(base, name))})
        assert keys(replace(base, **changed)) != keys(base), name
    for name in run_config.UNKEYED + ("gradient_checkpointing", "checkpointing_steps"):  # no stage's result changes
        assert keys(replace(base, **{name: _another(getattr(base, name))})) == keys(base), name
    # the analysis and evaluation keys keep the names they always had: the folders of earlier runs resume
    assert base.analysis_settings() == {"metric": base.metric, "n": 8, "eval_steps": 4, "seed": 0}
    assert base.evaluation_settings() == {"n": 50, "seed": 0}


def test_settings_declared_in_several_places_share_one_default():
    """HPruneConfig, DistillConfig, BudgetOptions and DataSpec each name some of the same settings; their defaults
    come from one place (DistillConfig's), so they cannot drift apart. The differences are deliberate, listed
    here with their reason."""
    from dataclasses import MISSING, fields

    from diffusers_hprune.budget import BudgetOptions
    from diffusers_hprune.distillation.data import DataSpec
    from diffusers_hprune.distillation.settings import DistillConfig

    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    deliberate = {
        (HPruneConfig, DistillConfig): {"checkpointing_steps",  # compress checkpoints every 200 steps
                                        "mixed_precision"},  # distill: None, the launch config's; compress has none
        (HPruneConfig, BudgetOptions): {"mixed_precision"},  # the budget assumes bf16, what a GPU run should use
        (DistillConfig, BudgetOptions): {"mixed_precision"},
        (DistillConfig, DataSpec): set(),
    }
    for (a, b), differ in deliberate.items():
        left, right = defaults(a), defaults(b)
        shared = set(left) & set(right)
        assert differ <= shared, (a.__name__, b.__name__)
        assert {n for n in shared if left[n] != right[n]} == differ, (a.__name__, b.__name__)


def test_the_run_config_gives_the_distillation_every_setting_it_shares():
    from dataclasses import fields

    from diffusers_hprune.distillation.trainer import DistillConfig

    shared = {f.name for f in fields(HPruneConfig)} & {f.name for f in fields(DistillConfig)}
    assert {"learning_rate", "max_train_steps", "lora_rank", "mixed_precision", "seed", "r_thres"} <= shared
    config = HPruneConfig(learning_rate=3e-4, max_train_steps=7, max_train_minutes=2.0, train_batch_size=2,
                          checkpointing_steps=3, pwp=False, sgdistill=False, lora_rank=4, gradient_checkpointing=True,
                          mixed_precision="bf16", seed=5, r_thres=0.5)
    distill = config.distill_config(teacher="sd3", plan="p.json", output_dir="out", checkpoints_total_limit=2)
    for name in shared:
        assert getattr(distill, name) == getattr(config, name), name
    assert (distill.teacher, distill.plan, distill.output_dir, distill.checkpoints_total_limit) == (
        "sd3", "p.json", "out", 2)
    assert {getattr(config, n) for n in shared} != {getattr(HPruneConfig(), n) for n in shared}  # not the defaults


def test_the_budget_check_of_compress_sees_the_runs_settings():
    """hprune compress checks the predicted peak with the options its stages will run with (derived, not retyped)."""
    from diffusers_hprune.budget import BudgetOptions

    config = HPruneConfig(lora_rank=4, gradient_checkpointing=True, mixed_precision="fp16", train_batch_size=2,
                          pwp=False, sgdistill=False, r_thres=0.5, train_prompts=40, analysis_prompts=3, eval_steps=2)
    distillation = config.distillation_budget()
    for name in ("lora_rank", "gradient_checkpointing", "mixed_precision", "train_batch_size", "pwp", "sgdistill",
                 "r_thres"):
        assert getattr(distillation, name) == getattr(config, name) != getattr(BudgetOptions(), name), name
    assert distillation.train_samples == 40
    assert config.distillation_budget(["a", "b", "c"]).train_samples == 3
    analysis = config.analysis_budget()
    assert (analysis.analysis_prompts, analysis.eval_steps) == (3, 2)
