"""`hprune quantize --method int8-weight-only | int8-dynamic`: torchao's int8 kinds through Diffusers' TorchAoConfig,
saved as safetensors, reloaded by the pruned classes and (as a stock export) by stock Diffusers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import MIXED_PLANS, tiny_pipeline

from diffusers_hprune import PrunePlan, prune_pipeline
from diffusers_hprune.cli import main
from diffusers_hprune.hub import export_folder, write_model_card
from diffusers_hprune.quantization import QuantizeError, quantize_pipeline
from diffusers_hprune.utils.quant_config import is_bitsandbytes, quantization_method

pytest.importorskip("torchao")

PROMPT = "a red circle left of a blue square"
CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")
BLOCKS = PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4)  # keeps the last block: a stock export holds it
# Images against the bf16 pruned model's. Weight-only dequantises to bf16 and multiplies as bf16 does: 45-48 dB on
# every CPU tried. Dynamic multiplies int8 by int8, and how exactly depends on the CPU's kernels: 44.6-47.2 dB with
# AVX-512, 36.8-39.5 dB with the AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), where weight-only
# did not move, so the bf16 reference did not either.
MIN_PSNR = {"int8-weight-only": 40.0, "int8-dynamic": 35.0}

READER = textwrap.dedent(
    """
    import json, sys
    sys.modules["diffusers_hprune"] = None  # stock Diffusers (and torchao) only
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    np.save(sys.argv[2], pipe(sys.argv[3], generator=torch.Generator().manual_seed(0), **json.loads(sys.argv[4])).images)
    print(json.dumps({"transformer": type(pipe.transformer).__name__,
                      "weight": type(pipe.transformer.transformer_blocks[0].ff.net[2].weight).__name__}))
    """
)


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("torchao")
    out = {}
    for name, plan in (("blocks", BLOCKS), ("mixed", MIXED_PLANS["sd3"])):
        pruned = prune_pipeline(tiny_pipeline("sd3"), plan)
        pruned.save_pretrained(base / name)
        out[name] = (base / name, _image(pruned.to(torch.bfloat16)))
    return base, out


@pytest.mark.parametrize("method", ["int8-weight-only", "int8-dynamic"])
@pytest.mark.parametrize("plan", ["blocks", "mixed"])
def test_int8_folders_save_as_safetensors_and_reload(folders, method, plan):
    from diffusers import DiffusionPipeline

    base, made = folders
    source, expected = made[plan]
    out = quantize_pipeline(source, base / f"{plan}-{method}", method=method)
    files = sorted(p.name for p in (out / "transformer").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # no pickle
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert quantization_method(config) == method and not is_bitsandbytes(config)
    assert config["prune_plan"] == json.loads((source / "transformer" / "config.json").read_text())["prune_plan"]
    pipe = DiffusionPipeline.from_pretrained(out, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer.transformer_blocks[0].ff.net[2].weight).__name__ == "Int8Tensor"
    assert type(pipe.transformer.proj_out.weight).__name__ == "Parameter"  # the skip list stays bf16
    # the int8 data and scales are what it holds: counted, not the logical bf16 size
    from diffusers_hprune.evaluation.measure import stored_bytes
    from diffusers_hprune.models import pruned_class_for

    bf16 = stored_bytes(pruned_class_for("sd3").from_pretrained(source / "transformer", dtype=torch.bfloat16))
    assert stored_bytes(pipe.transformer) < 0.8 * bf16
    psnr = _psnr(_image(pipe), expected)
    print(f"{plan} {method}: PSNR {psnr:.1f} dB against the bf16 pruned model")
    assert MIN_PSNR[method] <= psnr < float("inf"), psnr


def test_int8_stock_export_loads_with_stock_diffusers(folders, tmp_path):
    base, made = folders
    source, _ = made["blocks"]
    quantized = quantize_pipeline(source, tmp_path / "int8", method="int8-weight-only")
    stock = export_folder(quantized, tmp_path / "stock")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(quantized, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    expected = _image(pipe)
    out = tmp_path / "image.npy"
    args = [sys.executable, "-c", READER, str(stock), str(out), PROMPT, json.dumps(CALL)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"transformer": "SD3Transformer2DModel", "weight": "Int8Tensor"}
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)  # the same int8 weights, renamed


def test_the_card_names_torchao_not_nf4(folders, tmp_path):
    base, made = folders
    quantized = quantize_pipeline(made["blocks"][0], tmp_path / "int8", method="int8-dynamic")
    card = write_model_card(quantized, base_model="someone/base").read_text()
    assert "torchao int8-dynamic" in card and "NF4" not in card and "- int8-dynamic" in card
    assert 'pip install "torchao>=0.18"' in card


def test_torchao_refusals(folders, tmp_path, monkeypatch, capsys):
    base, made = folders
    source = made["blocks"][0]
    cases = [
        (["--method", "fp8-weight-only"], "needs a GPU of compute capability 8.9"),
        (["--method", "int8-weight-only", "--dtype", "fp16"], "--compute-dtype and --dtype apply to --method nf4"),
        (["--method", "int8-dynamic", "--compute-dtype", "fp32"], "--compute-dtype and --dtype apply to --method nf4"),
        (["--method", "int8-weight-only", "--skip-modules", "nosuch"], "Unknown module(s) in the skip list: nosuch"),
    ]
    for i, (args, message) in enumerate(cases):
        assert main(["quantize", str(source), "--out", str(tmp_path / f"q{i}"), *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"q{i}").exists()
    int8 = quantize_pipeline(source, tmp_path / "int8", method="int8-weight-only")
    with pytest.raises(QuantizeError, match=r"already quantised \(int8-weight-only\)"):
        quantize_pipeline(int8, tmp_path / "twice", method="int8-dynamic")
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert main(["quantize", str(source), "--out", str(tmp_path / "none"), "--method", "int8-dynamic"]) == 2
    assert "pip install 'diffusers-hprune[torchao]'" in capsys.readouterr().err


def test_quantization_method_reads_every_kind():
    assert quantization_method({}) is None
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert quantization_method({"quantization_config": nf4}) == "nf4" and is_bitsandbytes({"quantization_config": nf4})
    int8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert quantization_method({"quantization_config": int8}) == "bitsandbytes"
    ao = {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_data": {}}}}
    assert quantization_method({"quantization_config": ao}) == "int8-weight-only"
    other = {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig"}}}
    assert quantization_method({"quantization_config": other}) == "torchao"
    assert quantization_method({"quantization_config": {"quant_method": "gguf"}}) == "gguf"
