"""Each private name or message text of another library that ``utils.compat`` relies on, checked against the installed
versions: a release that changes one fails here, not silently in a user's run."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from diffusers_hprune import toy
from diffusers_hprune.utils import compat

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                pos_embed_max_size=16)


def test_storage_identity_is_one_per_storage_on_every_device():
    for device in ("cpu", "meta"):
        a, b = torch.zeros(4, 4, device=device), torch.zeros(4, 4, device=device)
        assert compat.storage_identity(a) == compat.storage_identity(a[1:]) == compat.storage_identity(a.t())
        assert compat.storage_identity(a) != compat.storage_identity(b)


def test_meta_flash_attention_is_attention():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(compat.meta_flash_attention(q, k, v, 0.0, False, None), expected, atol=1e-5)
    meta = compat.meta_flash_attention(*(t.to("meta") for t in (q, k, v)), 0.0, False, None)
    assert meta.device.type == "meta" and meta.shape == expected.shape


def test_tree_leaves_and_dispatch_modes():
    a, b = torch.ones(1), torch.zeros(2)
    assert compat.tree_leaves({"x": [a, (b, 3)]}) == [a, b, 3]
    seen = []

    class Record(compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        torch.ones(3) + 1
    assert torch.ops.aten.add.Tensor in seen


def test_persistent_buffer_is_what_the_state_dict_holds():
    module = torch.nn.Module()
    module.register_buffer("kept", torch.ones(1))
    module.register_buffer("dropped", torch.ones(1), persistent=False)
    assert compat.persistent_buffer(module, "kept") and not compat.persistent_buffer(module, "dropped")
    assert set(module.state_dict()) == {"kept"}


def test_execution_device_of_a_pipeline(tiny_pipe):
    assert compat.execution_device(tiny_pipe) == torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers_hprune.toy.components import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


def test_feed_forward_chunking_of_a_stock_block():
    model = SD3Transformer2DModel(**TINY_SD3)
    block = model.transformer_blocks[0]
    assert compat.feed_forward_chunking(block) == (None, 0)
    block.set_chunk_feed_forward(2, dim=1)
    assert compat.feed_forward_chunking(block) == (2, 1)


def test_a_pruned_blocks_chunked_feed_forward_is_diffusers_own():
    """The pruned block chunks its feed-forward itself (public torch only); it computes what Diffusers' does."""
    from diffusers_hprune import PrunePlan, prune_transformer

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3).eval()
    pruned = prune_transformer(model, PrunePlan(family="sd3", num_blocks=2, removed_components={0: ["ff_context"]}))
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([3.0]))
    with torch.no_grad():
        whole = pruned(**inputs).sample
        for block in pruned.transformer_blocks:
            block.set_chunk_feed_forward(2, dim=1)
        chunked = pruned(**inputs).sample
        block = pruned.transformer_blocks[0]  # the pruned one (no ff_context)
        assert compat.feed_forward_chunking(block) == (2, 1)
        x = torch.randn(1, 16, 16)
        assert torch.allclose(block._feed_forward(block.ff, x), block.ff(x), atol=1e-6)
    assert torch.allclose(whole, chunked, atol=1e-5)
    block.set_chunk_feed_forward(3, dim=1)
    with pytest.raises(ValueError, match="not a multiple of the chunk size 3"):
        block._feed_forward(block.ff, torch.randn(1, 16, 16))


def test_block_streams_are_registered_with_diffusers_cache_hooks():
    from diffusers.hooks._helpers import TransformerBlockRegistry

    class Block(torch.nn.Module):
        pass

    compat.register_block_streams([Block], text_index=0, image_index=1)
    metadata = TransformerBlockRegistry.get(Block)
    assert metadata.return_hidden_states_index == 1 and metadata.return_encoder_hidden_states_index == 0
    compat.register_block_streams([Block])  # a second registration is a no-op
    assert TransformerBlockRegistry.get(Block) is metadata


def test_cache_context_set_sees_diffusers_cache_context():
    from diffusers.hooks import FirstBlockCacheConfig

    from diffusers_hprune import PrunePlan, prune_transformer

    model = prune_transformer(SD3Transformer2DModel(**TINY_SD3), PrunePlan(family="sd3", num_blocks=2))
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    assert not compat.cache_context_set(model)
    with model.cache_context("cond"):
        assert compat.cache_context_set(model)
    assert not compat.cache_context_set(model)


def test_packed_rows_are_what_diffusers_tensor_parallelism_reads():
    from diffusers.hooks import tensor_parallel

    linear = torch.nn.Linear(6, 4)
    compat.mark_packed_rows(linear, [2, 4])
    assert tensor_parallel._packed_blocks(tensor_parallel.PackedRowwiseParallel(), linear, "proj_out") == [2, 4]


def test_flux_latent_packing_round_trips():
    latents = torch.randn(2, 16, 8, 6)
    packed = compat.flux_pack_latents(latents)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(compat.flux_unpack_latents(packed, 8, 6, 1), latents)
    ids = compat.flux_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[:, 1].max() == 3 and ids[:, 2].max() == 2


def test_quantize_in_place_gives_the_model_diffusers_loads():
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    from diffusers_hprune.utils.nf4_settings import nf4_config

    model = SD3Transformer2DModel(**TINY_SD3)
    compat.quantize_in_place(BnB4BitDiffusersQuantizer(nf4_config((), None), pre_quantized=False), model, "cpu")
    assert isinstance(model.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.uint8
    assert model.hf_quantizer is not None and model.is_quantized
    with pytest.raises(ValueError, match="quantized"):  # Diffusers refuses to cast it, as a loaded NF4 model
        model.to(torch.float16)


def test_diffusers_unused_weights_notice_is_the_text_the_filter_drops(tmp_path):
    model = SD3Transformer2DModel(**TINY_SD3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({**weights, "extra.weight": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger(compat.UNUSED_WEIGHTS_LOGGER)
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        SD3Transformer2DModel.from_pretrained(tmp_path)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    notices = [r for r in records if "extra.weight" in r.getMessage()]
    assert len(notices) == 1
    assert not compat.UnusedWeightsNotice("SD3Transformer").filter(notices[0])
    assert compat.UnusedWeightsNotice("HierarchicalPruned").filter(notices[0])


def test_shape_mismatch_errors_are_recognised_and_read(tmp_path):
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(4, 2), "bias": torch.zeros(3)})
    assert compat.is_shape_mismatch(torch_error.value)
    assert compat.shape_mismatches(torch_error.value) == [("weight", "torch.Size([4, 2])", "torch.Size([3, 2])")]

    model = SD3Transformer2DModel(**TINY_SD3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    weights["proj_out.bias"] = torch.zeros(5)
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises((RuntimeError, ValueError)) as diffusers_error:
        SD3Transformer2DModel.from_pretrained(tmp_path)
    assert compat.is_shape_mismatch(diffusers_error.value)
    assert compat.shape_mismatches(diffusers_error.value) == [("proj_out.bias", "torch.Size([5])", "torch.Size([16])")]
    assert not compat.is_shape_mismatch(ValueError("something else"))


def test_forget_other_precision_lets_another_accelerator_start():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    Accelerator(mixed_precision="bf16", cpu=True)
    assert AcceleratorState._shared_state.get("_mixed_precision") == "bf16"
    group = PartialState._shared_state.get("backend")
    compat.forget_other_precision("bf16")  # the same precision: kept
    assert AcceleratorState._shared_state.get("_mixed_precision") == "bf16"
    compat.forget_other_precision("no")
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    assert PartialState._shared_state.get("backend") == group


def test_bitsandbytes_generic_dequantisation_is_ours():
    import bitsandbytes.functional as F

    from diffusers_hprune.utils.nf4_cpu import cpu_dequantize, dequantize_4bit

    assert compat.bitsandbytes_generic_dequantize() is not None
    weight = torch.randn(16, 70)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours = dequantize_4bit(packed, state.absmax, 64, "nf4", weight.shape, torch.float32)
    theirs = cpu_dequantize(packed, state.absmax, 64, "nf4", weight.shape, torch.float32)
    assert torch.equal(ours, theirs)
    assert (ours - weight).abs().max() < 0.5


def test_vae_tile_settings_are_what_tiled_decoding_reads():
    """`vae_tile_settings` / `set_vae_tile_settings`: AutoencoderKL's tiling switch and tile sizes (pixels, latents),
    which `enable_tiling` does not take; its tiled decode cuts the latents by the latent size set."""
    vae = toy.load_pipeline("sd3").vae
    assert compat.vae_tile_settings(vae) == (False, vae.config.sample_size, vae.tile_latent_min_size)
    compat.set_vae_tile_settings(vae, (True, 64, 32))
    shapes = []
    vae.decoder.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        vae.decode(torch.randn(1, vae.config.latent_channels, 64, 64))
    assert compat.vae_tile_settings(vae) == (True, 64, 32) and max(shapes) == (32, 32) and len(shapes) > 1
