"""`hprune demo` and the quick-start example run as a user would run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_hprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


# The demo's own defaults take about 10 minutes (a 5-minute distillation budget); the test shrinks the
# budget and the prompt counts with the same flags a user has.
QUICK = ["--train-prompts", "16", "--max-train-minutes", "0.05", "--eval-prompts", "4", "--latency-repeats", "2",
         "--analysis-prompts", "2", "--eval-steps", "1"]


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_demo_compresses_the_sd3_toy_and_says_where_everything_is(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    import diffusers_hprune  # noqa: F401  (registers the pruned classes for from_pretrained)
    from diffusers_hprune.demo import DEMO_CONFIG

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [name for name, status, _ in summary["stages"]] == [
        "analysis", "plan", "pruned", "distilled", "quantized", "evaluation"]
    assert all(status == "ran" for _, status, _ in summary["stages"])
    config = json.loads((out / "hprune_config.json").read_text())
    assert config["ratio"] == DEMO_CONFIG.ratio and config["learning_rate"] == DEMO_CONFIG.learning_rate
    assert config["max_train_minutes"] == 0.05 and config["train_prompts"] == 16  # the flags override the defaults
    teacher, student = summary["metrics"]["teacher"], summary["metrics"]["student"]
    assert student["params"] < 0.75 * teacher["params"]  # the 30 % plan
    assert student["weight_bytes"] < 0.3 * teacher["weight_bytes"]  # pruned and NF4 against fp32
    # every format's latency beside the same FLOP bound: the 16-bit student was evaluated too, and where
    sixteen = summary["metrics"]["unquantized"]
    assert list(summary["metrics"]) == ["teacher", "unquantized", "student"] and sixteen["weights"] == "float32"
    assert student["weights"] == "nf4" and sixteen["step_flops"] == student["step_flops"] < teacher["step_flops"]
    assert f"measured on {summary['device']}" in printed and "compressed, 16-bit (float32)" in printed
    card = (out / "5-quantized" / "README.md").read_text()
    assert "| this model before quantisation | float32 |" in card and f"Measured on {summary['device']}" in card
    final = Path(summary["final"])
    assert final == out / "5-quantized"
    for line in (f"teacher {teacher['metrics']['shapeeval']['overall']:.3f}",
                 f"compressed {student['metrics']['shapeeval']['overall']:.3f}",
                 str(final / "README.md"), str(out / "6-evaluation" / "grid.png")):
        assert line in printed
    assert (final / "README.md").is_file() and (out / "6-evaluation" / "grid.png").is_file()
    assert type(DiffusionPipeline.from_pretrained(final).transformer).__name__.startswith("HierarchicalPruned")

    # Run again: every stage is found done and skipped.
    assert main(["demo", "--out", str(out), *QUICK]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert all(status.startswith("done before") for _, status, _ in again["stages"])


def test_demo_refuses_a_folder_that_is_not_a_run_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(out)]) == 2
    assert "not an hprune run folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2  # --overwrite deleted the folder before
    assert "--overwrite replaces only a run folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_quickstart_example_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output", str(tmp_path / "q"), "--steps", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removes blocks 4" in result.stdout
    assert "reloaded HierarchicalPrunedSD3Pipeline" in result.stdout
    assert (tmp_path / "q" / "sample.png").is_file()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    demo_cmd, test_cmd = [line.strip() for line in block.strip().splitlines()]
    assert demo_cmd == "hprune demo"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # CI bounds the command's time (`timeout [options] DURATION COMMAND`); the command itself is the README's
    last = re.fullmatch(r"(?:timeout(?: --?[a-z-]+(?:=\S+| \S+)?)* \d+[smh]? )?(.+)", ci_lines[-1])
    assert last and last.group(1) == test_cmd, ci_lines[-1]


def test_cli_output_has_no_library_noise(tmp_path):
    """The command line drops third-party notices that do not concern its users (missing optional kernels,
    torchvision, a renamed argument) and per-file loading bars; the library itself leaves logging alone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("DIFFUSERS_VERBOSITY", None)
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_hprune", "analyze", "sd3", "--out", str(tmp_path / "a.json"),
         "--n-prompts", "1", "--eval-steps", "1", "--metric", "velocity"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("gemm_4bit", "torchvision", "FutureWarning", "Loading weights", "Loading pipeline components"):
        assert noise not in result.stderr, noise
    assert "analysed sd3: 71 entries" in result.stdout
