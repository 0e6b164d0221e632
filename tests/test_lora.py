"""LoRAs made for the base model load into pruned SD3 and FLUX models through `load_lora_weights`.

The reference is the base model with the LoRA fused and unloaded, pruned afterwards: adapters of
removed parts vanish with them, and a sliced layer's update loses the columns its weight lost.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from helpers import MIXED_PLANS, tiny_pipeline

from diffusers_hprune import PrunePlan, get_family, prune_pipeline, prune_transformer
from diffusers_hprune.architecture.base import adapter_layers
from diffusers_hprune.utils.errors import CheckpointMismatchError, PlanError

CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")
PROMPT = "a red circle left of a blue square"
PLANS = MIXED_PLANS
TARGETS = {  # kept and removed parts alike; FLUX's single-block proj_out is sliced in blocks 3 and 4
    "sd3": ["to_q", "to_k", "add_q_proj", "to_out.0", "ff.net.0.proj", "ff_context.net.2", "norm1.linear"],
    "flux": ["to_q", "to_v", "proj_out", "proj_mlp", "ff.net.0.proj", "norm.linear", "norm1.linear"],
}


def _pipe(family):
    return tiny_pipeline(family)


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.fixture(scope="module", params=["sd3", "flux"])
def lora(request, tmp_path_factory):
    """A LoRA for the base model in Diffusers' format (save_lora_weights), with non-zero updates everywhere."""
    family = request.param
    return family, _base_lora(family, TARGETS[family], tmp_path_factory.mktemp(f"lora-{family}"), alpha=8, seed=1)


def _base_lora(family, targets, folder, *, alpha, seed):
    """Write a LoRA for the base model of ``family`` on ``targets`` into ``folder``; returns ``folder``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(family)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.mul_(20)  # large enough that a lost or misplaced adapter shows in the image
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=config.to_dict())
    return folder


def _reference(family, folder, scale=1.0):
    """The base model with the LoRA fused (at ``scale``) and unloaded, then pruned."""
    pipe = _pipe(family)
    pipe.load_lora_weights(folder)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return _image(prune_pipeline(pipe, PLANS[family]))


def test_base_lora_on_the_pruned_model_equals_lora_then_pruning(lora, caplog):
    family, folder = lora
    expected = _reference(family, folder)
    pruned = prune_pipeline(_pipe(family), PLANS[family])
    before = _image(pruned)
    with caplog.at_level(logging.INFO, logger="diffusers_hprune.models.pruned"):
        pruned.load_lora_weights(folder)
    dropped = [r.getMessage() for r in caplog.records if "dropped the adapters" in r.getMessage()]
    assert len(dropped) == 1  # one line, naming every removed module that had an adapter
    fam = get_family(family)
    removed = fam.removed_module_paths(pruned.transformer.config, PLANS[family])
    assert any(path in dropped[0] for path in removed)
    # Sliced layers keep their pruned width (Diffusers' FLUX loader would widen them with zero columns).
    for path, (_, parts, full) in fam.sliced_layers(pruned.transformer.config, PLANS[family]).items():
        layer = pruned.transformer.get_submodule(path)
        assert layer.in_features == full - sum(s.stop - s.start for s in parts)
    unfused = _image(pruned)
    assert np.abs(unfused - before).max() > 1e-2  # the LoRA changes the image
    np.testing.assert_allclose(unfused, expected, atol=1e-4)

    with pytest.raises(PlanError, match="Fuse or unload the LoRA first"):
        pruned.transformer.save_pretrained(folder.parent / "refused")
    assert not (folder.parent / "refused").exists()

    pruned.fuse_lora()
    np.testing.assert_allclose(_image(pruned), expected, atol=1e-4)
    pruned.unload_lora_weights()
    np.testing.assert_allclose(_image(pruned), expected, atol=1e-4)
    pruned.save_pretrained(folder.parent / "fused")  # no adapter layers left: it saves, and loads again
    from diffusers import DiffusionPipeline

    again = DiffusionPipeline.from_pretrained(folder.parent / "fused")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_image(again), expected, atol=1e-4)


def test_set_adapters_scales_the_pruned_lora_as_the_base_one(lora):
    family, folder = lora
    pruned = prune_pipeline(_pipe(family), PLANS[family])
    pruned.load_lora_weights(folder, adapter_name="style")
    pruned.set_adapters(["style"], [0.5])
    np.testing.assert_allclose(_image(pruned), _reference(family, folder, scale=0.5), atol=1e-4)
    pruned.set_adapters(["style"], [0.0])
    np.testing.assert_allclose(_image(pruned), _image(prune_pipeline(_pipe(family), PLANS[family])), atol=1e-5)


def test_pruning_a_model_that_holds_an_unfused_lora_says_what_to_do(lora):
    family, folder = lora
    pipe = _pipe(family)
    pipe.load_lora_weights(folder)
    with pytest.raises(PlanError, match=r"holds LoRA adapter layers .*Fuse or unload the LoRA first"):
        prune_transformer(pipe.transformer, PLANS[family])


STOCK_PLANS = {  # whole blocks only; SD3's last block goes, so block 2 becomes the stock last block
    "sd3": PrunePlan(removed_blocks=[1, 3], family="sd3", num_blocks=4),
    "flux": PrunePlan(removed_blocks=[0, 3], family="flux", num_blocks=5),
}
STOCK_TARGETS = {
    "sd3": ["to_q", "add_k_proj", "to_add_out", "ff_context.net.0.proj", "norm1_context.linear", "norm1.linear"],
    "flux": ["to_q", "proj_out", "proj_mlp", "norm.linear", "ff_context.net.0.proj"],
}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_convert_lora_for_a_stock_export(family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffusers_hprune.cli import main
    from diffusers_hprune.hub import export_folder

    _base_lora(family, STOCK_TARGETS[family], tmp_path / "lora", alpha=4, seed=2)
    prune_pipeline(_pipe(family), STOCK_PLANS[family]).save_pretrained(tmp_path / "pruned")
    export = export_folder(tmp_path / "pruned", tmp_path / "export", format="stock")
    reference = _pipe(family)
    reference.load_lora_weights(tmp_path / "lora")
    reference.fuse_lora()
    reference.unload_lora_weights()
    expected = _image(prune_pipeline(reference, STOCK_PLANS[family]))

    def stock():
        loaded = DiffusionPipeline.from_pretrained(export)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    # The base model's LoRA as it is would put its adapters on other blocks (stock Diffusers: a wrong image or a
    # size mismatch); with diffusers_hprune imported it is refused, naming the command that converts it.
    unconverted = stock()
    before = _image(unconverted)
    with pytest.raises(CheckpointMismatchError, match=r"made for a model with more blocks.* The LoRA has adapters for (single_)?transformer_blocks\.\d.*"
                       rf"hprune convert-lora LORA --to {re.escape(str(export))} --out"):
        unconverted.load_lora_weights(tmp_path / "lora")
    assert not adapter_layers(unconverted.transformer)  # refused before anything was loaded
    np.testing.assert_array_equal(_image(unconverted), before)
    alone = DiffusionPipeline.from_pretrained(export, transformer=type(unconverted.transformer).from_pretrained(
        export, subfolder="transformer"))  # the side file is found from the pipeline folder too
    with pytest.raises(CheckpointMismatchError, match="hprune convert-lora"):
        alone.load_lora_weights(tmp_path / "lora")

    out = tmp_path / "lora-for-export.safetensors"
    assert main(["convert-lora", str(tmp_path / "lora"), "--to", str(export), "--out", str(out)]) == 0
    assert "dropped the adapters of" in capsys.readouterr().out
    converted = stock()
    converted.load_lora_weights(out)
    np.testing.assert_allclose(_image(converted), expected, atol=1e-4)
    assert main(["convert-lora", str(tmp_path / "lora"), "--to", str(tmp_path / "pruned"), "--out",
                 str(tmp_path / "x.safetensors")]) == 2  # an unexported folder takes the LoRA as it is
    assert "not a stock export" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


REMOTE_LORA = """
import json, sys
sys.modules["diffusers_hprune"] = None  # only stock Diffusers and the export's own modeling code
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(sys.argv[2])
np.save(sys.argv[3], pipe(sys.argv[4], generator=torch.Generator().manual_seed(0), **json.loads(sys.argv[5])).images)
"""


@pytest.mark.slow  # a fresh process: CI's second step
def test_base_lora_on_a_remote_export_without_the_package(lora, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from diffusers_hprune.hub import export_folder

    family, folder = lora
    prune_pipeline(_pipe(family), PLANS[family]).save_pretrained(tmp_path / "pruned")
    export = export_folder(tmp_path / "pruned", tmp_path / "export", format="remote")
    out = tmp_path / "image.npy"
    result = subprocess.run([sys.executable, "-c", REMOTE_LORA, str(export), str(folder), str(out), PROMPT,
                             json.dumps(CALL)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), _reference(family, folder), atol=1e-4)


def test_convert_lora_refuses_loras_it_cannot_convert(tmp_path, capsys):
    """A LoRA for another (deeper) model, damaged adapter metadata or a wrongly shaped text modulation: one clear
    error each, and nothing written."""
    import json

    from safetensors.torch import save_file

    from diffusers_hprune.cli import main
    from diffusers_hprune.hub import export_folder

    prune_pipeline(_pipe("sd3"), STOCK_PLANS["sd3"]).save_pretrained(tmp_path / "pruned")
    export = export_folder(tmp_path / "pruned", tmp_path / "export", format="stock")
    pair = {"lora_A.weight": torch.zeros(4, 32), "lora_B.weight": torch.zeros(32, 4)}

    def lora(name, modules, metadata=None, extra=None):
        tensors = {f"transformer.{m}.{k}": v.clone() for m in modules for k, v in pair.items()}
        save_file({**tensors, **(extra or {})}, str(tmp_path / name), metadata=metadata)
        return str(tmp_path / name)

    good = "transformer_blocks.0.attn.to_q"
    cases = {
        "deeper": (lora("deeper.safetensors", [good, "transformer_blocks.12.attn.to_q"]),
                   r"adapters for transformer_blocks\.12, which the base model \(4 transformer_blocks\) does not have"),
        "no index": (lora("noindex.safetensors", [good, "transformer_blocks.x.attn.to_q"]),
                     r"adapters for transformer_blocks\.x, which the base model"),
        "metadata not JSON": (lora("badjson.safetensors", [good], {"lora_adapter_metadata": "{not json"}),
                              "lora_adapter_metadata is not JSON"),
        "metadata a list": (lora("list.safetensors", [good], {"lora_adapter_metadata": "[1, 2]"}),
                            "lora_adapter_metadata is a JSON list"),
        "target_modules not names": (
            lora("names.safetensors", [good], {"lora_adapter_metadata": json.dumps({"target_modules": [1, None]})}),
            "target_modules that are not all names"),
        "modulation rows": (lora("rows.safetensors", [good], extra={
            "transformer.transformer_blocks.2.norm1_context.linear.lora_B.weight": torch.zeros(5, 4),
            "transformer.transformer_blocks.2.norm1_context.linear.lora_A.weight": torch.zeros(4, 32)}),
            r"has shape \(5, 4\); an SD3 block's text modulation has 6 chunks"),
    }
    for what, (path, message) in cases.items():
        out = tmp_path / f"out-{what}.safetensors"
        assert main(["convert-lora", path, "--to", str(export), "--out", str(out)]) == 2, what
        assert re.search(message, capsys.readouterr().err), what
        assert not out.exists() and not list(tmp_path.glob(".out-*")), what
