"""Pipelines that hold a pruned transformer (as Diffusers' own ``pipelines/``), and ``prune_pipeline``."""

from diffusers_hprune.pipelines.pruned import (
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedSD3Pipeline,
    prune_pipeline,
    pruned_pipeline_name,
    stock_pipeline_name,
    with_pruned_transformer,
)

__all__ = ["HierarchicalPrunedFluxPipeline", "HierarchicalPrunedSD3Pipeline", "prune_pipeline", "pruned_pipeline_name",
           "stock_pipeline_name", "with_pruned_transformer"]
