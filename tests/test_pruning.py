"""prune_transformer: the pruned forward equals the original with those parts removed (DESIGN.md section 5)."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_removal, transformer_inputs

from diffusers_hprune import (
    BLOCK,
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Transformer2DModel,
    PrunePlan,
    get_family,
    prune_transformer,
)
from diffusers_hprune.architecture import RemovedBlock

# Tiny SD3: 4 blocks, 0 and 1 dual-attention (SD3.5 Medium style), 3 is context_pre_only.
SD3_CASES = [(i, c) for i in (0, 2, 3) for c in ("attn", "ff", "ff_context", "norm1", "norm1_context") if (i, c) != (3, "ff_context")]
SD3_CASES += [(i, BLOCK) for i in (0, 1, 2, 3)]
# Tiny FLUX: blocks 0, 1 double-stream; 2, 3, 4 single-stream.
FLUX_CASES = [(0, c) for c in ("attn", "ff", "ff_context", "norm1", "norm1_context")]
FLUX_CASES += [(i, c) for i in (2, 4) for c in ("attn", "mlp", "norm")]
FLUX_CASES += [(i, BLOCK) for i in (0, 1, 2, 4)]


def _plan_for(transformer, index, component):
    family = get_family(transformer)
    n = family.num_blocks(transformer.config)
    if component == BLOCK:
        return PrunePlan(removed_blocks=[index], family=family.name, num_blocks=n)
    return PrunePlan(removed_components={index: [component]}, family=family.name, num_blocks=n)


def _outputs(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def _check_against_reference(transformer, plan):
    inputs = transformer_inputs(transformer)
    with reference_removal(transformer, plan.removed_blocks, plan.removed_components):
        expected = _outputs(transformer, inputs)
    full = _outputs(transformer, inputs)
    pruned = prune_transformer(transformer, plan)
    got = _outputs(pruned, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The removal must matter, otherwise the comparison above proves nothing.
    assert (full - expected).abs().max() > 1e-4
    return pruned


@pytest.mark.parametrize("index,component", SD3_CASES)
def test_sd3_removal_matches_reference(sd3_pipeline, index, component):
    transformer = sd3_pipeline.transformer
    pruned = _check_against_reference(transformer, _plan_for(transformer, index, component))
    assert isinstance(pruned, HierarchicalPrunedSD3Transformer2DModel)


@pytest.mark.parametrize("index,component", FLUX_CASES)
def test_flux_removal_matches_reference(flux_pipeline, index, component):
    transformer = flux_pipeline.transformer
    pruned = _check_against_reference(transformer, _plan_for(transformer, index, component))
    assert isinstance(pruned, HierarchicalPrunedFluxTransformer2DModel)


def test_sd3_combined_plan_matches_reference(sd3_pipeline):
    t = sd3_pipeline.transformer
    plan = PrunePlan(
        removed_blocks=[1],
        removed_components={0: ["attn", "norm1_context"], 2: ["ff", "norm1", "ff_context"], 3: ["norm1"]},
        family="sd3",
        num_blocks=4,
    )
    _check_against_reference(t, plan)


def test_flux_combined_plan_matches_reference(flux_pipeline):
    t = flux_pipeline.transformer
    plan = PrunePlan(
        removed_blocks=[3],
        removed_components={0: ["ff_context", "norm1"], 1: ["attn"], 2: ["mlp", "norm"], 4: ["attn"]},
        family="flux",
        num_blocks=5,
    )
    _check_against_reference(t, plan)


@pytest.mark.parametrize("fixture", ["sd3_pipeline", "flux_pipeline"])
def test_empty_plan_gives_identical_outputs(fixture, request):
    t = request.getfixturevalue(fixture).transformer
    family = get_family(t)
    pruned = prune_transformer(t, family.empty_plan(t.config))
    inputs = transformer_inputs(t)
    assert torch.equal(_outputs(pruned, inputs), _outputs(t, inputs))
    assert pruned.prune_plan.is_empty


@pytest.mark.parametrize("fixture", ["sd3_pipeline", "flux_pipeline"])
def test_parameter_count_is_original_minus_reported_parts(fixture, request):
    t = request.getfixturevalue(fixture).transformer
    family = get_family(t)
    specs = family.block_specs(t.config)
    blocks = family.block_modules(t)
    if family.name == "sd3":
        plan = PrunePlan(removed_blocks=[1], removed_components={0: ["attn", "ff"], 3: ["norm1_context"]}, family="sd3", num_blocks=4)
    else:
        plan = PrunePlan(removed_blocks=[1], removed_components={0: ["norm1"], 2: ["mlp"], 4: ["attn", "norm"]}, family="flux", num_blocks=5)
    plan = family.check_plan(plan, t.config)  # what the pruned model holds: SD3 block 0 loses its unread norm1 too
    if family.name == "sd3":
        assert plan.removed_components[0] == ["attn", "ff", "norm1"]
    expected_removed = sum(family.component_numel(blocks[i], specs[i], BLOCK, t.config) for i in plan.removed_blocks)
    expected_removed += sum(
        family.component_numel(blocks[i], specs[i], c, t.config) for i, names in plan.removed_components.items() for c in names
    )
    assert expected_removed > 0
    original = sum(p.numel() for p in t.parameters())
    pruned = prune_transformer(t, plan)
    assert sum(p.numel() for p in pruned.parameters()) == original - expected_removed


def test_components_and_rest_add_up_to_the_block(flux_pipeline, sd3_pipeline):
    for t in (sd3_pipeline.transformer, flux_pipeline.transformer):
        family = get_family(t)
        for spec, block in zip(family.block_specs(t.config), family.block_modules(t)):
            total = family.component_numel(block, spec, BLOCK, t.config)
            parts = sum(family.component_numel(block, spec, c, t.config) for c in spec.components)
            bias = block.proj_out.bias.numel() if spec.kind == "single" else 0  # owned by the block as a whole
            assert parts + bias == total, spec


def test_removed_parts_have_no_keys_and_kept_keys_keep_indices(sd3_pipeline, flux_pipeline):
    t = sd3_pipeline.transformer
    plan = PrunePlan(removed_blocks=[1], removed_components={2: ["ff_context", "norm1"]}, family="sd3", num_blocks=4)
    pruned = prune_transformer(t, plan)
    keys = set(pruned.state_dict())
    assert not any(k.startswith("transformer_blocks.1.") for k in keys)
    assert not any(k.startswith(("transformer_blocks.2.ff_context.", "transformer_blocks.2.norm1.")) for k in keys)
    assert "transformer_blocks.2.norm1_context.linear.weight" in keys
    assert "transformer_blocks.3.attn.to_q.weight" in keys  # original index, not renumbered
    assert keys == {k for k in t.state_dict() if not k.startswith(("transformer_blocks.1.", "transformer_blocks.2.ff_context.", "transformer_blocks.2.norm1."))}
    assert isinstance(pruned.transformer_blocks[1], RemovedBlock)
    assert list(pruned.transformer_blocks[1].parameters()) == []

    f = flux_pipeline.transformer
    plan = PrunePlan(removed_components={3: ["mlp"]}, family="flux", num_blocks=5)
    pruned = prune_transformer(f, plan)
    sd = pruned.state_dict()
    assert "single_transformer_blocks.1.proj_mlp.weight" not in sd
    dim = f.config.num_attention_heads * f.config.attention_head_dim
    w = f.single_transformer_blocks[1].proj_out.weight
    assert sd["single_transformer_blocks.1.proj_out.weight"].shape == (dim, dim)
    assert torch.equal(sd["single_transformer_blocks.1.proj_out.weight"], w[:, :dim])


def test_pruned_model_shares_kept_weights_and_trains(sd3_pipeline):
    t = sd3_pipeline.transformer
    plan = PrunePlan(removed_blocks=[2], removed_components={0: ["ff"]}, family="sd3", num_blocks=4)
    pruned = prune_transformer(t, plan)
    assert pruned.transformer_blocks[1].attn.to_q.weight.data_ptr() == t.transformer_blocks[1].attn.to_q.weight.data_ptr()
    # Gradient checkpointing goes through the stock forward with our blocks.
    pruned.train()
    pruned.enable_gradient_checkpointing()
    inputs = transformer_inputs(pruned)
    out = pruned(**inputs).sample
    out.pow(2).mean().backward()
    grads = [p.grad for p in pruned.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    pruned.eval()
    pruned.disable_gradient_checkpointing()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).sample, out.detach(), atol=1e-6, rtol=1e-6)


def test_block_whose_branches_are_all_removed_becomes_a_removed_block(sd3_pipeline, flux_pipeline):
    pruned = prune_transformer(
        sd3_pipeline.transformer, PrunePlan(removed_components={2: ["attn", "ff", "ff_context"]}, family="sd3", num_blocks=4)
    )
    assert pruned.prune_plan.removed_blocks == [2] and pruned.prune_plan.removed_components == {}
    pruned = prune_transformer(
        flux_pipeline.transformer, PrunePlan(removed_components={4: ["attn", "mlp"]}, family="flux", num_blocks=5)
    )
    assert pruned.prune_plan.removed_blocks == [4]


def test_non_persistent_buffers_come_from_the_original():
    from diffusers import SD3Transformer2DModel

    from diffusers_hprune.toy.components import tiny_sd3_transformer_config

    t = SD3Transformer2DModel(**tiny_sd3_transformer_config(pos_embed_max_size=None, sample_size=8))
    assert "pos_embed.pos_embed" not in t.state_dict()  # non-persistent without pos_embed_max_size
    t.pos_embed.pos_embed.mul_(2)  # a value that a fresh initialisation would not reproduce
    pruned = prune_transformer(t, PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4))
    assert torch.equal(pruned.pos_embed.pos_embed, t.pos_embed.pos_embed)
    inputs = transformer_inputs(t)
    with reference_removal(t, [1]):
        expected = _outputs(t, inputs)
    torch.testing.assert_close(_outputs(pruned, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("removed", [{0: ["norm1_context"]}, {0: ["norm1_context", "attn"]}, {2: ["norm"]}])
def test_batch_one_text_stream_is_broadcast(flux_pipeline, removed):
    """FluxPipeline's true-CFG call feeds one negative text embedding for a batch of latents."""
    from helpers import transformer_inputs

    from diffusers_hprune import PrunePlan, prune_transformer

    transformer = flux_pipeline.transformer
    pruned = prune_transformer(transformer, PrunePlan(removed_components=removed, family="flux", num_blocks=5))
    inputs = transformer_inputs(transformer, batch=2)
    inputs = {k: torch.cat([v, v[:1]]) if k in ("hidden_states", "timestep", "pooled_projections", "guidance")
              and isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # a batch of 3
    one = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:1],
               pooled_projections=inputs["pooled_projections"])
    expanded = dict(one, encoder_hidden_states=one["encoder_hidden_states"].expand(3, -1, -1))
    with torch.no_grad():
        a = pruned(**one, return_dict=False)[0]
        b = pruned(**expanded, return_dict=False)[0]
    assert a.shape[0] == 3
    # Equal up to float32 rounding: a stride-0 (expanded) batch may take another matmul kernel on some CPUs.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- a modulation whose every reader is removed goes with them (issue 31) ------------------------------------------
# (block, removed) -> the modulation the plan adds. Tiny SD3: blocks 0-2 joint, 3 the context_pre_only last block
# (its norm1_context feeds only attn); tiny FLUX: 0-1 double, 2-4 single (norm feeds attn and mlp: never left alone).
UNREAD = [
    ("sd3", 0, ["attn", "ff_context"], ["norm1_context"]),
    ("sd3", 2, ["attn", "ff"], ["norm1"]),
    ("sd3", 3, ["attn"], ["norm1_context"]),
    ("sd3", 2, ["attn"], []),
    ("sd3", 2, ["ff", "ff_context"], []),
    ("flux", 0, ["attn", "ff_context"], ["norm1_context"]),
    ("flux", 1, ["attn", "ff"], ["norm1"]),
    ("flux", 0, ["attn"], []),
    ("flux", 3, ["attn"], []),
    ("flux", 4, ["mlp", "norm"], []),
]


@pytest.mark.parametrize("family_name,index,removed,added", UNREAD)
def test_a_modulation_nobody_reads_is_removed_with_its_readers(family_name, index, removed, added, request):
    """The normalised plan removes it (so it counts, shows and never sits untrained); the outputs stay those of
    removing only the named parts."""
    t = request.getfixturevalue(f"{family_name}_pipeline").transformer
    family = get_family(t)
    plan = family.check_plan(PrunePlan(removed_components={index: removed}, family=family_name,
                                       num_blocks=family.num_blocks(t.config)), t.config)
    assert plan.removed_components[index] == sorted(removed + added, key=family.component_names.index)
    assert all(c in plan.describe() for c in added)
    pruned = prune_transformer(t, plan)
    paths = [name for name, _ in pruned.named_parameters()]
    block = family.block_specs(t.config)[index].path
    for c in added:
        assert not any(p.startswith(f"{block}.{c}.") for p in paths), c
    inputs = transformer_inputs(t)
    with torch.no_grad(), reference_removal(t, removed_components={index: removed}):
        expected = t(**inputs, return_dict=False)[0]
    with torch.no_grad():
        got = pruned(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family_name,index,removed", [("sd3", 0, ["attn", "ff_context"]), ("sd3", 3, ["attn"]),
                                                       ("flux", 1, ["attn", "ff"])])
def test_a_folder_saved_with_the_unread_modulation_still_loads(family_name, index, removed, request, tmp_path):
    """Before the rule a plan kept the modulation, and its folder holds the weights and the old plan: it loads (they
    are skipped) and computes what it computed."""
    import json

    from safetensors.torch import load_file, save_file

    t = request.getfixturevalue(f"{family_name}_pipeline").transformer
    family = get_family(t)
    old_plan = PrunePlan(removed_components={index: removed}, family=family_name,
                         num_blocks=family.num_blocks(t.config))
    pruned = prune_transformer(t, old_plan)
    pruned.save_pretrained(tmp_path)
    # Rewrite the folder as the old code wrote it: the plan as given, the modulation's weights, no marker for it.
    (modulation,) = family.unread_modulations(family.block_specs(t.config)[index], removed)
    block = family.block_specs(t.config)[index].path
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.startswith(f"{block}.{modulation}.")}
    state.update({k: v.contiguous() for k, v in t.state_dict().items() if k.startswith(f"{block}.{modulation}.")})
    save_file(state, weights)
    config = json.loads((tmp_path / "config.json").read_text())
    config["prune_plan"] = old_plan.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))

    cls = type(pruned)
    loaded = cls.from_pretrained(tmp_path)
    assert modulation in loaded.prune_plan.removed_components[index]
    inputs = transformer_inputs(t)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, return_dict=False)[0], pruned(**inputs, return_dict=False)[0])
