"""Pipelines that hold a pruned transformer, and the helper that prunes a whole pipeline."""

from __future__ import annotations

from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.errors import UnsupportedModelError
from diffusers_hprune.utils.plain_loading import record_fp32_default
from diffusers_hprune.utils.registration import register


class _PlainLoadingMixin:
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained``; the folder then also loads without ``torch_dtype``
        (its Transformers components record fp32 as their default dtype, like Diffusers' own models)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        record_fp32_default(save_directory)


class HierarchicalPrunedSD3Pipeline(_PlainLoadingMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose transformer is a ``HierarchicalPrunedSD3Transformer2DModel``.

    Everything else (text encoders, VAE, scheduler, ``__call__``) is the stock pipeline.
    After ``import diffusers_hprune``, ``DiffusionPipeline.from_pretrained`` returns this class
    for folders and Hub repos saved from it.
    """

    @property
    def prune_plan(self) -> PrunePlan:
        return self.transformer.prune_plan


class HierarchicalPrunedFluxPipeline(_PlainLoadingMixin, FluxPipeline):
    """``FluxPipeline`` whose transformer is a ``HierarchicalPrunedFluxTransformer2DModel``."""

    @property
    def prune_plan(self) -> PrunePlan:
        return self.transformer.prune_plan


register(HierarchicalPrunedSD3Pipeline, HierarchicalPrunedFluxPipeline)

_PRUNED_PIPELINES = {
    StableDiffusion3Pipeline: HierarchicalPrunedSD3Pipeline,
    FluxPipeline: HierarchicalPrunedFluxPipeline,
}


def pruned_pipeline_name(class_name: str) -> str:
    """The pruned pipeline class that holds a pruned transformer in place of a ``class_name`` pipeline's."""
    for base, pruned in _PRUNED_PIPELINES.items():
        if class_name in (base.__name__, pruned.__name__):
            return pruned.__name__
    supported = ", ".join(b.__name__ for b in _PRUNED_PIPELINES)
    raise UnsupportedModelError(f"A {class_name or 'pipeline without _class_name'} cannot hold a pruned transformer; "
                                f"supported pipelines: {supported}.")


def stock_pipeline_name(class_name: str) -> str:
    """The stock pipeline class that a ``class_name`` pipeline (stock or pruned) is, or is built on."""
    for base, pruned in _PRUNED_PIPELINES.items():
        if class_name in (base.__name__, pruned.__name__):
            return base.__name__
    supported = ", ".join(b.__name__ for b in _PRUNED_PIPELINES)
    raise UnsupportedModelError(f"A {class_name or 'pipeline without _class_name'} is not an SD3 or FLUX pipeline; "
                                f"supported pipelines: {supported} and their pruned versions.")


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
    return with_pruned_transformer(pipeline, prune_transformer(pipeline.transformer, plan))


def with_pruned_transformer(pipeline: DiffusionPipeline, transformer) -> DiffusionPipeline:
    """A ``HierarchicalPruned*Pipeline`` with ``pipeline``'s other components and an already pruned ``transformer``.

    Used to wrap a distilled student: the text encoders, tokenizers, VAE and scheduler are shared.
    """
    target = next((pruned for base, pruned in _PRUNED_PIPELINES.items() if isinstance(pipeline, base)), None)
    if target is None or getattr(transformer, "prune_plan", None) is None:
        raise UnsupportedModelError(
            f"Cannot wrap a {type(transformer).__name__} in a pruned {type(pipeline).__name__}; pass a pruned "
            "transformer (prune_transformer) and an SD3 or FLUX pipeline."
        )
    components = dict(pipeline.components)
    components["transformer"] = transformer
    pruned = target(**components)
    pruned.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return pruned
