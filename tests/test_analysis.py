"""Contribution analysis: every entry, exact cached evaluation, image metrics, resume, sharding, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import failure_output, free_port, hprune_cli, record_keyword, run_process_group

from diffusers_hprune import BLOCK
from diffusers_hprune.analysis import analyze
from diffusers_hprune.analysis.ablation import entry_plan, naive_outputs, normalised_error, record_transformer_calls
from diffusers_hprune.contributions import AnalysisError, ContributionReport, component_keys, components_fingerprint
from diffusers_hprune.loading import sliced_decoding
from diffusers_hprune.metrics import MetricError, get_metric, register_metric

# The machinery (cache, resume, shards) on the fast velocity metric; image metrics: tests/test_image_fidelity.py.
# 16 px: the tiny VAE does not downsample, so 256 image tokens (32 px: 1024, and a several times slower analysis).
SMALL = dict(metric="velocity", n_prompts=2, eval_steps=2, num_inference_steps=3, height=16, width=16, progress=False)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_entry_and_cached_equals_naive(family, request):
    pipe = request.getfixturevalue(f"{family}_pipeline")
    cached = analyze(pipe, **SMALL)
    naive = analyze(pipe, method="naive", **SMALL)
    fam = cached.model_family
    keys = component_keys(fam, cached.transformer_config)
    assert list(cached.entries) == keys == list(naive.entries)
    assert {c for _, c in keys} == {BLOCK} | set(fam.component_names)
    # Bit-identical: the blocks before the ablated one see the same inputs either way.
    assert cached.entries == naive.entries
    # Removing nothing: the model agrees with itself, whether rebuilt from the cache alone or run whole.
    assert cached.baseline_score == 0.0 and naive.baseline_score == 0.0
    assert all(v["delta"] > 0 for v in cached.entries.values())  # every removal changes the prediction
    if family == "sd3":
        scratch = analyze(pipe, method="scratch", **SMALL)
        assert scratch.entries == cached.entries
        assert scratch.run["block_evaluations"] > naive.run["block_evaluations"]
    assert cached.run["block_evaluations"] < naive.run["block_evaluations"]
    assert set(cached.similarity) == set(range(cached.num_blocks))
    assert all(-1 <= s <= 1 for s in cached.similarity.values())
    assert len(cached.timesteps) == 2 and cached.calibration["eval_steps"] == [0, 2]
    assert cached.complete


def test_fidelity_is_the_normalised_error_of_the_pruned_model(sd3_pipeline):
    """One entry recomputed from scratch: record the pipeline's transformer calls, prune, compare."""
    report = analyze(sd3_pipeline, **SMALL)
    pipe, transformer = sd3_pipeline, sd3_pipeline.transformer
    steps = []
    with record_transformer_calls(transformer) as calls:
        generators = [torch.Generator().manual_seed(s) for s in report.calibration["seeds"]]
        pipe(report.calibration["prompts"], generator=generators, callback_on_step_end=lambda p, i, t, k: steps.append(i) or {},
             **report.calibration["generation"])
    selected = [calls[0], calls[2]]  # the recorded calls at denoising steps 0 and 2 (one call per step)
    with torch.no_grad():
        references = [transformer(**c.kwargs, return_dict=False)[0] for c in selected]
    plan = entry_plan(report.model_family, transformer.config, 1, "ff")
    error = normalised_error(naive_outputs(transformer, plan, selected), references)
    assert report.entries[(1, "ff")]["delta"] == pytest.approx(error, rel=1e-9)


def test_pairs(flux_pipeline):
    report = analyze(flux_pipeline, pairs=True, **SMALL)
    assert (0, "ff+ff_context") in report.entries and (2, "attn+mlp") in report.entries
    assert len(report.entries) == len(component_keys(report.model_family, report.transformer_config, pairs=True))
    # attn+mlp of a single block leaves no branch: it is the removed block.
    assert report.entries[(2, "attn+mlp")] == report.entries[(2, BLOCK)]
    assert (0, "ff+ff_context") not in report.contributions()


def test_image_metric_and_registry(sd3_pipeline):
    @register_metric("test_brightness", description="mean pixel value")
    def brightness(images, prompts):
        import numpy as np

        return float(np.mean([np.asarray(im, dtype=np.float64).mean() for im in images]))

    report = analyze(sd3_pipeline, **dict(SMALL, metric="test_brightness"))
    assert report.metric == {"name": "test_brightness", "options": {}}
    # The unpruned score is that of the images the pipeline draws with the recorded seeds.
    gen = report.calibration["generation"]
    with sliced_decoding(sd3_pipeline):  # as the analysis decodes: one image at a time
        images = sd3_pipeline(report.calibration["prompts"],
                              generator=[torch.Generator().manual_seed(s) for s in report.calibration["seeds"]],
                              **gen).images
    assert report.baseline_score == brightness(images, report.calibration["prompts"])
    assert all(v["delta"] == pytest.approx(report.baseline_score - v["score"]) for v in report.entries.values())
    assert any(v["delta"] != 0 for v in report.entries.values())
    assert get_metric("shapeeval").kind == "image"


def test_unknown_and_unavailable_metrics(sd3_pipeline, tmp_path):
    out = tmp_path / "analysis.json"
    out.write_text("keep me")
    with pytest.raises(MetricError, match="Unknown metric 'magic'.*fidelity"):
        analyze(sd3_pipeline, out, **dict(SMALL, metric="magic"))
    assert out.read_text() == "keep me"
    with pytest.raises(MetricError, match="hpsv2"):
        get_metric("hpsv2").build()
    with pytest.raises(MetricError, match="takes no options"):
        get_metric("velocity").build(model="x")


def test_clip_score_with_a_local_model(tmp_path):
    pytest.importorskip("torchmetrics", minversion="1.7")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusers_hprune.toy.components import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    score = get_metric("clip_score").build(model=str(tmp_path / "clip"))
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    value = score(images, ["a red circle", "a blue square"])
    assert isinstance(value, float) and value == value
    with pytest.raises(MetricError, match="Could not load the CLIP model"):
        get_metric("clip_score").build(model=str(tmp_path / "missing"))


# -- files: resume, corrupt files, other models -------------------------------------------------------
def test_resume_reuses_entries_and_refuses_other_settings(sd3_pipeline, tmp_path):
    out = tmp_path / "analysis.json"
    first = analyze(sd3_pipeline, out, **SMALL)
    assert out.is_file() and not (tmp_path / "analysis.json.parts").exists()
    again = analyze(sd3_pipeline, out, **SMALL)
    assert again.run["this_process"]["computed_entries"] == 0
    assert again.entries == first.entries
    before = out.read_text()
    with pytest.raises(AnalysisError, match="other settings.*calibration"):
        analyze(sd3_pipeline, out, **dict(SMALL, n_prompts=3))
    assert out.read_text() == before
    out.write_text("{not json")
    with pytest.raises(AnalysisError, match="not valid JSON.*--overwrite"):
        analyze(sd3_pipeline, out, **SMALL)
    assert out.read_text() == "{not json"
    replaced = analyze(sd3_pipeline, out, overwrite=True, **SMALL)
    assert replaced.entries == first.entries


def test_a_changed_text_encoder_vae_tokenizer_or_scheduler_is_another_analysis(sd3_pipeline, tmp_path):
    """Issue 32: only the transformer was fingerprinted, so after the text encoder changed every entry was reused."""
    import copy

    out = tmp_path / "analysis.json"
    first = analyze(sd3_pipeline, out, **SMALL)
    assert first.components == components_fingerprint(sd3_pipeline)
    assert components_fingerprint(copy.deepcopy(sd3_pipeline)) == first.components  # equal pipelines, equal digests
    changed = copy.deepcopy(sd3_pipeline)
    with torch.no_grad():
        next(changed.text_encoder.parameters()).mul_(1.5)
    with pytest.raises(AnalysisError, match="other settings.*components"):
        analyze(changed, out, **SMALL)
    assert analyze(changed, out, overwrite=True, **SMALL).run["this_process"]["computed_entries"] > 0
    digests = {first.components, components_fingerprint(changed)}
    vae = copy.deepcopy(sd3_pipeline)
    with torch.no_grad():
        next(vae.vae.parameters()).add_(0.1)
    tokenizer = copy.deepcopy(sd3_pipeline)
    tokenizer.tokenizer.model_max_length = 7
    scheduler = copy.deepcopy(sd3_pipeline)
    scheduler.scheduler.register_to_config(shift=2.5)
    digests |= {components_fingerprint(p) for p in (vae, tokenizer, scheduler)}
    assert len(digests) == 5


_cli = hprune_cli


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_killed_run_resumes_without_recomputing(tmp_path):
    """SIGKILL in the middle of a run; the same command then computes only what is missing."""
    out = tmp_path / "analysis.json"
    part = tmp_path / "analysis.json.parts" / "rank-0.json"
    cmd, env = _cli("analyze", "sd3", "--out", str(out), "--n-prompts", "2", "--eval-steps", "2", "--metric", "velocity")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = 0
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.is_file():
            try:
                done = len(json.loads(part.read_text())["entries"])
            except (json.JSONDecodeError, KeyError):
                pass  # never happens with atomic writes, but do not fail the poll on it
            if done >= 10:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = ContributionReport.load(part)  # a whole, valid file: written atomically
    kept = len(stored.entries)
    assert kept >= 10 and not out.exists()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({kept} reused from an earlier run, {71 - kept} computed here)" in result.stdout
    final = ContributionReport.load(out)
    assert final.complete and all(final.entries[k] == v for k, v in stored.entries.items())
    # Same numbers as an uninterrupted run.
    fresh = tmp_path / "fresh.json"
    cmd2, _ = _cli("analyze", "sd3", "--out", str(fresh), "--n-prompts", "2", "--eval-steps", "2", "--metric", "velocity")
    subprocess.run(cmd2, env=env, check=True, capture_output=True, timeout=300)
    assert ContributionReport.load(fresh).entries == final.entries


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_two_processes_give_the_single_process_report(tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): entries split, merged, identical to one process."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["--n-prompts", "2", "--eval-steps", "2", "--metric", "velocity"]
    cmd, env = _cli("analyze", "sd3", "--out", str(one), *args)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "diffusers_hprune", "analyze", "sd3", "--out", str(two), *args]
    result = run_process_group(launch, env=env, timeout=400)
    assert result.returncode == 0, failure_output(result.stderr)
    assert "36 computed here" in result.stdout  # rank 0 did its half of the 71 entries
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["run"]["processes"] == 2 and a["run"]["processes"] == 1
    for key in ("entries", "similarity", "baseline_score", "calibration", "timesteps", "fingerprint"):
        assert a[key] == b[key], key
    assert not (tmp_path / "two.json.parts").exists()


def test_analysis_file_errors(tmp_path, sd3_pipeline):
    with pytest.raises(AnalysisError, match="No analysis at"):
        ContributionReport.load(tmp_path / "nothing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AnalysisError, match="not a diffusers-hprune analysis"):
        ContributionReport.load(bad)
    report = analyze(sd3_pipeline, **SMALL)
    data = report.to_dict()
    del data["entries"][0]["delta"]
    bad.write_text(json.dumps(data))
    with pytest.raises(AnalysisError, match="corrupt"):
        ContributionReport.load(bad)
    from diffusers_hprune.architecture.inventory import load_transformer_config

    with pytest.raises(AnalysisError, match="made for a sd3 model.*FLUX"):
        report.check_model(load_transformer_config("flux.1-schnell"))
    with pytest.raises(AnalysisError, match="another Stable Diffusion 3"):
        report.check_model(load_transformer_config("sd3.5-large"))
    report.check_model(sd3_pipeline.transformer)


def test_pruned_models_are_refused(sd3_pipeline):
    from diffusers_hprune import PrunePlan, prune_pipeline

    pruned = prune_pipeline(sd3_pipeline, PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4))
    with pytest.raises(AnalysisError, match="already pruned"):
        analyze(pruned, **SMALL)


def test_a_block_output_cache_above_its_bound_is_refused_before_it_is_built(sd3_pipeline, tmp_path):
    report = analyze(sd3_pipeline, **SMALL)
    size = report.run["cache_bytes"]
    assert size > 0
    bounded = analyze(sd3_pipeline, max_cache_bytes=size, **SMALL)  # exactly at the bound: allowed
    assert bounded.run["cache_bytes"] == size and bounded.contributions() == report.contributions()
    with pytest.raises(AnalysisError, match=r"block-output cache would hold .* above --max-cache-bytes.*--cache-device"):
        analyze(sd3_pipeline, max_cache_bytes=size - 1, **SMALL)


def test_only_the_evaluated_steps_inputs_are_kept_and_where_the_cache_lives(sd3_pipeline, monkeypatch):
    """The drawing records the transformer's inputs at the evaluated steps only (before: every step's, on the GPU for
    the whole run), copied to the cache's device; the entries are what they were."""
    from diffusers_hprune.analysis import measurement

    kept = []
    original = measurement.record_transformer_calls

    def spying(*args, **kwargs):
        context = original(*args, **kwargs)

        class Spy:
            def __enter__(self):
                kept.append((context.__enter__(), kwargs.get("device")))
                return kept[-1][0]

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Spy()

    monkeypatch.setattr(measurement, "record_transformer_calls", spying)
    on_cpu = analyze(sd3_pipeline, cache_device="cpu", **SMALL)
    calls, device = kept[-1]
    steps, batches = SMALL["num_inference_steps"], 1  # 2 prompts in one batch
    assert len(calls) == len(on_cpu.calibration["eval_steps"]) * batches < steps * batches
    assert device == "cpu" and all(t.device.type == "cpu" for c in calls for t in c.kwargs.values() if torch.is_tensor(t))
    assert analyze(sd3_pipeline, **SMALL).entries == on_cpu.entries


def test_a_sharded_analysis_waits_longer_than_a_shard(monkeypatch):
    """Ranks wait at barriers for the slowest shard: the process group's timeout is sized to one (NCCL's 10 minutes
    would end a FLUX.1 analysis); analyze passes it to the process group."""
    from datetime import timedelta

    from diffusers_hprune.analysis import runner

    monkeypatch.setenv("WORLD_SIZE", "8")
    flux = runner.shard_timeout("flux.1-schnell", 8, 4)
    # 57 blocks x 8 entries / 8 processes x 8 prompts x 4 steps x 2 s, twice, plus 10 minutes
    assert flux == timedelta(seconds=2 * (57 * 8 // 8) * 8 * 4 * runner.DRAW_SECONDS_PER_STEP + 600)
    assert runner.shard_timeout("sd3.5-large-turbo", 8, 4) < flux
    given = []
    monkeypatch.setattr(runner, "process_state", lambda timeout=None: given.append(timeout) or (_ for _ in ()).throw(
        RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        analyze("sd3", n_prompts=2)
    assert given == [runner.shard_timeout("sd3", 2, None)] and given[0] >= timedelta(minutes=30)


def test_recorded_inputs_kept_elsewhere_return_to_the_model_at_any_depth():
    """Inputs recorded onto the cache's device come back to the model's for every tensor, nested ones included (a
    tensor inside joint_attention_kwargs, as IP-adapters pass them)."""
    from diffusers_hprune.analysis.ablation import RecordedCall, transformer_output

    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1, device="meta"))

        def forward(self, hidden_states, joint_attention_kwargs, return_dict=False):
            seen.append((hidden_states.device.type, joint_attention_kwargs["scale"].device.type))
            return (hidden_states,)

    call = RecordedCall(kwargs={"hidden_states": torch.ones(2), "joint_attention_kwargs": {"scale": torch.ones(1)}})
    transformer_output(Model(), call)
    assert seen == [("meta", "meta")]


def test_a_pipeline_on_the_host_computes_on_the_process_device_after_encoding(sd3_pipeline, monkeypatch):
    """`hprune compress` hands the analysis its teacher loaded on the host: like a model loaded by name, its prompts
    are encoded on the process's device first and its transformer and VAE move there afterwards (a pipeline already
    on an accelerator would stay where it is)."""
    from diffusers_hprune.analysis import runner

    devices = []
    real = runner.encoded_pipeline

    def spy(pipe, report, batch_size, device=None):
        devices.append(device)
        return real(pipe, report, batch_size, device)

    monkeypatch.setattr(runner, "encoded_pipeline", spy)
    analyze(sd3_pipeline, None, metric="velocity", n_prompts=1, eval_steps=1, num_inference_steps=2, progress=False)
    assert devices == [torch.device("cpu")]  # this process's device (no GPU here), not None (stay where it is)


def test_vae_tiling_is_part_of_the_calibration(sd3_pipeline, tmp_path, monkeypatch):
    """--vae-tiling: every drawing of the analysis decodes in tiles, and the report's calibration says so, so an
    analysis without it is another one (its images differ a little); without it the calibration is as before."""
    from diffusers_hprune.analysis import measurement

    tiled = record_keyword(monkeypatch, measurement, "generate", "tiled")
    settings = dict(metric="velocity", n_prompts=1, eval_steps=1, num_inference_steps=2, progress=False)
    report = analyze(sd3_pipeline, tmp_path / "a.json", vae_tiling=True, **settings)
    assert report.calibration["vae_tile"] == 512 and tiled and set(tiled) == {True}
    plain = analyze(sd3_pipeline, None, **settings)
    assert "vae_tile" not in plain.calibration and report.settings() != plain.settings()
    with pytest.raises(AnalysisError, match="--overwrite"):
        analyze(sd3_pipeline, tmp_path / "a.json", **settings)
