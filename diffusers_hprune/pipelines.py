"""Pipelines that hold a pruned transformer, and the helper that prunes a whole pipeline."""

from __future__ import annotations

from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from .errors import UnsupportedModelError
from .plan import PrunePlan
from .prune import prune_transformer


class HierarchicalPrunedSD3Pipeline(StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose transformer is a ``HierarchicalPrunedSD3Transformer2DModel``.

    Everything else (text encoders, VAE, scheduler, ``__call__``) is the stock pipeline.
    After ``import diffusers_hprune``, ``DiffusionPipeline.from_pretrained`` returns this class
    for folders and Hub repos saved from it.
    """

    @property
    def prune_plan(self) -> PrunePlan:
        return self.transformer.prune_plan


class HierarchicalPrunedFluxPipeline(FluxPipeline):
    """``FluxPipeline`` whose transformer is a ``HierarchicalPrunedFluxTransformer2DModel``."""

    @property
    def prune_plan(self) -> PrunePlan:
        return self.transformer.prune_plan


_PRUNED_PIPELINES = {
    StableDiffusion3Pipeline: HierarchicalPrunedSD3Pipeline,
    FluxPipeline: HierarchicalPrunedFluxPipeline,
}


def prune_pipeline(pipeline: DiffusionPipeline, plan: PrunePlan) -> DiffusionPipeline:
    """Return a ``HierarchicalPruned*Pipeline`` with the same components and ``prune_transformer(transformer, plan)``.

    The other components (text encoders, tokenizers, VAE, scheduler) are shared with
    ``pipeline``, not copied; the pruned transformer shares its kept weights with the
    original one (see :func:`prune_transformer`).
    """
    target = next((pruned for base, pruned in _PRUNED_PIPELINES.items() if isinstance(pipeline, base)), None)
    if target is None:
        supported = ", ".join(b.__name__ for b in _PRUNED_PIPELINES)
        raise UnsupportedModelError(
            f"prune_pipeline cannot prune a {type(pipeline).__name__}; supported pipelines: {supported} "
            "(and their subclasses). For other pipelines prune the transformer with `prune_transformer`."
        )
    components = dict(pipeline.components)
    components["transformer"] = prune_transformer(pipeline.transformer, plan)
    pruned = target(**components)
    pruned.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return pruned
