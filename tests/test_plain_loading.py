"""A plain `DiffusionPipeline.from_pretrained(folder)`, no dtype, generates for every folder the project writes.

Diffusers builds the transformer and VAE in fp32; Transformers 5 builds text encoders in the dtype
their config records. Folders written from a 16-bit pipeline record fp32 for the text encoders,
so both agree (utils.plain_loading).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffusers_hprune import PrunePlan, prune_pipeline, toy
from diffusers_hprune.cli import main
from diffusers_hprune.hub import export_folder
from diffusers_hprune.quantization import quantize_pipeline
from diffusers_hprune.utils.plain_loading import record_fp32_default

CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")
PLANS = {
    "sd3": PrunePlan(removed_blocks=[1], removed_components={2: ["ff"]}, family="sd3", num_blocks=4),
    "flux": PrunePlan(removed_blocks=[3], family="flux", num_blocks=5),
}
DTYPES = {"sd3": torch.bfloat16, "flux": torch.float16}

PLAIN = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import diffusers_hprune  # noqa: F401  (the unexported folders hold its classes; exports load without it)
    from diffusers import DiffusionPipeline
    call = json.loads(sys.argv[1])
    for k, (folder, remote) in enumerate(json.loads(sys.argv[2])):
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)
        pipe.set_progress_bar_config(disable=True)
        dtypes = sorted({str(c.dtype) for c in pipe.components.values() if hasattr(c, "dtype")})
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).images
        assert np.isfinite(image).all(), folder
        np.save(f"{sys.argv[3]}/{k}.npy", image)
        print(json.dumps({"folder": folder, "dtypes": dtypes}))
    """
)


def _tiny(family, dtype):
    from diffusers_hprune.toy.components import tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = (tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline)(seed=0).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_record_fp32_default_changes_only_text_encoder_configs(tmp_path):
    pipe = _tiny("flux", torch.float16)
    pipe.save_pretrained(tmp_path / "stock")  # a stock pipeline's save: the configs say float16
    config = json.loads((tmp_path / "stock" / "text_encoder_2" / "config.json").read_text())
    assert config["dtype"] == "float16"
    weights = {p: p.read_bytes() for p in (tmp_path / "stock").rglob("*.safetensors")}
    assert record_fp32_default(tmp_path / "stock") == ["text_encoder", "text_encoder_2"]
    for name in ("text_encoder", "text_encoder_2"):
        assert json.loads((tmp_path / "stock" / name / "config.json").read_text())["dtype"] == "float32"
    assert {p: p.read_bytes() for p in weights} == weights  # the weights are untouched
    assert record_fp32_default(tmp_path / "stock") == []  # and again: nothing left to change
    assert record_fp32_default(tmp_path / "not-a-pipeline") == []


def test_saved_16_bit_pruned_pipeline_loads_plain_and_keeps_asked_dtypes(tmp_path):
    from diffusers import DiffusionPipeline

    pruned = prune_pipeline(_tiny("sd3", torch.bfloat16), PLANS["sd3"])
    pruned.save_pretrained(tmp_path / "pruned")
    plain = DiffusionPipeline.from_pretrained(tmp_path / "pruned")
    assert {c.dtype for c in plain.components.values() if hasattr(c, "dtype")} == {torch.float32}
    assert plain("a red circle", **CALL).images.shape[0] == 1
    asked = DiffusionPipeline.from_pretrained(tmp_path / "pruned", dtype=torch.bfloat16)
    assert {c.dtype for c in asked.components.values() if hasattr(c, "dtype")} == {torch.bfloat16}


@pytest.mark.slow  # fresh process over every kind of folder: CI's second step
def test_every_written_folder_loads_plain_in_a_fresh_process(tmp_path):
    folders = [(str(toy.model_path("sd3")), False), (str(toy.model_path("flux")), False)]
    for family in ("sd3", "flux"):
        base = _tiny(family, DTYPES[family])
        base.save_pretrained(tmp_path / f"{family}-teacher")  # a 16-bit base model, as on the Hub
        pruned = tmp_path / f"{family}-pruned"
        prune_pipeline(base, PLANS[family]).save_pretrained(pruned)
        nf4 = quantize_pipeline(pruned, tmp_path / f"{family}-nf4")
        export = export_folder(pruned, tmp_path / f"{family}-export")
        remote = family == "sd3"  # the SD3 plan removes a component: a remote-code export
        folders += [(str(pruned), False), (str(nf4), False), (str(export), remote)]
    PLANS["flux"].save(tmp_path / "plan.json")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    distilled = tmp_path / "flux-distilled"
    assert main(["distill", "--teacher", str(tmp_path / "flux-teacher"), "--plan", str(tmp_path / "plan.json"),
                 "--prompts", str(tmp_path / "prompts.txt"), "--output-dir", str(distilled), "--max_train_steps",
                 "1", "--train_batch_size", "2", "--resolution", "16", "--no-progress", "--no-budget-check"]) == 0
    folders.append((str(distilled), False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    (tmp_path / "images").mkdir()
    result = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(CALL), json.dumps(folders), str(tmp_path / "images")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [entry["folder"] for entry in loaded] == [f for f, _ in folders]
    assert all(entry["dtypes"] == ["torch.float32"] for entry in loaded), loaded
    # The same image as the folder loaded here with dtype=torch.float32 asked for explicitly.
    from diffusers import DiffusionPipeline

    for k, (folder, remote) in enumerate(folders):
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **CALL).images
        np.testing.assert_allclose(np.load(tmp_path / "images" / f"{k}.npy"), image, atol=1e-5, err_msg=folder)
