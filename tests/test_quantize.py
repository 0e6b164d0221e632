"""W4A16 NF4 quantisation (bitsandbytes through Diffusers' quantizer), saving and CPU loading."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from helpers import transformer_inputs
from safetensors import safe_open

from diffusers_hprune import PrunePlan, prune_transformer, toy
from diffusers_hprune.architecture.sizes import model_weight_bytes
from diffusers_hprune.cli import main
from diffusers_hprune.quantization import QuantizeError, is_quantized, quantize, quantize_pipeline

QUANT_STATE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


@pytest.fixture(scope="module", params=["sd3", "flux"])
def toy_transformer(request):
    return request.param, toy.load_pipeline(request.param).transformer


def _relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_round_trip_in_a_fresh_process(toy_transformer, tmp_path):
    """Quantise, save, load in a new process: the same outputs as before saving, close to the 32-bit model."""
    import bitsandbytes as bnb

    family, original = toy_transformer
    model = copy.deepcopy(original)
    inputs = transformer_inputs(model, seed=3)
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
    q = quantize(model)
    assert is_quantized(q) and type(q).__name__.startswith("HierarchicalPruned")
    linear4 = [n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) or n.startswith("proj_out")
               for n in linear4)
    with torch.no_grad():
        out = q(**inputs, return_dict=False)[0]
    # NF4 rounds every weight to one of 16 levels per block of 64. On these random inputs the toys' output
    # moves by 5.7 % (SD3) and 6.7 % (FLUX); removing any one block moves it by 5-19 % (median 13 %).
    assert _relative_error(out, reference) < 0.1
    q.save_pretrained(tmp_path / "q")
    torch.save({"inputs": inputs}, tmp_path / "inputs.pt")
    code = (
        "import torch, diffusers_hprune\n"
        f"from diffusers_hprune import {type(q).__name__} as C\n"
        f"m = C.from_pretrained({str(tmp_path / 'q')!r})\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})['inputs']\n"
        "with torch.no_grad():\n"
        "    out = m(**inputs, return_dict=False)[0]\n"
        f"torch.save({{'out': out}}, {str(tmp_path / 'out.pt')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt")["out"], out)


def test_saved_format_is_what_the_diffusers_loader_reads(toy_transformer, tmp_path):
    """config.json carries the bitsandbytes config; every 4-bit weight has its quant-state tensors, nothing else."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    family, original = toy_transformer
    q = quantize(copy.deepcopy(original).to(torch.bfloat16))
    q.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and not config["load_in_8bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    assert config["llm_int8_skip_modules"] == list(q.family.default_nf4_skip_modules)
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    quantized = {k[: -len(".weight")] for k in keys if k.endswith(".weight") and f"{k}.quant_map" in keys}
    unquantized_model = copy.deepcopy(original)
    linears = {n for n, m in unquantized_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized and quantized <= linears
    checker = BnB4BitDiffusersQuantizer(q.config.quantization_config)
    params = dict(unquantized_model.named_parameters())
    for name in quantized:
        assert {f"{name}.weight.{s}" for s in QUANT_STATE} <= keys, name
        checker.check_quantized_param_shape(f"{name}.weight", params[f"{name}.weight"], tensors[f"{name}.weight"])
    extra = {k for k in keys if any(k.endswith(f".weight.{s}") for s in QUANT_STATE)}
    assert keys - extra == set(unquantized_model.state_dict())  # the unquantised model's keys, no more
    # The analytic NF4 bytes (families/sizes.py) are what the file holds, apart from bitsandbytes' JSON quant-state blobs.
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if "bitsandbytes__" not in k)
    assert stored == model_weight_bytes(unquantized_model, "nf4")


def test_quantized_pipeline_loads_on_cpu_and_draws(tmp_path):
    from diffusers import DiffusionPipeline

    out = quantize_pipeline(toy.model_path("sd3"), tmp_path / "sd3-nf4")
    pipe = DiffusionPipeline.from_pretrained(out)  # Diffusers alone says "No GPU found" here
    assert is_quantized(pipe.transformer)
    prompts = toy.prompts(split="heldout", n=4, seed=0)
    images = toy.generate(pipe, prompts, seed=0)
    teacher = toy.generate(toy.load_pipeline("sd3"), prompts, seed=0)
    import numpy as np

    a = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    b = np.stack([np.asarray(i, dtype=np.float32) for i in teacher])
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 20  # same drawings, slightly different pixels


def test_pruned_transformer_keeps_its_plan(tmp_path):
    from diffusers_hprune import HierarchicalPrunedFluxTransformer2DModel

    original = toy.load_pipeline("flux").transformer
    plan = PrunePlan(removed_blocks=[9], removed_components={2: ["ff_context"]}, family="flux", num_blocks=12)
    q = quantize(prune_transformer(copy.deepcopy(original), plan))
    q.save_pretrained(tmp_path)
    loaded = HierarchicalPrunedFluxTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.prune_plan == q.prune_plan and is_quantized(loaded)


def test_bad_input(tmp_path, capsys):
    original = toy.load_pipeline("sd3").transformer
    q = quantize(copy.deepcopy(original))
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize(q)
    with pytest.raises(QuantizeError, match="Unknown module.*nonsense"):
        quantize(copy.deepcopy(original), skip_modules=["proj_out", "nonsense"])
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    first = quantize_pipeline(toy.model_path("sd3"), tmp_path / "nf4")
    before = sorted(p.name for p in first.rglob("*"))
    assert main(["quantize", str(toy.model_path("sd3")), "--out", str(first)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(first), "--out", str(tmp_path / "twice")]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert sorted(p.name for p in first.rglob("*")) == before and not (tmp_path / "twice").exists()
    mine = tmp_path / "mine"  # a folder of the user's, mistyped as --out: --overwrite must not delete it
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["quantize", str(toy.model_path("sd3")), "--out", str(mine), "--overwrite"]) == 2
    assert "holds files that are not a pipeline folder ('notes.txt')" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder left


def test_a_checkpoint_quantised_on_a_cpu_records_bf16_and_still_computes_fp32_here(toy_transformer, tmp_path):
    """The recorded compute dtype is what GPUs use after publishing; an fp32 run here computes exactly as fp32."""
    family, original = toy_transformer
    default = quantize(copy.deepcopy(original))
    asked = quantize(copy.deepcopy(original), compute_dtype=torch.float32)
    assert default.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    default.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "bnb_4bit_compute_dtype"] == "bfloat16"
    loaded = type(default).from_pretrained(tmp_path)  # the CPU loading path computes in fp32 too
    inputs = transformer_inputs(original, seed=5)
    with torch.no_grad():
        a, b, c = default(**inputs).sample, asked(**inputs).sample, loaded(**inputs).sample
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(c, b)


def test_quantize_pipeline_loads_only_the_transformer_and_copies_the_rest(tmp_path, monkeypatch):
    """One 16-bit transformer in memory: the text encoders and the VAE are copied as files, never loaded."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("quantize_pipeline loaded a component it only has to copy")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", classmethod(refuse))
    source = toy.model_path("sd3")
    out = quantize_pipeline(source, tmp_path / "nf4")
    monkeypatch.undo()
    for name in ("text_encoder", "text_encoder_3", "tokenizer", "vae", "scheduler"):
        for path in (source / name).rglob("*"):
            if path.is_file():
                assert (out / name / path.relative_to(source / name)).read_bytes() == path.read_bytes(), path
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "HierarchicalPrunedSD3Pipeline"
    assert index["transformer"] == ["diffusers_hprune", "HierarchicalPrunedSD3Transformer2DModel"]
    assert is_quantized(diffusers.DiffusionPipeline.from_pretrained(out).transformer)
