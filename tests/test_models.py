"""The pruned classes stay faithful to the Diffusers classes they extend, and register with Diffusers."""

from __future__ import annotations

import inspect

import diffusers
import pytest
from helpers import tiny_unet

import diffusers_hprune
from diffusers_hprune import (
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Pipeline,
    HierarchicalPrunedSD3Transformer2DModel,
    PrunePlan,
    prune_pipeline,
)


@pytest.mark.parametrize(
    "pruned,base",
    [
        (HierarchicalPrunedSD3Transformer2DModel, diffusers.SD3Transformer2DModel),
        (HierarchicalPrunedFluxTransformer2DModel, diffusers.FluxTransformer2DModel),
    ],
)
def test_pruned_init_accepts_every_base_argument(pruned, base):
    """Guards against a Diffusers release adding a config argument our subclass would drop."""
    base_params = inspect.signature(base.__init__).parameters
    ours = inspect.signature(pruned.__init__).parameters
    assert list(ours)[:-1] == list(base_params)
    assert all(ours[n].default == p.default for n, p in base_params.items())
    assert list(ours)[-1] == "prune_plan"


def test_classes_are_registered_with_diffusers():
    for cls in (
        HierarchicalPrunedSD3Transformer2DModel,
        HierarchicalPrunedFluxTransformer2DModel,
        HierarchicalPrunedSD3Pipeline,
        HierarchicalPrunedFluxPipeline,
    ):
        assert getattr(diffusers, cls.__name__) is cls
        assert getattr(diffusers_hprune, cls.__name__) is cls
        assert cls.__module__ == "diffusers_hprune"


def test_prune_pipeline_shares_components_and_keeps_the_original(sd3_pipeline, flux_pipeline):
    plan = PrunePlan(removed_blocks=[2], family="sd3", num_blocks=4)
    pruned = prune_pipeline(sd3_pipeline, plan)
    assert isinstance(pruned, HierarchicalPrunedSD3Pipeline)
    assert pruned.text_encoder_3 is sd3_pipeline.text_encoder_3 and pruned.vae is sd3_pipeline.vae
    assert pruned.prune_plan == plan
    assert type(sd3_pipeline.transformer) is diffusers.SD3Transformer2DModel
    pruned = prune_pipeline(flux_pipeline, PrunePlan(removed_blocks=[4], family="flux", num_blocks=5))
    assert isinstance(pruned, HierarchicalPrunedFluxPipeline)


def test_prune_pipeline_rejects_other_pipelines():
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet()
    with pytest.raises(diffusers_hprune.UnsupportedModelError,
                       match="StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, "
                             "FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline"):
        prune_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), PrunePlan(family="sd3", num_blocks=4))
