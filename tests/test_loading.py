"""Pruned pipelines save and load again through every ordinary Diffusers path, in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import MIXED_PLANS, fill_hf_cache

from diffusers_hprune import (
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Pipeline,
    HierarchicalPrunedSD3Transformer2DModel,
    PrunePlan,
    prune_pipeline,
)

PROMPT = "a red circle left of a blue square"
CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")

LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    how, source, out = sys.argv[1:4]
    import diffusers_hprune
    from diffusers import DiffusionPipeline
    if how == "class":
        pipe = getattr(diffusers_hprune, sys.argv[4]).from_pretrained(source)
    else:
        pipe = DiffusionPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    call = json.loads(sys.argv[5])
    image = pipe(sys.argv[6], generator=torch.Generator().manual_seed(0), **call).images
    np.save(out, image)
    print(json.dumps({
        "pipeline": type(pipe).__name__,
        "transformer": type(pipe.transformer).__name__,
        "plan": pipe.transformer.prune_plan.to_dict(),
    }))
    """
)

PLANS = MIXED_PLANS
CLASSES = {
    "sd3": (HierarchicalPrunedSD3Pipeline, HierarchicalPrunedSD3Transformer2DModel),
    "flux": (HierarchicalPrunedFluxPipeline, HierarchicalPrunedFluxTransformer2DModel),
}


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.fixture(scope="module", params=["sd3", "flux"])
def saved(request, tmp_path_factory):
    from diffusers_hprune.toy.components import tiny_flux_pipeline, tiny_sd3_pipeline

    family = request.param
    pipe = (tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline)(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pruned = prune_pipeline(pipe, PLANS[family])
    folder = tmp_path_factory.mktemp(f"pruned-{family}")
    pruned.save_pretrained(folder)
    return family, folder, _image(pruned), _image(pipe)


def _load_in_fresh_process(tmp_path, how, source, extra=None, env=None):
    out = tmp_path / "image.npy"
    args = [sys.executable, "-c", LOADER, how, str(source), str(out), extra or "", json.dumps(CALL), PROMPT]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_saved_folder_describes_itself(saved):
    family, folder, _, _ = saved
    index = json.loads((folder / "model_index.json").read_text())
    pipe_cls, model_cls = CLASSES[family]
    assert index["_class_name"] == pipe_cls.__name__
    assert index["transformer"] == ["diffusers_hprune", model_cls.__name__]
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["_class_name"] == model_cls.__name__
    assert PrunePlan.from_dict(config["prune_plan"]) == PLANS[family]
    assert list((folder / "transformer").glob("*.safetensors")) and not list(folder.rglob("*.bin"))


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
@pytest.mark.parametrize("how", ["auto", "class"])
def test_fresh_process_loads_folder_and_draws_the_same_image(saved, tmp_path, how):
    family, folder, expected, unpruned = saved
    pipe_cls, model_cls = CLASSES[family]
    info, image = _load_in_fresh_process(tmp_path, how, folder, extra=pipe_cls.__name__)
    assert info["pipeline"] == pipe_cls.__name__ and info["transformer"] == model_cls.__name__
    assert PrunePlan.from_dict(info["plan"]) == PLANS[family]
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert np.abs(expected - unpruned).max() > 1e-3  # the pruning is visible in the image


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_fresh_process_loads_by_repo_id_from_offline_cache(saved, tmp_path):
    family, folder, expected, _ = saved
    cache = tmp_path / "hub"
    repo_id = f"someone/tiny-{family}-hpruned"
    fill_hf_cache(folder, repo_id, cache)
    for how in ("auto", "class"):
        info, image = _load_in_fresh_process(
            tmp_path, how, repo_id, extra=CLASSES[family][0].__name__, env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path)}
        )
        assert info["transformer"] == CLASSES[family][1].__name__
        np.testing.assert_allclose(image, expected, atol=1e-5)


def test_transformer_alone_round_trips(saved, tmp_path):
    family, folder, _, _ = saved
    model_cls = CLASSES[family][1]
    model = model_cls.from_pretrained(folder, subfolder="transformer")
    assert model.prune_plan == PLANS[family]
    model.save_pretrained(tmp_path / "t")
    again = model_cls.from_pretrained(tmp_path / "t")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_a_stock_class_handed_a_pruned_folder_stops_loudly(saved, low_cpu_mem_usage):
    """Not the full model with random weights in the removed parts: a shape error naming a removed part."""
    from safetensors import safe_open

    from diffusers_hprune import get_family

    family, folder, _, _ = saved
    fam = get_family(family)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    markers = fam.removal_markers(config, PLANS[family])
    assert len(markers) == len(PLANS[family].removed_blocks) + sum(map(len, PLANS[family].removed_components.values()))
    with safe_open(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_shape() == [0] for k in markers)  # one zero-size tensor per removed part
    named = "(" + "|".join(map(re.escape, markers)) + ").*torch.Size\\(\\[0\\]\\)"
    with pytest.raises((ValueError, RuntimeError), match=named):
        fam.base_class.from_pretrained(folder, subfolder="transformer", low_cpu_mem_usage=low_cpu_mem_usage)
    # The pruned class skips the markers: not in its weights, not reported as unexpected.
    model, info = CLASSES[family][1].from_pretrained(folder, subfolder="transformer", output_loading_info=True)
    assert info["unexpected_keys"] == [] and not set(markers) & set(model.state_dict())


def test_pruned_class_still_refuses_keys_that_are_no_markers(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusers_hprune import CheckpointMismatchError

    family, folder, _, _ = saved
    copy = tmp_path / "transformer"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "transformer" / "config.json").read_text())
    weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    weights["proj_out.extra"] = torch.zeros(3)
    save_file(weights, str(copy / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys .*proj_out\.extra"):
        CLASSES[family][1].from_pretrained(copy)
