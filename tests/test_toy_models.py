"""The shipped toy pipelines load offline with stock Diffusers and draw what they drew when shipped;
the training script runs (a few steps, tiny settings) so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_hprune import toy
from diffusers_hprune.toy import train

REFERENCE = Path(__file__).parent / "data" / "toy_reference.json"


@pytest.mark.parametrize("family", toy.shipped())
def test_shipped_pipeline_loads_with_stock_diffusers_and_matches_reference(family):
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

    reference = json.loads(REFERENCE.read_text())[family]
    pipe = DiffusionPipeline.from_pretrained(toy.model_path(family), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[toy.toy_family(family)]
    image = pipe(reference["prompt"], generator=torch.Generator().manual_seed(reference["seed"]),
                 output_type="np", **toy.generation_kwargs(family)).images[0]
    expected = np.array(reference["pixels"], dtype=np.float32) / 255.0
    assert image.shape == expected.shape == (32, 32, 3)
    assert np.abs(image - expected).max() <= 3 / 255


PLAIN_CALL = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
path, family, out = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(path)  # no dtype: what a user of stock Diffusers types
pipe.set_progress_bar_config(disable=True)
dtypes = sorted({str(m.dtype) for m in pipe.components.values() if isinstance(m, torch.nn.Module)})
reference = json.load(open(REFERENCE))[family]
image = pipe(reference["prompt"], generator=torch.Generator().manual_seed(reference["seed"]), output_type="np",
             **GENERATION).images[0]
np.save(out, image)
print(json.dumps(dtypes))
"""


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
@pytest.mark.parametrize("family", toy.shipped())
def test_shipped_pipeline_works_with_the_plain_call_in_a_fresh_process(family, tmp_path):
    """`DiffusionPipeline.from_pretrained(path)` with no dtype, without diffusers_hprune imported: one dtype, the
    reference drawing."""
    import subprocess
    import sys

    code = PLAIN_CALL.replace("REFERENCE", repr(str(REFERENCE))).replace(
        "GENERATION", repr(toy.generation_kwargs(family)))
    result = subprocess.run([sys.executable, "-c", code, str(toy.model_path(family)), family, str(tmp_path / "i.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["torch.float32"]
    reference = json.loads(REFERENCE.read_text())[family]
    expected = np.array(reference["pixels"], dtype=np.float32) / 255.0
    image = np.load(tmp_path / "i.npy")
    assert image.shape == expected.shape and np.abs(image - expected).max() <= 3 / 255


def test_shipped_pipelines_fit_the_size_budget():
    total = sum(p.stat().st_size for f in toy.FAMILIES for p in toy.model_path(f).rglob("*") if p.is_file())
    assert total <= 20 * 2**20


def test_shipped_deep_toys_have_the_seed_models_depths_and_fit_their_size_budget():
    deep = ("sd3-deep", "flux-deep")
    total = sum(p.stat().st_size for f in deep for p in toy.model_path(f).rglob("*") if p.is_file())
    assert total <= 25 * 2**20  # 23 MB when shipped: two fp16 transformers of about 5.5 M parameters, their encoders
    sd3 = json.loads((toy.model_path("sd3-deep") / "transformer" / "config.json").read_text())
    assert (sd3["num_layers"], sd3["dual_attention_layers"]) == (38, [])  # SD3.5 Large
    flux = json.loads((toy.model_path("flux-deep") / "transformer" / "config.json").read_text())
    assert (flux["num_layers"], flux["num_single_layers"]) == (19, 38)  # FLUX.1
    for name in deep:
        info = json.loads((toy.model_path(name) / "training.json").read_text())
        assert info["name"] == name and info["evaluations"][-1]["overall"] >= 0.5


def test_shipped_sd3_toy_structure():
    config = json.loads((toy.model_path("sd3") / "transformer" / "config.json").read_text())
    assert config["num_layers"] >= 12 and config["dual_attention_layers"]
    config = json.loads((toy.model_path("flux") / "transformer" / "config.json").read_text())
    assert config["num_layers"] >= 2 and config["num_single_layers"] >= 2


def test_training_script_smoke(tmp_path, monkeypatch):
    monkeypatch.setitem(train.TOY_CONFIGS, "sd3", dict(train.TOY_CONFIGS["sd3"], num_layers=2, dual_attention_layers=(0,)))
    monkeypatch.setitem(train.TOY_CONFIGS, "flux", dict(train.TOY_CONFIGS["flux"], num_layers=1, num_single_layers=1))
    assert train.main(["vae", "--out", str(tmp_path / "vae"), "--vae-steps", "2", "--images", "64"]) == 0
    vae_config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # set from latent statistics
    for family in toy.FAMILIES:
        out = tmp_path / family
        assert train.main([family, "--vae", str(tmp_path / "vae"), "--out", str(out), "--max-steps", "2",
                           "--images", "64", "--eval-prompts", "0"]) == 0
        info = json.loads((out / "training.json").read_text())
        assert info["steps"] == 2 and np.isfinite(info["final_loss"])
        pipe = toy.load_pipeline(out)
        images = toy.generate(pipe, ["a red circle"], num_inference_steps=2)
        assert images[0].size == (32, 32)
        from diffusers import DiffusionPipeline

        plain = DiffusionPipeline.from_pretrained(out)  # no dtype: one dtype for every component
        assert {m.dtype for m in plain.components.values() if isinstance(m, torch.nn.Module)} == {torch.float32}
        assert toy.generate(plain, ["a red circle"], num_inference_steps=2)[0].size == (32, 32)


def test_flow_matching_loss_trains(tmp_path):
    """A few optimizer steps on one batch lower the loss: the objective is wired correctly."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(train.TOY_CONFIGS["sd3"], num_layers=2, dual_attention_layers=(0,)))
    x0 = torch.randn(8, 4, 16, 16)
    embeds, pooled = torch.randn(8, 20, 64), torch.randn(8, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = train.flow_matching_loss("sd3", model, x0, embeds, pooled, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_evaluate_cli_scores_a_toy(tmp_path, capsys):
    from diffusers_hprune.cli import main

    out, grid = tmp_path / "metrics.json", tmp_path / "grid.png"
    assert main(["evaluate", "flux", "--n", "6", "--out", str(out), "--grid", str(grid), "--latency-repeats", "2"]) == 0
    result = json.loads(out.read_text())
    model = result["models"]["model"]
    assert len(result["prompts"]) == 6 and list(model["metrics"]) == ["shapeeval"]
    assert 0.0 <= model["metrics"]["shapeeval"]["overall"] <= 1.0 and "attribute_shape" in model["metrics"]["shapeeval"]
    assert "fidelity" not in model and model["params"] > 0
    assert "shapeeval" in capsys.readouterr().out
    assert grid.is_file()


def test_evaluate_cli_compares_a_student_with_its_teacher(tmp_path, capsys):
    """Same prompts and seeds; metrics, fidelity, cost and a teacher | student grid."""
    from PIL import Image

    from diffusers_hprune import PrunePlan, prune_pipeline, toy
    from diffusers_hprune.cli import main

    student = tmp_path / "student"
    plan = PrunePlan(removed_blocks=[9, 10], family="sd3", num_blocks=12)
    prune_pipeline(toy.load_pipeline("sd3"), plan).save_pretrained(student)
    out, grid = tmp_path / "metrics.json", tmp_path / "grid.png"
    assert main(["evaluate", "sd3", str(student), "--n", "5", "--latency-repeats", "2", "--warmup", "1",
                 "--out", str(out), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "fidelity to teacher" in printed and "student / teacher" in printed
    result = json.loads(out.read_text())
    teacher, pruned = result["models"]["teacher"], result["models"]["student"]
    assert len(result["prompts"]) == 5 and result["generation"]["num_inference_steps"] == 20
    assert pruned["prune_plan"] == plan.describe() and teacher["prune_plan"] == ""
    assert pruned["params"] < teacher["params"] and pruned["weight_bytes"] < teacher["weight_bytes"]
    assert pruned["relative"]["params"] == pytest.approx(pruned["params"] / teacher["params"])
    assert len(pruned["latency_s"]) and pruned["latency_s"]["repeats"] == 2
    assert 0 <= pruned["metrics"]["shapeeval"]["overall"] <= 1 and "attribute_shape" in pruned["metrics"]["shapeeval"]
    assert 5 < pruned["fidelity"]["psnr_db"] < 100 and 0 < pruned["fidelity"]["ssim"] < 1
    image = Image.open(grid)
    assert image.width == 5 * 32 * 3 and image.height == 2 * 32 * 3  # five prompts, teacher row over student row
    # The teacher compared with itself is perfectly faithful.
    assert main(["evaluate", "sd3", "sd3", "--n", "2", "--no-cost", "--out", str(out)]) == 0
    same = json.loads(out.read_text())["models"]["student"]
    assert same["fidelity"]["psnr_db"] == 100.0 and "params" not in same


def test_evaluate_refuses_mismatched_or_unknown_inputs(capsys):
    from diffusers_hprune.cli import main

    assert main(["evaluate", "sd3", "flux", "--n", "2", "--no-cost"]) == 2
    assert "compare a student with its own teacher" in capsys.readouterr().err
    assert main(["evaluate", "sd3", "--n", "2", "--metric", "nonsense", "--no-cost"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_the_library_loads_pipelines_without_deprecation_warnings(tmp_path):
    """Issue 32: `torch_dtype` (deprecated for `dtype` in Diffusers 0.40) reached library users as a FutureWarning."""
    import warnings

    from diffusers_hprune.loading import load_pipeline
    from diffusers_hprune.quantization import quantize_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy.load_pipeline("sd3")
        load_pipeline("flux", None, torch.float32)
        quantize_pipeline(toy.model_path("sd3"), tmp_path / "nf4")
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "torch.jit" not in str(w.message)] == []
