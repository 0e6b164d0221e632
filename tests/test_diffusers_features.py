"""Diffusers' own speed and memory features on pruned models (the table in docs/sharing.md).

Where the plan removes whole blocks only, the stock model with those blocks gone (the stock
export) is the reference: a feature must do on the pruned model exactly what it does there.
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
from diffusers import DiffusionPipeline
from helpers import tiny_pipeline
from PIL import Image
from safetensors import safe_open

from diffusers_hprune import PrunePlan, get_family, prune_pipeline
from diffusers_hprune.architecture import RemovedBlock

CALL = dict(height=16, width=16, num_inference_steps=4, max_sequence_length=16, output_type="np")
PROMPT = "a red circle left of a blue square"
BLOCKS_ONLY = {
    "sd3": PrunePlan(removed_blocks=[1, 3], family="sd3", num_blocks=4),
    "flux": PrunePlan(removed_blocks=[1, 3], family="flux", num_blocks=5),  # double 1, single 1
}
WITH_COMPONENTS = {
    "sd3": PrunePlan(removed_blocks=[1], removed_components={0: ["attn"], 2: ["ff_context", "norm1"]}, family="sd3",
                     num_blocks=4),
    "flux": PrunePlan(removed_components={0: ["ff"], 1: ["norm1_context"], 3: ["mlp"], 4: ["attn"]}, family="flux",
                      num_blocks=5),
}
def _pipe(family):
    """SD3's inpaint pipeline wants 16 latent channels."""
    return tiny_pipeline(family, **({"in_channels": 16, "out_channels": 16} if family == "sd3" else {}))


def _image(pipe, **extra):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**CALL, **extra}).images


def _pruned(family, plan):
    pipe = prune_pipeline(_pipe(family), plan)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_pipeline(family, plan):
    """The stock pipeline whose transformer is the pruned one with its removed blocks gone (the stock export)."""
    pruned = _pruned(family, plan)
    fam = get_family(family)
    config = dict(pruned.transformer.config)
    stock = fam.base_class.from_config(fam.stock_config(config, plan))
    stock.load_state_dict(fam.stock_state_dict(pruned.transformer.state_dict(), config, plan), strict=True)
    pipe = _pipe(family)
    pipe.transformer = stock.eval()
    return pipe


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compile_repeated_blocks_compiles_every_block(family):
    pipe = _pruned(family, WITH_COMPONENTS[family])
    expected = _image(pipe)
    pipe.transformer.compile_repeated_blocks(backend="eager")  # eager: no C compiler needed; the same regions
    blocks = get_family(family).block_modules(pipe.transformer)
    kinds = {type(b).__name__ for b in blocks if not isinstance(b, RemovedBlock)}
    assert any(name.startswith("Pruned") for name in kinds) and len(kinds) >= 2
    assert all(b._compiled_call_impl is not None for b in blocks if not isinstance(b, RemovedBlock))
    np.testing.assert_allclose(_image(pipe), expected, atol=1e-6)


def test_first_block_cache_on_pruned_flux_matches_the_stock_model():
    from diffusers.hooks import FirstBlockCacheConfig

    plan = BLOCKS_ONLY["flux"]
    pruned, stock = _pruned("flux", plan), _stock_pipeline("flux", plan)
    uncached = _image(pruned)
    np.testing.assert_allclose(_image(stock), uncached, atol=1e-5)
    for pipe in (pruned, stock):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # reuse the cache after step 1
    cached = _image(pruned)
    assert np.abs(cached - uncached).max() > 1e-3  # the cache was used
    np.testing.assert_allclose(cached, _image(stock), atol=1e-5)  # and exactly as on the stock model
    pruned.transformer.disable_cache()
    np.testing.assert_allclose(_image(pruned), uncached, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cache_hooks_run_on_blocks_with_components_removed(family):
    from diffusers import PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = _pruned(family, WITH_COMPONENTS[family])
    uncached = _image(pipe)
    configs = {
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001),
                                               current_timestep_callback=lambda: 500),
    }
    if family == "flux":  # SD3's last block returns no text stream, which First Block Cache needs (stock SD3 too)
        configs["first-block"] = FirstBlockCacheConfig(threshold=10.0)
    for name, config in configs.items():
        pipe.transformer.enable_cache(config)
        cached = _image(pipe)
        assert np.isfinite(cached).all() and np.abs(cached - uncached).max() > 1e-4, name  # active, and it ran
        pipe.transformer.disable_cache()
        np.testing.assert_allclose(_image(pipe), uncached, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_offloading_and_layerwise_casting_match_the_stock_model(family):
    plan = BLOCKS_ONLY[family]
    expected = _image(_pruned(family, plan))
    cpu = torch.device("cpu")
    for offload in ("block_level", "leaf_level"):
        pipe = _pruned(family, WITH_COMPONENTS[family])
        reference = _image(pipe)
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload,
                                              **({"num_blocks_per_group": 1} if offload == "block_level" else {}))
        np.testing.assert_allclose(_image(pipe), reference, atol=1e-6, err_msg=offload)
    pipe = _pruned(family, plan)
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(_image(pipe), expected, atol=1e-6)
    # Weights stored in fp8, computed in fp32: the same on the pruned and on the stock model.
    pruned, stock = _pruned(family, plan), _stock_pipeline(family, plan)
    for pipe in (pruned, stock):
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert pruned.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    cast = _image(pruned)
    assert np.abs(cast - expected).max() > 1e-4
    np.testing.assert_allclose(cast, _image(stock), atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pipe_into_img2img_and_inpaint(family):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    import diffusers_hprune as hp

    pipe = _pruned(family, WITH_COMPONENTS[family])
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    mask = Image.new("L", (16, 16), 255)
    name = "SD3" if family == "sd3" else "Flux"
    stock_i2i, stock_inpaint = (("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline") if family == "sd3"
                                else ("FluxImg2ImgPipeline", "FluxInpaintPipeline"))
    for auto, cls, stock, extra in (
        (AutoPipelineForImage2Image, getattr(hp, f"HierarchicalPruned{name}Img2ImgPipeline"), stock_i2i,
         {"image": image, "strength": 0.8}),
        (AutoPipelineForInpainting, getattr(hp, f"HierarchicalPruned{name}InpaintPipeline"), stock_inpaint,
         {"image": image, "mask_image": mask, "strength": 0.8}),
    ):
        ours = cls.from_pipe(pipe)
        assert type(ours) is cls and ours.transformer is pipe.transformer  # shared, not copied
        assert type(auto.from_pipe(pipe)) is cls
        assert ours.prune_plan == WITH_COMPONENTS[family]
        # The stock class takes it when the transformer is passed, as Diffusers' message says.
        import diffusers

        theirs = getattr(diffusers, stock).from_pipe(pipe, transformer=pipe.transformer)
        np.testing.assert_allclose(_image(ours, **extra), _image(theirs, **extra), atol=1e-6)
    assert type(AutoPipelineForText2Image.from_pipe(cls.from_pipe(pipe))).__name__ == f"HierarchicalPruned{name}Pipeline"


AUTO = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import diffusers_hprune  # noqa: F401  (Diffusers' AutoPipeline tables are not loaded yet at this point)
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
    pipes = [auto.from_pretrained(sys.argv[1]) for auto in
             (AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting)]
    pipes[0].set_progress_bar_config(disable=True)
    np.save(sys.argv[2], pipes[0](sys.argv[3], generator=torch.Generator().manual_seed(0), **json.loads(sys.argv[4])).images)
    print(json.dumps([type(p).__name__ for p in pipes]))
    """
)


@pytest.mark.slow  # a fresh process: CI's second step
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_auto_pipelines_load_a_pruned_folder_in_a_fresh_process(family, tmp_path):
    pipe = _pruned(family, WITH_COMPONENTS[family])
    pipe.save_pretrained(tmp_path / "pruned")
    out = tmp_path / "image.npy"
    result = subprocess.run([sys.executable, "-c", AUTO, str(tmp_path / "pruned"), str(out), PROMPT, json.dumps(CALL)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    name = "SD3" if family == "sd3" else "Flux"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        f"HierarchicalPruned{name}Pipeline", f"HierarchicalPruned{name}Img2ImgPipeline",
        f"HierarchicalPruned{name}InpaintPipeline"]
    np.testing.assert_allclose(np.load(out), _image(pipe), atol=1e-5)  # the in-memory model's image


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_save_pretrained_passes_variant_shard_size_and_serialization_to_the_pruned_transformer(
        family, tmp_path):
    """Issue 32: the common pattern `save_pretrained(d)` then `.to(float16).save_pretrained(d, variant="fp16")` kept
    the fp32 weights only when the pruned transformer's save took `variant` (Diffusers passes it by signature)."""
    pipe = prune_pipeline(tiny_pipeline(family), WITH_COMPONENTS[family])
    pipe.save_pretrained(tmp_path)
    default = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    fp32 = default.read_bytes()
    pipe.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert default.read_bytes() == fp32  # the default weights are untouched
    variant = tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors"
    with safe_open(str(variant), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float16}
    loaded = DiffusionPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16).transformer
    assert type(loaded).__name__ == type(pipe.transformer).__name__
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    sharded = tmp_path / "sharded"
    pipe.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(p.name for p in (sharded / "transformer").glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
