"""What the pipelines holding a pruned transformer share (as Diffusers' own ``pipelines/``), and ``prune_pipeline``.

Each family's pipeline classes live in its folder (``diffusers_hprune/families/<family>/pipelines.py``);
the built-in ones are also public names of ``diffusers_hprune`` itself.
"""

from diffusers_hprune.pipelines.pruned import (
    PrunedPipelineMixin,
    family_pipelines,
    known_pipeline,
    pipeline_pairs,
    prune_pipeline,
    pruned_pipeline_name,
    register_auto_pipelines,
    stock_pipeline_name,
    with_pruned_transformer,
)

__all__ = ["PrunedPipelineMixin", "family_pipelines", "known_pipeline", "pipeline_pairs", "prune_pipeline",
           "pruned_pipeline_name", "register_auto_pipelines", "stock_pipeline_name", "with_pruned_transformer"]
