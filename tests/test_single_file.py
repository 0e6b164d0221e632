"""`hprune export --format single-file / gguf`: the transformer in its family's original key layout, read back by
readers this project did not write (Diffusers' single-file converters and GGUF loader), in a process where
diffusers_hprune cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import MIXED_PLANS, tiny_pipeline

from diffusers_hprune import PrunePlan, prune_pipeline
from diffusers_hprune.cli import main
from diffusers_hprune.hub import export_folder
from diffusers_hprune.hub.gguf_file import export_gguf, gguf_metadata, tensor_kind
from diffusers_hprune.hub.single_file import CONFIG_KEY, PLAN_KEY, export_single_file

PROMPT = "a red circle left of a blue square"
CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")
PLANS = {
    "sd3": PrunePlan(removed_blocks=[1, 3], family="sd3", num_blocks=4),  # the last block goes: 2 becomes last
    "sd3-dual-last": PrunePlan(removed_blocks=[2, 3], family="sd3", num_blocks=4),  # a dual block becomes last
}

# Stock Diffusers only: the file read by the family's from_single_file, the rest of the pipeline from the stock
# export of the same folder (whose transformer/config.json is the config the file needs).
READER = textwrap.dedent(
    """
    import json, sys
    sys.modules["diffusers_hprune"] = None  # `import diffusers_hprune` raises ImportError from here on
    import numpy as np, torch
    import diffusers
    from diffusers import DiffusionPipeline
    file, stock, out, call, prompt = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    cls = getattr(diffusers, json.load(open(f"{stock}/transformer/config.json"))["_class_name"])
    kwargs = {}
    if file.endswith(".gguf"):
        kwargs["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)
    transformer = cls.from_single_file(file, config=stock, subfolder="transformer", torch_dtype=torch.float32, **kwargs)
    pipe = DiffusionPipeline.from_pretrained(stock, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    np.save(out, pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images)
    print(json.dumps({"transformer": type(transformer).__name__,
                      "block_linear": type(transformer.transformer_blocks[0].ff.net[2]).__name__,
                      "package_importable": sys.modules.get("diffusers_hprune") is not None}))
    """
)


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


def _read_back(tmp_path, file, stock):
    out = tmp_path / f"{file.name}.npy"
    args = [sys.executable, "-c", READER, str(file), str(stock), str(out), json.dumps(CALL), PROMPT]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pruned_folders(tmp_path_factory):
    """Each SD3 whole-block plan: the pruned folder, its stock export and the pruned pipeline's image."""
    out = {}
    for name, plan in PLANS.items():
        base = tmp_path_factory.mktemp(name)
        pruned = prune_pipeline(tiny_pipeline("sd3"), plan)
        pruned.save_pretrained(base / "pruned")
        out[name] = (base / "pruned", export_folder(base / "pruned", base / "stock"), _image(pruned))
    return out


@pytest.mark.parametrize("name", list(PLANS))
def test_single_file_reads_back_through_diffusers_converter(pruned_folders, tmp_path, name):
    from safetensors import safe_open

    folder, stock, expected = pruned_folders[name]
    file = export_single_file(folder, tmp_path / "model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    # Stability's layout: two joint blocks left, renumbered, with fused qkv; no Diffusers name survives.
    assert {k.split(".")[1] for k in keys if k.startswith("joint_blocks.")} == {"0", "1"}
    assert "joint_blocks.0.x_block.attn.qkv.weight" in keys and not any(k.startswith("transformer_blocks") for k in keys)
    assert metadata["modelspec.architecture"] == "stable-diffusion-3.5-medium"  # the toy has dual attention
    assert json.loads(metadata[PLAN_KEY]) == PLANS[name].to_dict()
    assert json.loads(metadata[CONFIG_KEY])["num_layers"] == 2
    info, image = _read_back(tmp_path, file, stock)
    assert info["transformer"] == "SD3Transformer2DModel" and not info["package_importable"]
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_single_file_dtype_and_cli(pruned_folders, tmp_path, capsys):
    from safetensors import safe_open

    folder, _, _ = pruned_folders["sd3"]
    out = tmp_path / "bf16.safetensors"
    assert main(["export", str(folder), "--format", "single-file", "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert "from_single_file" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("quant, min_psnr", [("Q8_0", 60.0), ("Q4_0", 40.0)])
def test_gguf_reads_back_through_diffusers_gguf_loader(pruned_folders, tmp_path, quant, min_psnr):
    pytest.importorskip("gguf")
    folder, stock, expected = pruned_folders["sd3"]
    file, counts = export_gguf(folder, tmp_path / f"model-{quant}.gguf", quant=quant, progress=False)
    assert counts[quant] > 0 and counts["F32"] > 0
    assert gguf_metadata(file)[PLAN_KEY] == PLANS["sd3"].to_dict()
    info, image = _read_back(tmp_path, file, stock)
    assert info["block_linear"] == "GGUFLinear"  # Diffusers computes from the quantised blocks
    psnr = _psnr(image, expected)
    print(f"{quant}: PSNR {psnr:.1f} dB against the pruned model")
    assert min_psnr <= psnr < float("inf"), psnr  # quantised: close to the 16-bit model, and not the same file


def test_gguf_keeps_the_community_high_precision_tensors():
    high = ("x_embedder.", "final_layer.")
    weight = torch.zeros(64, 64)
    assert tensor_kind("joint_blocks.0.x_block.mlp.fc1.weight", weight, "Q4_0", high, 32) == "Q4_0"
    assert tensor_kind("joint_blocks.0.x_block.mlp.fc1.bias", torch.zeros(64), "Q4_0", high, 32) == "F32"
    assert tensor_kind("final_layer.linear.weight", weight, "Q4_0", high, 32) == "F32"
    assert tensor_kind("joint_blocks.0.x_block.mlp.fc1.weight", torch.zeros(64, 48), "Q4_0", high, 32) == "F32"


def test_file_exports_refuse_what_they_cannot_carry(pruned_folders, tmp_path, capsys):
    folder, _, _ = pruned_folders["sd3"]
    mixed = tmp_path / "mixed"
    prune_pipeline(tiny_pipeline("sd3"), MIXED_PLANS["sd3"]).save_pretrained(mixed)
    for fmt, name in (("single-file", "x.safetensors"), ("gguf", "x.gguf")):
        assert main(["export", str(mixed), "--format", fmt, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "removes components inside blocks" in err and "--format remote" in err
        assert not (tmp_path / name).exists()
    cases = [
        (["--format", "single-file", "--out", str(tmp_path / "x.bin")], "must end in .safetensors"),
        (["--format", "gguf", "--out", str(tmp_path / "x.safetensors")], "must end in .gguf"),
        (["--format", "single-file", "--quant", "Q8_0", "--out", str(tmp_path / "x.safetensors")], "--quant does not apply"),
        (["--format", "gguf", "--dtype", "float16", "--out", str(tmp_path / "x.gguf")], "--dtype does not apply"),
        (["--quant", "Q8_0", "--out", str(tmp_path / "folder")], "--quant applies to --format gguf only"),
    ]
    for args, message in cases:
        assert main(["export", str(folder), *args]) == 2
        assert message in capsys.readouterr().err
    # An existing file is replaced only with --overwrite, and only when this project wrote it.
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"user data")
    for extra, message in (([], "exists; choose another --out"), (["--overwrite"], "not a file diffusers-hprune wrote")):
        assert main(["export", str(folder), "--format", "single-file", "--out", str(foreign), *extra]) == 2
        assert message in capsys.readouterr().err
    assert foreign.read_bytes() == b"user data"
    ours = export_single_file(folder, tmp_path / "ours.safetensors")
    assert export_single_file(folder, ours, overwrite=True) == ours


def test_file_exports_refuse_4bit_folders_and_name_the_16bit_one(tmp_path, capsys):
    from diffusers_hprune.quantization import quantize_pipeline

    prune_pipeline(tiny_pipeline("sd3"), PLANS["sd3"]).save_pretrained(tmp_path / "pruned")
    quantize_pipeline(tmp_path / "pruned", tmp_path / "nf4")
    assert main(["export", str(tmp_path / "nf4"), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds quantised weights (nf4)" in capsys.readouterr().err


def test_gguf_without_the_extra_names_it(pruned_folders, tmp_path, monkeypatch, capsys):
    folder, _, _ = pruned_folders["sd3"]
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "pip install 'diffusers-hprune[gguf]'" in capsys.readouterr().err


@pytest.mark.slow
def test_flux_single_file_at_full_width(tmp_path):
    """Diffusers' FLUX converter splits a single block's fused projection at FLUX.1's width (3072): a full-width
    transformer with four blocks, one of each kind removed, read back draws the pruned model's image."""
    pipe = tiny_pipeline("flux", num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56),
                         num_layers=2, num_single_layers=2)
    pruned = prune_pipeline(pipe, PrunePlan(removed_blocks=[0, 3], family="flux", num_blocks=4))
    expected = _image(pruned)
    pruned.save_pretrained(tmp_path / "pruned")
    del pipe, pruned
    stock = export_folder(tmp_path / "pruned", tmp_path / "stock")
    file = export_single_file(tmp_path / "pruned", tmp_path / "flux.safetensors")
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell"
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.linear.weight"} <= keys
    assert not any(k.startswith(("double_blocks.1.", "single_blocks.1.")) for k in keys)
    info, image = _read_back(tmp_path, file, stock)
    assert info["transformer"] == "FluxTransformer2DModel" and not info["package_importable"]
    np.testing.assert_allclose(image, expected, atol=1e-5)
    # The same tensors as GGUF Q8_0, through Diffusers' GGUF loader and FLUX converter.
    pytest.importorskip("gguf")
    file.unlink()
    gguf_file, counts = export_gguf(tmp_path / "pruned", tmp_path / "flux-Q8_0.gguf", quant="Q8_0", progress=False)
    assert counts["Q8_0"] > 0
    info, image = _read_back(tmp_path, gguf_file, stock)
    psnr = _psnr(image, expected)
    print(f"FLUX.1 full width, GGUF Q8_0: PSNR {psnr:.1f} dB against the pruned model")
    assert 60.0 <= psnr < float("inf"), psnr


class _FakeApi:
    """HfApi at its boundary: records the calls and keeps what was uploaded."""

    def __init__(self, staged):
        self.calls, self.staged = [], staged

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        import shutil

        self.calls.append(("upload_folder", kwargs))
        shutil.copytree(kwargs["folder_path"], self.staged)
        return type("Commit", (), {"commit_url": "https://huggingface.co/someone/toy/commit/abc"})()


@pytest.mark.parametrize("fmt, extra, name", [("gguf", ["--quant", "Q4_0"], "toy-Q4_0.gguf"),
                                              ("single-file", ["--dtype", "bfloat16"], "toy.safetensors")])
def test_push_a_file_with_its_config_and_card(pruned_folders, tmp_path, monkeypatch, capsys, fmt, extra, name):
    folder, stock, _ = pruned_folders["sd3"]
    api = _FakeApi(tmp_path / "staged")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    args = ["push", str(folder), "--repo-id", "someone/toy", "--format", fmt, *extra, "--token", "hf_x"]
    assert main(args) == 2  # the card must name where the text encoders and the VAE come from
    assert "needs --base-model" in capsys.readouterr().err and api.calls == []
    assert main([*args, "--base-model", "someone/base-sd3"]) == 0
    tree = sorted(p.relative_to(api.staged).as_posix() for p in api.staged.rglob("*") if p.is_file())
    assert tree == sorted(["README.md", "transformer/config.json", name])
    assert (json.loads((api.staged / "transformer/config.json").read_text())
            == json.loads((stock / "transformer/config.json").read_text()))
    card = (api.staged / "README.md").read_text()
    assert f'hf_hub_download("someone/toy", "{name}")' in card and 'config="someone/toy", subfolder="transformer"' in card
    assert ("GGUFQuantizationConfig" in card) == (fmt == "gguf")
    assert 'StableDiffusion3Pipeline.from_pretrained("someone/base-sd3"' in card and "base_model: someone/base-sd3" in card
    assert not list(folder.parent.glob(".pruned.push-*"))  # the scratch folder is gone
    # ComfyUI derives an SD3 model's depth from its width: the card does not send SD3 users there.
    assert "Not yet: ComfyUI derives an SD3 model's depth from its width" in card


def test_flux_cards_send_users_to_comfyui_and_refuse_a_missing_block_kind(tmp_path, capsys):
    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.hub.file_card import write_file_card

    config = dict(load_transformer_config("flux.1-schnell"))
    plan = PrunePlan(removed_blocks=[20, 40], family="flux", num_blocks=57)
    card = write_file_card(tmp_path, file_name="f-Q8_0.gguf", config=config, plan=plan, pipeline_class="FluxPipeline",
                           base_model="black-forest-labs/FLUX.1-schnell", repo_id="me/f", quant="Q8_0").read_text()
    assert "ComfyUI counts the blocks in the file" in card and '"Unet Loader (GGUF)"' in card
    assert "55 of its 57 blocks" in card
    # The FLUX.1 readers need a block of each kind: a plan that removes every single-stream block is refused.
    folder = tmp_path / "no-single"
    prune_pipeline(tiny_pipeline("flux"), PrunePlan(removed_blocks=[2, 3, 4], family="flux", num_blocks=5)
                   ).save_pretrained(folder)
    assert main(["export", str(folder), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "need at least one of each" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_bf16_folders_give_the_same_file(pruned_folders, tmp_path):
    """A 16 GB transformer is sharded and usually bf16: every shard is read, the dtype kept, the tensors those of the
    one-file fp32 folder rounded to bf16."""
    from safetensors.torch import load_file

    from diffusers_hprune.models import pruned_class_for

    folder, _, _ = pruned_folders["sd3"]
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded, ignore=shutil.ignore_patterns("transformer"))
    transformer = pruned_class_for("sd3").from_pretrained(folder / "transformer").to(torch.bfloat16)
    transformer.save_pretrained(sharded / "transformer", max_shard_size="20KB")
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 2
    reference = load_file(export_single_file(folder, tmp_path / "one.safetensors"))
    got = load_file(export_single_file(sharded, tmp_path / "sharded.safetensors"))
    assert set(got) == set(reference)
    for key, tensor in reference.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor.to(torch.bfloat16)), key
