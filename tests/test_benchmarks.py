"""The benchmark scripts' own arithmetic: counts, configs and the refusal to print unmeasured rows."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("name", ["sd3.5-large-turbo", "flux.1-schnell"])
def test_protocol_count_agrees_with_the_per_call_count(name):
    from diffusers_hprune.architecture.inventory import load_transformer_config

    cost = _script("analysis_cost")
    config = load_transformer_config(name)
    scratch, naive, cached = cost.analytic_counts(config)
    one = cost.protocol_evaluations(config, block_images=1, component_images=1, steps=1)
    n = one["blocks"]
    assert one["cached"] == cached
    assert one["naive"] == naive - n  # the per-call count also runs an unablated baseline pass
    # Images and steps multiply the calls of the entries that use them, and nothing else.
    more = cost.protocol_evaluations(config, block_images=3, component_images=3, steps=2)
    assert more["cached"] == 6 * one["cached"] and more["naive"] == 6 * one["naive"]
    blocks_only = cost.protocol_evaluations(config, block_images=1, component_images=0, steps=1)
    assert 0 < blocks_only["cached"] < one["cached"]
    # image_fidelity with one step is the cached velocity count (the served first step is the whole trajectory);
    # every further step runs the ablated model whole.
    assert one["image_cached"] == one["cached"]
    two = cost.protocol_evaluations(config, block_images=1, component_images=1, steps=2)
    keys = cost.component_keys(cost.get_family(config), config)
    kept = sum(n - 1 if c == "block" else n for _, c in keys)
    assert two["image_cached"] == one["cached"] + n + kept  # the full model's second step, each entry's second step


@pytest.mark.parametrize("name", ["sd3.5-large-turbo", "flux.1-schnell"])
def test_adaptive_count_spans_first_images_to_the_full_protocol(name):
    from diffusers_hprune.architecture.inventory import load_transformer_config

    cost = _script("analysis_cost")
    config = load_transformer_config(name)
    everything = cost.adaptive_counts(config, {"block": 1.0, "component": 1.0})
    assert everything["adaptive"] == everything["full"] == cost.protocol_evaluations(config, **cost.PAPER_PROTOCOL)[
        "image_cached"]
    # 8 images per entry: the protocol at 8 images, but the full model still draws all 400.
    first = cost.adaptive_counts(config, {"block": 0.0, "component": 0.0}, min_images=8)
    n = cost.get_family(config).num_blocks(config)
    eight = cost.protocol_evaluations(config, block_images=8, component_images=8, steps=4)["image_cached"]
    assert first["adaptive"] == eight + n * (400 - 8) * 4
    blocks = cost.adaptive_counts(config, {"block": 1.0, "component": 0.0}, min_images=8)
    assert first["adaptive"] < blocks["adaptive"] < everything["adaptive"]


def test_spent_fractions_count_the_images_beyond_the_first():
    from types import SimpleNamespace

    cost = _script("analysis_cost")
    entries = {(0, "block"): 8, (1, "block"): 40, (0, "attn"): 8, (0, "ff"): 24}
    report = SimpleNamespace(run={"adaptive": {"min_images": 8}}, entries=entries, images_of=entries.__getitem__,
                             entry_images=lambda key: 40 if key[1] == "block" else 24)
    assert cost.spent_fractions(report) == {"block": 0.5, "component": 0.5}  # components of 24 images each
    report.entry_images = lambda key: 40
    assert cost.spent_fractions(report) == {"block": 0.5, "component": 0.25}


def test_matched_images_keep_the_interval_an_entry_stopped_at():
    cost = _script("analysis_cost")
    # The same calibration: the images the entry used.
    assert [cost.matched_images(n, 64, 64, 8) for n in (8, 24, 56)] == [8, 24, 56]
    # Every toy image: every image of the larger calibration (the toy's interval closed by running out).
    assert cost.matched_images(64, 64, 400, 8) == 400 and cost.matched_images(16, 16, 80, 8) == 80
    # A larger calibration needs more images for the same interval, the more the nearer the toy's end it stopped.
    assert cost.matched_images(8, 64, 400, 8) == 16  # 8.8 images
    assert cost.matched_images(56, 64, 400, 8) == 216  # 210.0 images: 27 batches
    assert cost.matched_images(8, 16, 80, 8) == 16  # 12.8 images


def test_matched_fractions_count_the_paper_images_beyond_the_first():
    cost = _script("analysis_cost")
    entries = {(0, "block"): 64, (1, "block"): 24, (0, "attn"): 8, (0, "ff"): 16}
    report = SimpleNamespace(run={"adaptive": {"min_images": 8}}, entries=entries, images_of=entries.__getitem__,
                             entry_images=lambda key: 64 if key[1] == "block" else 16)
    need = {"block": [400, cost.matched_images(24, 64, 400, 8)], "component": [16, 80]}
    fractions = cost.matched_fractions(report, 8)
    assert fractions["block"] == pytest.approx(sum(n - 8 for n in need["block"]) / (2 * 392))
    assert fractions["component"] == pytest.approx((8 + 72) / (2 * 72))


def test_earlier_cost_adds_each_interrupted_run_once(tmp_path):
    cost = _script("analysis_cost")
    out = tmp_path / "toy-full.json"
    assert cost.earlier_cost(out)["runs"] == 0 and not (tmp_path / "toy-full.json.cost.json").exists()
    part = tmp_path / "toy-full.json.parts" / "rank-0.json"
    part.parent.mkdir()
    part.write_text(json.dumps({"run": {"block_evaluations": 100, "seconds": 2.5}}))
    first = cost.earlier_cost(out)
    assert (first["block_evaluations"], first["seconds"], first["runs"]) == (100, 2.5, 1)
    assert cost.earlier_cost(out)["runs"] == 1  # the same part: that run was added already
    part.write_text(json.dumps({"run": {"block_evaluations": 40, "seconds": 1.0}}))  # a second interrupted run
    second = cost.earlier_cost(out)
    assert (second["block_evaluations"], second["seconds"], second["runs"]) == (140, 3.5, 2)


@pytest.mark.parametrize("name", ["sd3.5-large-turbo", "flux.1-schnell"])
def test_latency_scaled_config_keeps_every_block_at_width_256(name):
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.architecture.inventory import build_on_meta, load_transformer_config

    latency = _script("latency")
    full = load_transformer_config(name)
    scaled = latency.scaled_config(name, full_size=False)
    family = get_family(scaled)
    assert family.num_blocks(scaled) == family.num_blocks(full)
    model = build_on_meta(scaled)
    assert model.config.num_attention_heads * model.config.attention_head_dim == 256
    if family.name == "flux":
        assert sum(scaled["axes_dims_rope"]) == scaled["attention_head_dim"]
    assert latency.scaled_config(name, full_size=True) == dict(full)


def test_ablation_table_refuses_a_row_that_was_not_measured():
    ablation = _script("toy_ablation")
    measured = {"score": {"overall": 0.5, **{c: 0.5 for c in ablation.toy.CATEGORIES}}, "psnr": None, "ssim": None,
                "params": 10, "bytes": 40}
    trained = dict(measured, psnr=20.0, ssim=0.8)
    ok = {"results": {(None, "Original"): [measured], (0.3, "HPP + PWP"): [trained, trained]}, "plans": {}}
    lines, _ = ablation.table("sd3", ok)
    assert lines[1][2] == "HPP + PWP" and lines[1][7] == "0.500 ± 0.000"
    assert lines[1][4] == "0.0%" and lines[1][-1] == "100.0%"  # removed fraction, share of the teacher's ShapeEval
    missing = {"results": {(None, "Original"): [measured], (0.3, "HPP + PWP"): [trained, None]}, "plans": {}}
    with pytest.raises(SystemExit, match="not measured"):
        ablation.table("sd3", missing)


def test_ablation_goal_compares_the_nf4_row_with_the_best_baseline():
    ablation = _script("toy_ablation")

    def runs(*scores):
        return [{"score": {"overall": v}} for v in scores]

    results = {(None, "Original"): runs(0.5), (0.3, ablation.NF4): runs(0.49, 0.48),  # 3 % degradation
               (0.3, "BK-SDM + KD"): runs(0.40), (0.3, "KOALA + KD"): runs(0.45, 0.44),
               (0.3, "last blocks + KD"): runs(0.3)}
    (line,) = ablation.goal(results)
    assert "keeps 97.0%" in line and "(goal >= 95 %: met)" in line
    assert "KOALA + KD, +11.0%" in line and "at most a third (goal: met)" in line
    results[(0.3, "KOALA + KD")] = runs(0.47)  # best baseline 6 %: 3 % is more than a third of it
    (line,) = ablation.goal(results)
    assert "more than a third (goal: not met)" in line
    results[(0.3, ablation.NF4)] = runs(0.47)
    assert "(goal >= 95 %: not met)" in ablation.goal(results)[0]


def test_ablation_rows_are_keyed_by_the_sgdistill_floor_they_ran_with(monkeypatch):
    """A change of the default floor measures the SGDistill rows again; rows without SGDistill keep their keys."""
    ablation = _script("toy_ablation")
    full = ablation._row(ablation.FULL)[1]
    assert ablation.resolved(full) == dict(full, sensitivity_floor=ablation.DistillConfig.sensitivity_floor)
    assert ablation.resolved(ablation.KD) == ablation.KD
    assert ablation.resolved({"sensitivity_floor": 0.3}) == {"sensitivity_floor": 0.3}
    monkeypatch.setattr(ablation.DistillConfig, "sensitivity_floor", 0.7)
    assert ablation.resolved(full)["sensitivity_floor"] == 0.7


def test_ablation_rows_are_keyed_by_the_thread_count(monkeypatch):
    """A row cached by a run with another torch thread count is measured again, not reported under this run's count."""
    ablation = _script("toy_ablation")
    settings = {"row": "original", "n_eval": 200}
    monkeypatch.setattr(ablation.torch, "get_num_threads", lambda: 1)
    one = ablation.row_key(settings)
    assert ablation.row_key(dict(settings)) == one
    monkeypatch.setattr(ablation.torch, "get_num_threads", lambda: 2)
    two = ablation.row_key(settings)
    assert two != one
    assert json.loads(one)["threads"] == 1 and json.loads(two)["threads"] == 2


def test_ablation_rows_of_two_runs_on_one_toy_are_both_kept(tmp_path):
    """Two runs on the same toy (one ratio each) each add their rows to the file, not their copy of it."""
    ablation = _script("toy_ablation")
    path = tmp_path / "rows.json"
    first, second = ablation.Rows(path), ablation.Rows(path)
    first.put("a", {"score": 1})
    second.put("b", {"score": 2})
    first.put("c", {"score": 3})
    assert json.loads(path.read_text()) == {"a": {"score": 1}, "b": {"score": 2}, "c": {"score": 3}}
    assert ablation.Rows(path).get("b") == {"score": 2}


def test_ablation_trains_every_row_of_a_seed_before_the_next_seed(monkeypatch, tmp_path):
    """A run cut off (rows are kept as they finish) leaves whole seeds; the table still lists each row's seeds."""
    ablation = _script("toy_ablation")
    calls = []

    class FakeFamily:
        def __init__(self, family, args, out):
            self.rows = SimpleNamespace(get=lambda key: {"measured": key})

        def original(self):
            return {"row": "original"}

        def plan(self, ratio, strategy):
            plan = SimpleNamespace(removed_blocks=[strategy], removed_components={}, describe=lambda: strategy,
                                   to_dict=lambda: {"strategy": strategy}, metadata={"target_ratio": ratio})
            return SimpleNamespace(plan=plan, ratio=ratio), tmp_path / f"{strategy}.json"

        def trained(self, label, plan, plan_path, options, seed, steps, nf4=False):
            calls.append((seed, label, options, nf4))
            return {"label": label, "seed": seed}, ({"nf4": seed} if nf4 else None)

    monkeypatch.setattr(ablation, "Family", FakeFamily)
    args = SimpleNamespace(ratios=[0.3], seeds=[0, 1], steps=5, n_eval=2)
    results = ablation.run_family("sd3", args, tmp_path)["results"]
    labels = [label for label, _, _ in ablation.TRAINED]
    assert [(seed, label) for seed, label, _, _ in calls] == [(seed, label) for seed in (0, 1) for label in labels]
    assert [nf4 for *_, nf4 in calls] == [label == ablation.FULL for _ in (0, 1) for label in labels]
    for label in labels:
        assert results[(0.3, label)] == [{"label": label, "seed": 0}, {"label": label, "seed": 1}]
    assert results[(0.3, ablation.NF4)] == [{"nf4": 0}, {"nf4": 1}]
    full = [options for _, label, options, _ in calls if label == ablation.FULL]
    assert full == [{}, {}]  # at 30 % (>= r_thres) the full method trains with SGDistill


def test_ablation_below_r_thres_reuses_the_hpp_pwp_run_for_the_full_method():
    """Below r_thres SGDistill is off, so "+ SGDistill" is HPP + PWP's run (same options, hence same cached row and
    student), not a second identical training; from r_thres on it runs with SGDistill."""
    ablation = _script("toy_ablation")
    below = SimpleNamespace(metadata={"target_ratio": 0.2})
    at = SimpleNamespace(metadata={"target_ratio": ablation.DistillConfig.r_thres})
    pwp = dict((label, o) for label, _, o in ablation.TRAINED)["HPP + PWP"]
    assert ablation.run_options(ablation.FULL, below, 0.2) == pwp == {"sgdistill": False}
    assert ablation.run_options(ablation.FULL, at, 0.2) == {}
    assert ablation.run_options("HPP + PWP", at, 0.3) == pwp
    # a plan without a target ratio is judged by the ratio it achieves
    assert ablation.run_options(ablation.FULL, SimpleNamespace(metadata={}), 0.3) == {}
    assert ablation.run_options(ablation.FULL, SimpleNamespace(metadata=None), 0.1) == pwp


def test_ablation_sections_keep_what_another_run_wrote():
    """A table at 20 % goes to its own section and plot (the 30 % one stays); the curve's verdict per doubling."""
    ablation = _script("toy_ablation")
    assert ablation.section_name([0.3]) == "toy-ablation-30"
    assert ablation.section_name([0.3, 0.2]) == ablation.section_name([0.2, 0.3]) == "toy-ablation-20-30"
    assert ablation.section_name([0.3], ["sd3-deep", "flux-deep"]) == "toy-ablation-deep-30"  # beside the 12-block one
    with pytest.raises(SystemExit, match="run the 12-block toys .* and the deep toys .* separately"):
        ablation.section_name([0.3], ["sd3", "flux-deep"])
    assert ablation.issue_of(["flux-deep"]) == "issue 36" and ablation.issue_of(["sd3"]) == "issue 17"  # titles
    notes = ablation.convergence("flux", [(200, 0.40, 0.02), (400, 0.45, 0.01), (800, 0.46, 0.03), (1000, 0.9, 0.0)])
    assert notes == [
        "- flux: 200 -> 400 steps changes the mean ShapeEval by +0.050 (seed spread 0.020): beyond it",
        "- flux: 400 -> 800 steps changes the mean ShapeEval by +0.010 (seed spread 0.030): within it",
    ]  # 800 -> 1000 is not a doubling


def test_bad_inputs_classifies_each_ending(tmp_path, monkeypatch):
    """bad_inputs.py's verdicts: a message is a clear error; a traceback, an accepted bad input, a lost file are not."""
    import diffusers_hprune.cli as cli

    bad = _script("bad_inputs")
    ws, folder = tmp_path / "ws", tmp_path / "case"
    ws.mkdir()
    folder.mkdir()
    (ws / "keep.txt").write_text("the user's\n")

    def outcome(behaviour, expect="error", phrase=None, check=None):
        monkeypatch.setattr(cli, "main", behaviour)
        case = bad.Case("x", "y", lambda f: [], expect=expect, phrase=phrase, check=check)
        return bad.run_case(case, ws, folder)[0]

    def refuse(argv):
        print("hprune x: error: bad value; give a good one", file=sys.stderr)
        return 2

    def crash(argv):
        raise KeyError("boom")

    def delete(argv):
        (ws / "keep.txt").unlink()
        return 2

    assert outcome(refuse) == "clear error"
    assert outcome(refuse, phrase="not in the message") == "wrong"
    assert outcome(crash) == "traceback"
    assert outcome(lambda argv: 0) == "wrong"
    assert outcome(lambda argv: 0, expect="ok", check=lambda f: True) == "handled"
    assert outcome(lambda argv: 0, expect="ok", check=lambda f: False) == "wrong"
    assert outcome(refuse, expect="ok") == "wrong"
    assert outcome(delete) == "files lost"

    def leave_scratch(argv):
        (folder / ".out.host-1.ab_12.tmp").mkdir()
        print("hprune x: error: no space left on the device holding out", file=sys.stderr)
        return 2

    assert outcome(leave_scratch) == "leftovers"  # a clear error, but its scratch stayed

    from diffusers_hprune.utils.errors import HPruneError

    def called(call, expect="error", phrase=None):  # a library call, as a Diffusers user makes it
        return bad.run_case(bad.Case("library", "y", None, expect=expect, phrase=phrase, call=call), ws, folder)[0]

    def refuses(f):
        raise HPruneError("this LoRA needs `hprune convert-lora`")

    def breaks(f):
        raise RuntimeError("size mismatch")

    assert called(refuses, phrase="hprune convert-lora") == "clear error"
    assert called(refuses, phrase="something else") == "wrong"
    assert called(breaks) == "traceback"  # not one of the package's errors: what a user sees as a traceback
    assert called(lambda f: True) == "wrong"  # a bad input accepted
    assert called(lambda f: True, expect="ok") == "handled"
    assert called(lambda f: False, expect="ok") == "wrong"
    assert called(refuses, expect="ok") == "wrong"
    names = [(c.command, c.what) for c in bad.cases()]
    assert len(names) == len(set(names)) >= 100  # every case is told apart in the table


@pytest.mark.slow
def test_the_gpu_check_runs_what_a_cpu_can_and_says_why_it_skips_the_rest(tmp_path):
    """benchmarks/gpu_check.py is the one command for the GPU-only paths; run here with --device cpu its toy checks
    pass through the CPU paths (bf16 validation, the NF4 teacher with sliced FLUX blocks, the QLoRA student, LoRA + 8-bit AdamW +
    checkpointing, NF4 save and load, torchao's int8 kinds) and every CUDA-only check is skipped with its reason, nothing failing."""
    import os
    import subprocess

    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--no-write",
                           "--work", str(tmp_path / "work"), "--json", str(result)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads(result.read_text())["checks"]
    gpu_check = _script("gpu_check")
    assert list(checks) == list(gpu_check.CHECKS)
    ran = {"validation-bf16", "teacher-4bit-flux-slices", "qlora-flux-slices", "lora-8bit-checkpointing",
           "nf4-stock-diffusers", "torchao-kinds", "analysis-bf16"}  # torchao is in the dev extra
    assert {name for name, c in checks.items() if c["outcome"] == "PASS"} == ran
    assert all(c["outcome"] == "SKIP" and c["detail"] for name, c in checks.items() if name not in ran)
    assert "| validation-bf16 | PASS |" in proc.stdout


def test_the_gpu_check_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _script("gpu_check").main(["--no-write"]) == 2
    assert "no CUDA device is visible here" in capsys.readouterr().err


def test_latency_formats_time_every_format_against_the_same_bound():
    """benchmarks/latency.py's format table (issue 35): every format the project writes of one pruned model, the
    bound from the architecture's FLOPs, the goal judged on the fastest pruned format only."""
    import torch
    from helpers import tiny_pipeline

    from diffusers_hprune import PrunePlan, prune_transformer
    from diffusers_hprune.evaluation.measure import step_flops, step_inputs

    latency = _script("latency")
    pipe = tiny_pipeline("sd3")
    plan = PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4)
    inputs = step_inputs(pipe, height=32, width=32)
    rows = latency.format_case("toy", pipe.transformer, inputs, plan, 1, torch.device("cpu"))
    names = [r[1] for r in rows]
    expected = ["original, fp32", "original, bf16", "pruned, fp32", "pruned, bf16", "pruned, NF4"]
    if importlib.util.find_spec("torchao") is not None:
        expected += ["pruned, int8 weight-only", "pruned, int8 dynamic"]
    assert names == expected
    bound = 1 - step_flops(prune_transformer(pipe.transformer, plan), inputs) / step_flops(pipe.transformer, inputs)
    assert {r[7] for r in rows if r[1].startswith("pruned")} == {f"{bound:.1%}"}
    goals = [r[9] for r in rows]
    assert goals.count("") == len(rows) - 1 and set(goals) - {""} <= {f"{a} / {b}" for a in ("yes", "no") for b in ("yes", "no")}
    size = {r[1]: float(r[2]) for r in rows}
    assert size["pruned, NF4"] < size["pruned, fp32"] < size["original, fp32"] and size["pruned, bf16"] <= size["pruned, fp32"]


def test_metric_correlation_reads_the_position_hierarchy_and_keeps_the_deep_toys_apart():
    study = _script("metric_correlation")
    blocks = [{"block": i, "psnr": 10.0 + i, "shapeeval": 0.3 + 0.05 * i} for i in range(5)]  # later: less damage
    assert study.position_rho({"full_shapeeval": 0.6, "blocks": blocks}) == pytest.approx((-1.0, -1.0))
    blocks[0], blocks[4] = dict(blocks[4], block=0), dict(blocks[0], block=4)  # the last block matters most
    rho_psnr, _ = study.position_rho({"full_shapeeval": 0.6, "blocks": blocks})
    assert -1.0 < rho_psnr < 1.0
    assert study.section(["sd3", "flux"])[0] == "metric-correlation"
    assert study.section(["sd3-deep", "flux-deep"])[0] == "metric-correlation-deep"
    with pytest.raises(SystemExit, match="separately"):
        study.section(["sd3", "sd3-deep"])


def test_metric_correlation_sweep_resumes_from_the_blocks_it_kept(tmp_path, monkeypatch):
    study = _script("metric_correlation")
    drawn = []  # what was drawn: the full model, then each ablated model (its skipped block)
    full = SimpleNamespace(transformer=SimpleNamespace(config={}))
    fam = SimpleNamespace(name="sd3", num_blocks=lambda config: 4)
    monkeypatch.setattr(study.toy, "load_pipeline", lambda family: full)
    monkeypatch.setattr(study, "get_family", lambda transformer: fam)
    monkeypatch.setattr(study, "prune_pipeline", lambda pipe, plan: plan.removed_blocks[0])
    monkeypatch.setattr(study.toy, "prompts", lambda split, n, seed: ["a red circle"] * n)
    monkeypatch.setattr(study.toy, "generate", lambda pipe, prompts, seed: drawn.append(pipe) or pipe)
    monkeypatch.setattr(study.toy, "shapeeval", lambda images, prompts: {"overall": 0.5})
    monkeypatch.setattr(study, "psnr", lambda images, full: 20.0 + images)
    kept = [{"block": 0, "shapeeval": 0.25, "psnr": 11.0}, {"block": 1, "shapeeval": 0.25, "psnr": 12.0}]
    (tmp_path / "sweep-partial-3.json").write_text(json.dumps({"blocks": kept, "seconds": 100.0}))
    data = study.sweep("sd3", 3, tmp_path)
    assert drawn == [full, 2, 3]  # the kept blocks are not drawn again
    assert data["blocks"] == kept + [{"block": i, "shapeeval": 0.5, "psnr": 20.0 + i} for i in (2, 3)]
    assert data["seconds"] >= 100.0 and data["n"] == 3
    assert not (tmp_path / "sweep-partial-3.json").exists()
    assert json.loads((tmp_path / "sweep.json").read_text()) == data
    drawn.clear()
    assert study.sweep("sd3", 3, tmp_path) == data and drawn == []  # the whole sweep is cached


TINY_ANALYSIS = dict(n_prompts=6, batch_size=2, component_images=4, progress=False, num_inference_steps=2, height=16,
                     width=16)


@pytest.fixture(scope="module")
def tiny_evidence():
    """The tiny SD3's adaptive analysis at every image (the evidence the replays read) and its pipeline and rule."""
    from diffusers_hprune.analysis import analyze
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.planning.decisions import PlanDecisions
    from diffusers_hprune.toy.components import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    rule = PlanDecisions(inspect_transformer(pipe.transformer), (0.2, 0.3, 0.4))
    return analyze(pipe, stopping=rule, min_images=6, **TINY_ANALYSIS), pipe, rule


def test_a_replay_on_recorded_values_stops_every_entry_where_the_measured_run_did(tiny_evidence):
    """adaptive_replay.py's premise: the rule run again on the evidence (every image's dP) is the adaptive analysis."""
    from diffusers_hprune.analysis import analyze

    replay = _script("adaptive_replay")
    evidence, pipe, rule = tiny_evidence
    assert all(len(e["values"]) == evidence.entry_images(k) for k, e in evidence.entries.items())
    measured = analyze(pipe, stopping=rule, min_images=2, **TINY_ANALYSIS)
    stops = {measured.images_of(k) for k in measured.entries}
    assert len(stops) > 1  # some entries stopped early, others went on: the replay has decisions to get right
    got = replay.replay(evidence, min_images=2, confidence=0.95)
    assert replay.same_stops(got, measured)
    assert got.run["adaptive"]["images_used"] == measured.run["adaptive"]["images_used"]
    assert not replay.same_stops(replay.replay(evidence, min_images=4, confidence=0.95), measured)
    assert replay.toy_evaluations(got) < replay.toy_evaluations(evidence)


def test_the_noise_yardsticks_keep_each_image_its_value_and_the_oracle_stops_where_it_must(tiny_evidence):
    """adaptive_noise.py: another batch order and a bootstrap calibration move images, never their values; the
    oracle stops every entry at the first batch from which its running dP keeps the plans."""
    import statistics

    noise = _script("adaptive_noise")
    evidence, _, rule = tiny_evidence
    first = evidence.component_images
    component = next(k for k in evidence.entries if k[1] != "block")
    assert sorted(noise.image_ids(evidence, component)) == list(range(first))  # components: their first images
    assert sorted(noise.image_ids(evidence, (0, "block"))) == list(range(evidence.calibration_images)) != list(
        range(first))
    by_image = {k: noise.values_by_image(evidence, k) for k in evidence.entries}
    assert noise.reordered(evidence, int(evidence.calibration["seeds"][0])).entries == evidence.entries
    seed = next(s for s in range(1, 100) if noise.image_ids(evidence, (0, "block"), s) !=
                noise.image_ids(evidence, (0, "block")))
    moved = noise.reordered(evidence, seed)
    assert all(dict(zip(noise.image_ids(evidence, k, seed), e["values"], strict=True)) == by_image[k]
               for k, e in moved.entries.items())

    again, other = noise.resample(evidence, 0), noise.resampled(evidence, 0)
    drawn = again.run["resample"]["images"]
    assert again.entries == noise.resample(evidence, 0).entries and again.complete
    for key, entry in other.entries.items():  # the other calibration's image j is the evidence's image drawn[j]
        assert entry["values"] == [by_image[key][drawn[j]] for j in noise.image_ids(evidence, key)]
        assert entry["delta"] == again.entries[key]["delta"]
    assert len(drawn) == evidence.calibration_images and len(set(drawn)) < len(drawn)  # with replacement
    assert all(i < first for i in drawn[:first]) and all(i >= first for i in drawn[first:])
    for key, entry in again.entries.items():
        use = drawn if key[1] == "block" else drawn[:first]
        assert entry["delta"] == pytest.approx(statistics.fmean(by_image[key][i] for i in use), rel=1e-12)

    best, truth, size = noise.oracle(evidence, rule.ratios), evidence.contributions(), TINY_ANALYSIS["batch_size"]
    base = rule.plans(truth)
    mean = lambda key, n: statistics.fmean(evidence.entries[key]["values"][:n])  # noqa: E731
    assert {best.images_of(k) for k in best.entries} > {size}  # some stop at the first batch, some go on
    for key in best.entries:
        stop = best.images_of(key)
        assert all(rule.plans({**truth, key: mean(key, n)}) == base
                   for n in range(stop, evidence.entry_images(key) + 1, size))
        assert stop == size or rule.plans({**truth, key: mean(key, stop - size)}) != base
    assert noise.costs(evidence, best)[0] > 1


def test_adaptive_distill_writes_each_resampled_analysis_once_and_judges_each_plan_against_the_full_one(
        tiny_evidence, tmp_path):
    """adaptive_distill.py --resamples: the full analyses of bootstrap calibrations, made from the evidence beside
    the analyses (refused without it), kept once written; every student judged against the full plan's."""
    from diffusers_hprune.contributions import ContributionReport

    distill, noise = _script("adaptive_distill"), _script("adaptive_noise")
    evidence = tiny_evidence[0]
    args = SimpleNamespace(analyses=str(tmp_path), n_prompts=6, batch_size=2, component_images=4, resamples=2)
    for kind in ("full", "adaptive"):
        evidence.save(tmp_path / f"sd3-6x2-c4-{kind}.json")
    with pytest.raises(SystemExit, match="adaptive_replay.py"):
        distill.analyses("sd3", args)
    evidence.save(tmp_path / "sd3-6x2-c4-evidence.json")
    paths = distill.analyses("sd3", args)
    assert list(paths) == ["full", "adaptive", "resample-0", "resample-1"]
    assert ContributionReport.load(paths["resample-1"]).contributions() == noise.resample(evidence, 1).contributions()
    written = paths["resample-0"].stat().st_mtime_ns
    assert distill.analyses("sd3", args) == paths and paths["resample-0"].stat().st_mtime_ns == written
    spreads = {"full": 0.02, "adaptive": 0.01, "resample-0": 0.03}
    assert "within" in distill.verdict("adaptive", {"full": 0.6, "adaptive": 0.585}, spreads)
    assert "beyond" in distill.verdict("adaptive", {"full": 0.6, "adaptive": 0.575}, spreads)
    assert "within" in distill.verdict("resample-0", {"full": 0.6, "resample-0": 0.575}, spreads)  # its own spread
