"""Pipelines that hold a pruned transformer (as Diffusers' own ``pipelines/``), and ``prune_pipeline``."""

from diffusers_hprune.pipelines.pruned import (
    PIPELINES,
    HierarchicalPrunedFluxImg2ImgPipeline,
    HierarchicalPrunedFluxInpaintPipeline,
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedSD3Img2ImgPipeline,
    HierarchicalPrunedSD3InpaintPipeline,
    HierarchicalPrunedSD3Pipeline,
    prune_pipeline,
    pruned_pipeline_name,
    register_auto_pipelines,
    stock_pipeline_name,
    with_pruned_transformer,
)

__all__ = ["PIPELINES", "HierarchicalPrunedFluxImg2ImgPipeline", "HierarchicalPrunedFluxInpaintPipeline",
           "HierarchicalPrunedFluxPipeline", "HierarchicalPrunedSD3Img2ImgPipeline", "HierarchicalPrunedSD3InpaintPipeline",
           "HierarchicalPrunedSD3Pipeline", "prune_pipeline", "pruned_pipeline_name", "register_auto_pipelines",
           "stock_pipeline_name", "with_pruned_transformer"]
