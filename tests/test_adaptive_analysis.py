"""The adaptive analysis (issue 37): per-image evidence, intervals, the plan-stability rule, resume, sharding."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
from helpers import failure_output, free_port, hprune_cli, run_process_group

from diffusers_hprune.analysis import analyze, synthetic_report
from diffusers_hprune.analysis.adaptive import batch_order, interval
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config
from diffusers_hprune.contributions import AnalysisError, ContributionReport
from diffusers_hprune.planning import format_table, make_plan
from diffusers_hprune.planning.decisions import PlanDecisions
from diffusers_hprune.utils.errors import PlanError

# 16 px: the tiny VAE does not downsample, so 256 image tokens (32 px: 1024, a 3.8 x slower analysis).
GEN = dict(num_inference_steps=2, height=16, width=16)
SMALL = dict(n_prompts=4, batch_size=2, progress=False, **GEN)


class Rule:
    """A stopping rule that names every entry (or none) undecided, and counts its calls."""

    def __init__(self, undecided: bool):
        self.all, self.calls = undecided, 0

    def undecided(self, estimates, intervals):
        self.calls += 1
        return set(intervals) if self.all else set()


def test_interval_is_the_normal_interval_of_the_mean_closed_at_every_image():
    values = [0.1, 0.4, 0.2, 0.7, 0.3]
    low, high = interval(values, population=40, confidence=0.95)
    mean = statistics.fmean(values)
    half = 1.959964 * statistics.stdev(values) / math.sqrt(5) * math.sqrt(35 / 39)
    assert low == pytest.approx(mean - half, rel=1e-6) and high == pytest.approx(mean + half, rel=1e-6)
    assert interval(values, population=5, confidence=0.95) == (mean, mean)  # every image: nothing left to estimate
    assert interval([0.3], population=40, confidence=0.95) == (-math.inf, math.inf)
    wider = interval(values, population=40, confidence=0.99)
    assert wider[0] < low and wider[1] > high
    assert sorted(batch_order(7, seed=3)) == list(range(7)) and batch_order(7, seed=3) == batch_order(7, seed=3)
    assert batch_order(7, seed=3) != batch_order(7, seed=4)


def _rule_and_estimates(name="sd3.5-large-turbo", ratios=(0.3,)):
    report = synthetic_report(name)
    inventory = inspect_transformer(load_transformer_config(name))
    return PlanDecisions(inventory, ratios), report.contributions(), inventory


def test_plan_decisions_name_the_entries_near_the_cut_only():
    rule, estimates, inventory = _rule_and_estimates()
    exact = {k: (v, v) for k, v in estimates.items()}
    assert rule.undecided(estimates, exact) == set()
    plan = make_plan(estimates, inventory, ratio=0.3).plan
    removed = plan.removed_blocks[-1]  # a block the plan removes, and one it keeps nearby
    kept = max(i for i in range(inventory.family.num_blocks(inventory.config)) if i not in plan.removed_blocks)
    wide = dict(exact)
    wide[(removed, "block")] = (0.0, 10 * max(estimates.values()))  # could be the most important block of all
    wide[(kept, "block")] = (estimates[(kept, "block")] * 0.999, estimates[(kept, "block")] * 1.001)
    assert rule.undecided(estimates, wide) == {(removed, "block")}
    # An interval spanning 0 is tried at 0, where |dP| is smallest.
    zero = dict(exact)
    zero[(kept, "block")] = (-estimates[(kept, "block")], estimates[(kept, "block")])
    assert rule.undecided(estimates, zero) == {(kept, "block")}
    with pytest.raises(PlanError, match="at least one ratio"):
        PlanDecisions(inventory, [])
    with pytest.raises(PlanError, match=r"must lie in \(0, 1\)"):
        PlanDecisions(inventory, [1.5])


def test_every_image_for_every_entry_is_the_full_analysis(sd3_pipeline):
    full = analyze(sd3_pipeline, **SMALL)
    rule = Rule(undecided=True)
    adaptive = analyze(sd3_pipeline, stopping=rule, min_images=2, **SMALL)
    assert adaptive.entries.keys() == full.entries.keys() and rule.calls == 1  # round 1: 2 images; round 2: the rest
    for key, entry in full.entries.items():
        got = adaptive.entries[key]
        assert got["n_images"] == 4 and len(got["values"]) == 4 and got["interval"] == [got["delta"]] * 2
        assert got["delta"] == pytest.approx(statistics.fmean(got["values"]), rel=1e-15)  # kept at every image too
        assert got["delta"] == pytest.approx(entry["delta"], rel=1e-12, abs=1e-15)  # the order of a sum of 4 floats
    assert adaptive.run["adaptive"]["images_used"] == adaptive.run["adaptive"]["images_full"] == 4 * len(full.entries)


def test_a_decided_entry_stops_at_its_first_images_and_a_later_run_continues_it(sd3_pipeline, tmp_path):
    out = tmp_path / "analysis.json"
    early = analyze(sd3_pipeline, out, stopping=Rule(undecided=False), min_images=2, **SMALL)
    assert early.complete and not (tmp_path / "analysis.json.parts").exists()
    for entry in early.entries.values():
        assert entry["n_images"] == 2 and len(entry["values"]) == 2
        assert entry["delta"] == pytest.approx(statistics.fmean(entry["values"]), rel=1e-15)
        assert entry["interval"][0] <= entry["delta"] <= entry["interval"][1]
    full = analyze(sd3_pipeline, **SMALL)
    assert early.run["block_evaluations"] < full.run["block_evaluations"]
    table = format_table(early)
    assert f"adaptive analysis: {len(early.entries)} entries stopped before all their images" in table
    assert "~" in table and "~" not in format_table(full)
    # The file round-trips, and a later run with another rule continues from the kept values.
    assert ContributionReport.load(out).entries == early.entries
    later = analyze(sd3_pipeline, out, stopping=Rule(undecided=True), min_images=2, **SMALL)
    assert later.run["this_process"]["reused_entries"] == len(early.entries)
    for key, entry in full.entries.items():
        assert later.entries[key]["delta"] == pytest.approx(entry["delta"], rel=1e-12, abs=1e-15)
    assert later.run["block_evaluations"] < full.run["block_evaluations"]  # the first two images were not redrawn


class Crash(Exception):
    pass


class CrashingRule(Rule):
    """Names every entry undecided; raises at its second decision (a run stopped in its third round)."""

    def undecided(self, estimates, intervals):
        if self.calls == 1:
            raise Crash
        return super().undecided(estimates, intervals)


def test_a_stopped_adaptive_run_resumes_from_its_parts(sd3_pipeline, tmp_path):
    out = tmp_path / "analysis.json"
    settings = dict(SMALL, n_prompts=6)
    with pytest.raises(Crash):
        analyze(sd3_pipeline, out, stopping=CrashingRule(undecided=True), min_images=2, **settings)
    part = ContributionReport.load(tmp_path / "analysis.json.parts" / "rank-0.json")
    assert not out.exists() and {e["n_images"] for e in part.entries.values()} == {4}  # two rounds were saved
    assert part.run["block_evaluations"] > 0 and part.run["seconds"] > 0  # what the interrupted run spent
    resumed = analyze(sd3_pipeline, out, stopping=Rule(undecided=True), min_images=2, **settings)
    assert resumed.run["this_process"]["reused_entries"] == len(part.entries)
    uninterrupted = analyze(sd3_pipeline, stopping=Rule(undecided=True), min_images=2, **settings)
    assert resumed.entries == uninterrupted.entries
    assert resumed.run["block_evaluations"] < uninterrupted.run["block_evaluations"]


def test_a_full_analysis_measures_again_what_an_adaptive_one_stopped_early(sd3_pipeline, tmp_path):
    out = tmp_path / "analysis.json"
    analyze(sd3_pipeline, out, stopping=Rule(undecided=False), min_images=2, **SMALL)
    again = analyze(sd3_pipeline, out, **SMALL)
    assert again.run["this_process"]["reused_entries"] == 0
    assert again.entries == analyze(sd3_pipeline, **SMALL).entries  # no n_images, values or interval left


def test_component_entries_on_their_first_images(sd3_pipeline, tmp_path):
    """--component-images 2 of 4: a component entry is what an analysis of the first 2 prompts measures, a block
    entry what one of all 4 does; the adaptive analysis at every image ends at the same numbers."""
    capped = analyze(sd3_pipeline, component_images=2, **SMALL)
    everything = analyze(sd3_pipeline, **SMALL)
    first_two = analyze(sd3_pipeline, **dict(SMALL, n_prompts=2))
    assert capped.calibration["component_images"] == 2 and capped.entry_images((0, "attn")) == 2
    for key, entry in capped.entries.items():
        assert entry == (everything if key[1] == "block" else first_two).entries[key], key
    rule = Rule(undecided=True)
    out = tmp_path / "analysis.json"  # saved after every batch, and read back: an entry's images are its own
    adaptive = analyze(sd3_pipeline, out, stopping=rule, min_images=2, component_images=2, **SMALL)
    assert ContributionReport.load(out).entries == adaptive.entries
    for key, entry in capped.entries.items():
        assert adaptive.entries[key]["n_images"] == (4 if key[1] == "block" else 2)
        assert adaptive.entries[key]["delta"] == pytest.approx(entry["delta"], rel=1e-12, abs=1e-15)
    assert rule.calls == 1  # round 2 was the blocks' alone
    with pytest.raises(AnalysisError, match="multiple of --batch-size 2"):
        analyze(sd3_pipeline, component_images=3, **SMALL)
    with pytest.raises(AnalysisError, match="--component-images counts images; the velocity metric"):
        analyze(sd3_pipeline, metric="velocity", component_images=2, **SMALL)


def test_adaptive_refusals(sd3_pipeline, tmp_path):
    rule = Rule(undecided=False)
    with pytest.raises(AnalysisError, match="velocity metric compares predictions"):
        analyze(sd3_pipeline, metric="velocity", stopping=rule, **SMALL)
    with pytest.raises(AnalysisError, match="alignment score for bk-sdm"):
        analyze(sd3_pipeline, alignment_metric="shapeeval", stopping=rule, **SMALL)
    with pytest.raises(AnalysisError, match="--method cached or naive"):
        analyze(sd3_pipeline, method="scratch", stopping=rule, **SMALL)
    with pytest.raises(AnalysisError, match="at least 2 images"):
        analyze(sd3_pipeline, stopping=rule, min_images=1, **SMALL)
    with pytest.raises(AnalysisError, match=r"confidence .* must lie in \(0, 1\)"):
        analyze(sd3_pipeline, stopping=rule, confidence=1.0, **SMALL)


def test_adaptive_entries_in_a_file_are_checked(sd3_pipeline, tmp_path):
    data = analyze(sd3_pipeline, stopping=Rule(undecided=False), min_images=2, **SMALL).to_dict()
    path = tmp_path / "analysis.json"
    for change, message in (
        (lambda e: e.update(values=e["values"][:1]), "one number per image"),
        (lambda e: e.pop("values"), "no `values`"),
        (lambda e: e.update(n_images=9), "n_images must be at most 4"),
        (lambda e: e.update(interval=[1.0, 0.0]), "low end 1.0 is above its high end"),
        (lambda e: e.update(interval=[0.0]), r"must be a list \[low, high\]"),
        (lambda e: e.update(values=[0.1, float("nan")]), "finite"),
    ):
        bad = json.loads(json.dumps(data))
        change(bad["entries"][0])
        path.write_text(json.dumps(bad))
        with pytest.raises(AnalysisError, match=message):
            ContributionReport.load(path)


def test_cli_adaptive_flags_need_images_auto(tmp_path):
    cmd, env = hprune_cli("analyze", "sd3", "--out", str(tmp_path / "a.json"), "--plan-ratios", "0.3")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--plan-ratios only steer an adaptive analysis; add --images auto" in result.stderr


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_two_processes_give_the_single_process_adaptive_report(tmp_path):
    """`hprune analyze --images auto` under `accelerate launch --num_processes 2` (gloo): each round split, every
    process deciding the next from all parts, the result identical to one process's."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["--n-prompts", "6", "--batch-size", "2", "--steps", "2", "--images", "auto", "--plan-ratios", "0.3", "0.4"]
    cmd, env = hprune_cli("analyze", "sd3", "--out", str(one), *args)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adaptive: " in result.stdout
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "diffusers_hprune", "analyze", "sd3", "--out", str(two), *args]
    result = run_process_group(launch, env=env, timeout=600)
    assert result.returncode == 0, failure_output(result.stderr)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["entries"] == b["entries"] and a["run"]["adaptive"]["rounds"] == b["run"]["adaptive"]["rounds"]
    assert any(e["n_images"] < 6 for e in a["entries"])  # something was decided early
    assert not (tmp_path / "two.json.parts").exists()
