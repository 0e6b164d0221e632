"""Image-level contribution metrics: image_fidelity by hand, the cached first step, alignment dP, the renamed metric."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from diffusers_hprune import BLOCK, PrunePlan, prune_pipeline
from diffusers_hprune.analysis import analyze
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.contributions import ContributionReport
from diffusers_hprune.loading import sliced_decoding
from diffusers_hprune.metrics import DEFAULT_METRIC, get_metric, register_metric
from diffusers_hprune.planning import make_plan

# 16 px: the tiny VAE does not downsample, so 256 image tokens (32 px: 1024, a 3.8 x slower analysis).
GEN = dict(num_inference_steps=2, height=16, width=16)


def _two_block_pipeline():
    """A tiny SD3 pipeline with two blocks, the first one doing nothing: its residual branches add exact zeros."""
    from diffusers_hprune.toy.components import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0, num_layers=2, dual_attention_layers=())
    pipe.set_progress_bar_config(disable=True)
    block = pipe.transformer.transformer_blocks[0]
    with torch.no_grad():
        for layer in (block.attn.to_out[0], block.attn.to_add_out, block.ff.net[2], block.ff_context.net[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    return pipe


def _draw(pipe, prompts, seeds):
    """The final images as the analysis draws them: the VAE decodes one image at a time (a batched decode may round
    differently on some CPUs' kernels)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with sliced_decoding(pipe):
        return pipe(prompts, generator=generators, **GEN).images


def _mse(images, references):
    a = [np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in images]
    b = [np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in references]
    return float(np.mean([np.mean((x - y) ** 2) for x, y in zip(a, b)]))


def test_image_fidelity_dp_by_hand_on_a_two_block_transformer():
    pipe = _two_block_pipeline()
    report = analyze(pipe, metric="image_fidelity", n_prompts=2, progress=False, **GEN)
    prompts, seeds = report.calibration["prompts"], report.calibration["seeds"]
    full = _draw(pipe, prompts, seeds)
    plan = PrunePlan(removed_blocks=[1], family="sd3", num_blocks=2)
    without_1 = _draw(prune_pipeline(pipe, plan), prompts, seeds)
    # Block 0 adds nothing: without it the final images are the same pixels, dP = 0 exactly.
    assert report.entries[(0, BLOCK)]["delta"] == 0.0
    # Block 1 does: dP is the mean squared pixel difference (pixels in [0, 1]) of the final images.
    by_hand = _mse(without_1, full)
    assert by_hand > 0
    assert report.entries[(1, BLOCK)]["delta"] == pytest.approx(by_hand, rel=1e-12)
    assert report.baseline_score == 0.0 and report.entries[(1, BLOCK)]["score"] == pytest.approx(-by_hand)
    # The velocity metric sees block 0's removal as harmless too, but scores in another unit.
    velocity = analyze(pipe, metric="velocity", n_prompts=2, eval_steps=2, progress=False, **GEN)
    assert velocity.entries[(0, BLOCK)]["delta"] == 0.0 and velocity.entries[(1, BLOCK)]["delta"] > 0


@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_the_cache_serves_the_first_step_bit_for_bit(family, request):
    pipe = request.getfixturevalue(f"{family}_pipeline")
    cached = analyze(pipe, metric="image_fidelity", n_prompts=1, eval_steps=2, progress=False, **GEN)
    naive = analyze(pipe, metric="image_fidelity", n_prompts=1, eval_steps=2, method="naive", progress=False, **GEN)
    assert cached.entries == naive.entries  # the served first step is exactly what the ablated model computes
    assert any(v["delta"] > 0 for v in cached.entries.values())
    # Fewer block evaluations: the blocks before the ablated one are replayed at the first step.
    assert cached.run["block_evaluations"] < naive.run["block_evaluations"]


def test_ssim_measure_and_bad_options(sd3_pipeline):
    pytest.importorskip("torchmetrics", minversion="1.7")
    score = get_metric("image_fidelity").build(measure="ssim")
    images = _draw(sd3_pipeline, ["a red circle"], [0])
    assert score(images, images) == pytest.approx(1.0)
    from diffusers_hprune.metrics import MetricError

    with pytest.raises(MetricError, match="measures 'mse' or 'ssim', not 'psnr'"):
        get_metric("image_fidelity").build(measure="psnr")
    with pytest.raises(MetricError, match="as many images as references"):
        get_metric("image_fidelity").build()(images, images + images)


@pytest.mark.parametrize("installed", [None, "1.4.0"])
def test_metrics_that_need_torchmetrics_name_the_version_they_need(installed, monkeypatch):
    import importlib.metadata

    from diffusers_hprune.metrics import TORCHMETRICS, MetricError

    real = importlib.metadata.version

    def version(name):
        if name != "torchmetrics":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    has = f"torchmetrics {installed} is installed" if installed else "torchmetrics is not installed"
    with pytest.raises(MetricError, match=rf"needs torchmetrics>={TORCHMETRICS} \({has}\).*diffusers-hprune\[metrics\]"):
        get_metric("clip_score").build()
    with pytest.raises(MetricError, match=r"measure=ssim needs torchmetrics.*or use measure=mse"):
        get_metric("image_fidelity").build(measure="ssim")


def test_alignment_dp_is_measured_on_the_ablated_images(sd3_pipeline, tmp_path):
    @register_metric("test_alignment_red", alignment=True, description="share of red in the images")
    def redness(images, prompts):
        return float(np.mean([np.asarray(im.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255 for im in images]))

    out = tmp_path / "analysis.json"
    report = analyze(sd3_pipeline, out, metric="velocity", alignment_metric="test_alignment_red", n_prompts=2,
                     eval_steps=2, progress=False, **GEN)
    prompts, seeds = report.calibration["prompts"], report.calibration["seeds"]
    assert report.alignment["baseline_score"] == redness(_draw(sd3_pipeline, prompts, seeds), prompts)
    plan = PrunePlan(removed_blocks=[2], family="sd3", num_blocks=4)
    ablated = redness(_draw(prune_pipeline(sd3_pipeline, plan), prompts, seeds), prompts)
    assert report.alignment["blocks"][2]["score"] == ablated
    saved = ContributionReport.load(out)
    assert saved.alignment_contributions() == {i: v["delta"] for i, v in report.alignment["blocks"].items()}
    assert set(saved.alignment_contributions()) == set(range(4))
    # bk-sdm plans by it; an analysis without it says how to measure it.
    inventory = inspect_transformer(saved.transformer_config)
    make_plan(saved.contributions(), inventory, ratio=0.2, strategy="bk-sdm",
              alignment=saved.alignment_contributions())
    plain = analyze(sd3_pipeline, metric="velocity", n_prompts=2, eval_steps=2, progress=False, **GEN)
    assert plain.alignment_contributions() is None
    # A main metric that is itself an alignment score serves bk-sdm directly.
    aligned = analyze(sd3_pipeline, metric="test_alignment_red", n_prompts=1, progress=False, **GEN)
    assert aligned.alignment_contributions() == {i: aligned.entries[(i, BLOCK)]["delta"] for i in range(4)}
    with pytest.raises(Exception, match="not a text-image alignment score"):
        analyze(sd3_pipeline, metric="velocity", alignment_metric="image_fidelity", n_prompts=2, progress=False,
                **GEN)


def test_the_renamed_velocity_metric(sd3_pipeline, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert get_metric("fidelity") is get_metric("velocity")
    assert any(issubclass(w.category, FutureWarning) and "now called 'velocity'" in str(w.message) for w in caught)
    assert DEFAULT_METRIC == "image_fidelity"
    # An analysis written under the old name reads (and resumes) as velocity.
    out = tmp_path / "analysis.json"
    report = analyze(sd3_pipeline, out, metric="fidelity", n_prompts=2, eval_steps=2, progress=False, **GEN)
    assert report.metric["name"] == "velocity"
    data = json.loads(out.read_text())
    data["metric"]["name"] = "fidelity"
    out.write_text(json.dumps(data))
    again = analyze(sd3_pipeline, out, metric="velocity", n_prompts=2, eval_steps=2, progress=False, **GEN)
    assert again.run["this_process"]["computed_entries"] == 0
    from diffusers_hprune.metrics import MetricError

    with pytest.raises(MetricError, match="registered already"):
        register_metric("shapeeval")(lambda images, prompts: 0.0)
