"""`hprune demo` and the quick-start example run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from diffusers_hprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_writes_pipelines_samples_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--prompts", "6"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sd3", "flux"}
    for family, s in summary.items():
        assert s["reload_max_abs_diff"] == 0.0
        assert 0.02 < s["removed_fraction"] < 0.5
        assert s["pruned_params"] < s["original_params"]
        assert 0.0 <= s["shapeeval"]["overall"] <= 1.0 and "position" in s["shapeeval"]
        assert (out / family / "samples.png").is_file() and (out / family / "samples-pruned.png").is_file()
        assert (out / family / "pruned-pipeline" / "model_index.json").is_file()
        # The plan came from the analysis, through HPP, for the default 20 % target.
        from diffusers_hprune import PrunePlan
        from diffusers_hprune.analysis import ContributionReport

        analysis = ContributionReport.load(out / family / "analysis.json")
        assert analysis.complete and s["analysis"]["entries"] == len(analysis.entries)
        plan = PrunePlan.load(out / family / "plan.json")
        assert plan.describe() == s["plan"] and plan.metadata["strategy"] == "hierarchical"
        assert plan.metadata["achieved_ratio"] >= 0.2
        assert abs(plan.metadata["achieved_ratio"] - s["removed_fraction"]) < 1e-4
        assert (out / family / "report" / "blocks.png").is_file()
        assert not (out / family / "analysis.json.parts").exists()
        assert len((out / family / "prompts.txt").read_text().splitlines()) == 6
        assert f"{s['removed_fraction']:.1%} removed" in printed
        assert f"ShapeEval {s['shapeeval']['overall']:.2f}" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_demo_refuses_to_overwrite_and_keeps_the_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(out), "--family", "sd3"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"


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
    assert ci_lines[-1] == test_cmd


def test_cli_output_has_no_library_noise(tmp_path):
    """The command line drops third-party notices that do not concern its users (missing optional kernels,
    torchvision, a renamed argument) and per-file loading bars; the library itself leaves logging alone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    env.pop("DIFFUSERS_VERBOSITY", None)
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_hprune", "analyze", "sd3", "--out", str(tmp_path / "a.json"),
         "--n-prompts", "1", "--eval-steps", "1"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("gemm_4bit", "torchvision", "FutureWarning", "Loading weights", "Loading pipeline components"):
        assert noise not in result.stderr, noise
    assert "analysed sd3: 71 entries" in result.stdout
