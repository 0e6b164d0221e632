"""Pipelines that hold a pruned transformer (as Diffusers' own ``pipelines/``), and ``prune_pipeline``."""

from diffusers_hprune.pipelines.pruned import (
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedSD3Pipeline,
    prune_pipeline,
    with_pruned_transformer,
)

__all__ = ["HierarchicalPrunedFluxPipeline", "HierarchicalPrunedSD3Pipeline", "prune_pipeline", "with_pruned_transformer"]
