"""Bad input gets a clear error that says what to do, and nothing is written or lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import folder_state, tiny_unet

from diffusers_hprune import (
    CheckpointMismatchError,
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Transformer2DModel,
    PlanError,
    PrunePlan,
    UnsupportedModelError,
    get_family,
    prune_pipeline,
    prune_transformer,
)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    after = module.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_unknown_transformer_class_lists_supported_families(tmp_path):
    unet = tiny_unet()
    plan = PrunePlan(removed_blocks=[0], family="sd3", num_blocks=4)
    with pytest.raises(UnsupportedModelError, match=r"UNet2DModel.*sd3 .*SD3Transformer2DModel.*flux .*FluxTransformer2DModel"):
        prune_transformer(unet, plan)
    with pytest.raises(UnsupportedModelError, match="Supported families"):
        get_family({"_class_name": "UNet2DConditionModel"})


def test_plan_for_another_family_or_block_count(sd3_pipeline, flux_pipeline):
    sd3, flux = sd3_pipeline.transformer, flux_pipeline.transformer
    before = _snapshot(sd3)
    with pytest.raises(PlanError, match="made for the 'flux' family"):
        prune_transformer(sd3, PrunePlan(removed_blocks=[0], family="flux", num_blocks=4))
    with pytest.raises(PlanError, match="with 38 blocks, but the model has 4 blocks"):
        prune_transformer(sd3, PrunePlan(removed_blocks=[0], family="sd3", num_blocks=38))
    with pytest.raises(PlanError, match="with 57 blocks, but the model has 5"):
        prune_transformer(flux, PrunePlan(removed_blocks=[20], family="flux", num_blocks=57))
    assert _unchanged(sd3, before)


def test_component_a_block_does_not_have(sd3_pipeline, flux_pipeline):
    with pytest.raises(PlanError, match=r"Block 3 \(transformer_blocks.3, a joint block\) has no component\(s\) \['ff_context'\]"):
        prune_transformer(sd3_pipeline.transformer, PrunePlan(removed_components={3: ["ff_context"]}, family="sd3", num_blocks=4))
    with pytest.raises(PlanError, match="its components are attn, mlp, norm"):
        prune_transformer(flux_pipeline.transformer, PrunePlan(removed_components={2: ["ff"]}, family="flux", num_blocks=5))
    with pytest.raises(PlanError, match="its components are attn, ff, ff_context"):
        prune_transformer(flux_pipeline.transformer, PrunePlan(removed_components={1: ["mlp"]}, family="flux", num_blocks=5))


def test_plan_whose_removals_leave_no_block(sd3_pipeline):
    plan = PrunePlan(removed_blocks=[0, 1, 2], removed_components={3: ["attn", "ff"]}, family="sd3", num_blocks=4)
    with pytest.raises(PlanError, match="removes all 4 blocks"):
        prune_transformer(sd3_pipeline.transformer, plan)


def test_failed_prune_loses_nothing(sd3_pipeline, tmp_path):
    before = _snapshot(sd3_pipeline.transformer)
    with pytest.raises(PlanError):
        prune_pipeline(sd3_pipeline, PrunePlan(removed_blocks=[9], family="sd3", num_blocks=10))
    assert _unchanged(sd3_pipeline.transformer, before)
    assert type(sd3_pipeline.transformer).__name__ == "SD3Transformer2DModel"
    with pytest.raises(PlanError):
        prune_transformer(sd3_pipeline.transformer, PrunePlan(removed_components={3: ["ff_context"]}, family="sd3", num_blocks=4))
    assert _unchanged(sd3_pipeline.transformer, before)


def test_already_pruned_transformer_is_refused(sd3_pipeline):
    once = prune_transformer(sd3_pipeline.transformer, PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4))
    with pytest.raises(PlanError, match="already pruned"):
        prune_transformer(once, PrunePlan(removed_blocks=[2], family="sd3", num_blocks=4))


def _save_pruned(pipeline, plan, folder):
    pruned = prune_transformer(pipeline.transformer, plan)
    pruned.save_pretrained(folder)
    return folder


def _edit_plan(folder, **changes):
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["prune_plan"].update(changes)
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        # The config claims block 1 is kept, but the file has no weights for it (only its removal marker).
        (dict(removed_blocks=[]), r"transformer_blocks\.1\.attn\.to_q\.weight \(the file marks it removed"),
        # The config removes block 2 too, but the file still holds its weights.
        (dict(removed_blocks=[1, 2]), r"unexpected keys .*transformer_blocks\.2\."),
    ],
)
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_weights_that_do_not_match_the_plan_sd3(sd3_pipeline, tmp_path, changes, message, low_cpu_mem_usage):
    folder = _save_pruned(sd3_pipeline, PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4), tmp_path / "t")
    _edit_plan(folder, **changes)
    before = folder_state(folder)
    with pytest.raises(CheckpointMismatchError, match=message):
        HierarchicalPrunedSD3Transformer2DModel.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)
    assert folder_state(folder) == before


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_weights_that_do_not_match_the_plan_flux(flux_pipeline, tmp_path, low_cpu_mem_usage):
    folder = _save_pruned(flux_pipeline, PrunePlan(removed_components={2: ["mlp"]}, family="flux", num_blocks=5), tmp_path / "t")
    # The config now keeps the MLP instead of the attention: proj_out has the other columns.
    _edit_plan(folder, removed_components={"2": ["attn"]})
    # Either mismatch may come first (Diffusers stops at the first when loading onto the meta device): the MLP the
    # file marks removed, or the proj_out columns of the other path.
    named = (r"other shapes: .*(single_transformer_blocks\.0\.proj_mlp\.weight \(the file marks it removed|"
             r"single_transformer_blocks\.0\.proj_out\.weight \(file torch.Size\(\[32, 32\]\), plan needs "
             r"torch.Size\(\[32, 128\]\)\))")
    with pytest.raises(CheckpointMismatchError, match=named):
        HierarchicalPrunedFluxTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)


def test_stock_checkpoint_loaded_with_a_plan_names_the_extra_keys(sd3_pipeline, tmp_path):
    sd3_pipeline.transformer.save_pretrained(tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    config["prune_plan"] = PrunePlan(removed_blocks=[2], family="sd3", num_blocks=4).to_dict()
    (tmp_path / "stock" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(in the file, removed by the plan\): transformer_blocks\.2\."):
        HierarchicalPrunedSD3Transformer2DModel.from_pretrained(tmp_path / "stock")


def test_stock_folder_loads_as_an_unpruned_model(sd3_pipeline, tmp_path):
    sd3_pipeline.transformer.save_pretrained(tmp_path / "stock")
    model = HierarchicalPrunedSD3Transformer2DModel.from_pretrained(tmp_path / "stock")
    assert model.prune_plan.is_empty
    shutil.rmtree(tmp_path / "stock")
