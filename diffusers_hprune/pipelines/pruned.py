"""What every pipeline holding a pruned transformer shares, the pipelines of every registered family, and
the helper that prunes a whole pipeline.

Each family's pruned pipelines live in its folder (``ModelFamily.pipeline_module``); this module finds them
through the family registry, so it names no family.
"""

from __future__ import annotations

import functools
from importlib import import_module
from typing import Union, get_type_hints

from diffusers import DiffusionPipeline

from diffusers_hprune.architecture import get_family, registered_families
from diffusers_hprune.architecture.base import ModelFamily
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.errors import UnsupportedModelError
from diffusers_hprune.utils.fileio import safetensors_user_modes
from diffusers_hprune.utils.plain_loading import record_fp32_default


class PrunedPipelineMixin:
    """What every pruned pipeline adds to its stock pipeline.

    ``__init__`` is the stock one, with its ``transformer`` type hint widened to the pruned
    class too: ``from_pipe`` hands a component over only when its type is in the hint.
    """

    pruned_transformer_class: type = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock_init = next(base.__init__ for base in cls.__mro__[1:]
                          if issubclass(base, DiffusionPipeline) and "__init__" in vars(base))

        @functools.wraps(stock_init)
        def __init__(self, *args, **kwargs):
            stock_init(self, *args, **kwargs)

        hints = dict(get_type_hints(stock_init))
        stock_hint = hints["transformer"]
        hints["transformer"] = Union[stock_hint, cls.pruned_transformer_class]  # noqa: UP007  (a type object)
        __init__.__annotations__ = hints
        cls.__init__ = __init__

    @property
    def prune_plan(self) -> PrunePlan:
        """The :class:`PrunePlan` of the pipeline's transformer."""
        return self.transformer.prune_plan

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained``; the folder then also loads without ``dtype``
        (its Transformers components record fp32 as their default dtype, like Diffusers' own models)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        record_fp32_default(save_directory)
        safetensors_user_modes(save_directory)  # the text encoders' and VAE's weights too (safetensors writes 0600)


def family_pipelines(family: ModelFamily) -> dict[str, tuple[type, type]]:
    """Task (``"text2image"``, ``"image2image"``, ``"inpaint"``) -> ``(stock pipeline, pruned pipeline)`` of a family
    (imported from its ``pipeline_module`` on first use); empty for a family without pipelines."""
    return dict(import_module(family.pipeline_module).PIPELINES) if family.pipeline_module else {}


def pipeline_pairs() -> list[tuple[type, type]]:
    """``(stock pipeline, pruned pipeline)`` of every task of every registered family."""
    return [pair for family in registered_families() for pair in family_pipelines(family).values()]


def known_pipeline(class_name: str) -> bool:
    """True for the name of a pipeline class (stock or pruned) that holds a transformer of a registered family."""
    return _named_pair(class_name, pipeline_pairs()) is not None


def _named_pair(class_name: str, pairs) -> tuple[type, type] | None:
    """The ``(stock, pruned)`` pair of ``pairs`` that has a class named ``class_name``."""
    return next((pair for pair in pairs if class_name in (pair[0].__name__, pair[1].__name__)), None)


def register_auto_pipelines() -> None:
    """Add the pruned pipelines to Diffusers' ``AutoPipelineFor*`` tables, as a model type of their own.

    ``AutoPipelineForImage2Image.from_pipe(pruned)`` then gives the pruned img2img pipeline, and
    ``AutoPipelineForText2Image.from_pretrained(pruned_folder)`` the pruned text-to-image one. Runs when
    Diffusers loads those tables (``diffusers_hprune.pipelines.auto``); a family registered after that
    calls it again.
    """
    from diffusers.pipelines import auto_pipeline as auto

    tables = {"text2image": auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, "image2image": auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
              "inpaint": auto.AUTO_INPAINT_PIPELINES_MAPPING}
    for family in registered_families():
        for task, (_, pruned) in family_pipelines(family).items():
            if family.auto_pipeline_name and task in tables:
                tables[task][family.auto_pipeline_name] = pruned


def _pipeline_pair(class_name: str) -> tuple[type, type]:
    pairs = pipeline_pairs()
    pair = _named_pair(class_name, pairs)
    if pair is not None:
        return pair
    raise UnsupportedModelError(f"A {class_name or 'pipeline without _class_name'} is not an SD3 or FLUX pipeline, so "
                                f"it cannot hold a pruned transformer; supported pipelines: {_supported(pairs)} and "
                                "their pruned versions.")


def _supported(pairs) -> str:
    return ", ".join(b.__name__ for b, _ in pairs)


def _pruned_version(pipeline: DiffusionPipeline) -> type | None:
    """The pruned pipeline class for ``pipeline`` (an instance of a stock pipeline or of a subclass of one)."""
    return next((pruned for base, pruned in pipeline_pairs() if isinstance(pipeline, base)), None)


def check_pipeline_family(class_name: str, transformer_config, source) -> None:
    """Refuse a pipeline folder whose class is of another family than its transformer (a FLUX pipeline around an
    SD3 transformer): it would load and then fail, or be written on as the wrong model."""
    pruned = _pipeline_pair(class_name)[1]
    family = get_family(transformer_config).name
    if pruned.pruned_transformer_class.family_name != family:
        raise UnsupportedModelError(f"{source}: the pipeline class {class_name} is not for its {family} transformer "
                                    f"({transformer_config.get('_class_name')}); the model_index.json is mislabelled. "
                                    "Use a folder that save_pretrained wrote.")


def pruned_pipeline_name(class_name: str) -> str:
    """The pruned pipeline class that holds a pruned transformer in place of a ``class_name`` pipeline's."""
    return _pipeline_pair(class_name)[1].__name__


def stock_pipeline_name(class_name: str) -> str:
    """The stock pipeline class that a ``class_name`` pipeline (stock or pruned) is, or is built on."""
    return _pipeline_pair(class_name)[0].__name__


def prune_pipeline(pipeline: DiffusionPipeline, plan: PrunePlan) -> DiffusionPipeline:
    """Return a ``HierarchicalPruned*Pipeline`` with the same components and ``prune_transformer(transformer, plan)``.

    The other components (text encoders, tokenizers, VAE, scheduler) are shared with
    ``pipeline``, not copied; the pruned transformer shares its kept weights with the
    original one (see :func:`prune_transformer`).
    """
    if _pruned_version(pipeline) is None:
        supported = _supported(pipeline_pairs())
        raise UnsupportedModelError(
            f"prune_pipeline cannot prune a {type(pipeline).__name__}; supported pipelines: {supported} "
            "(and their subclasses). For other pipelines prune the transformer with `prune_transformer`."
        )
    return with_pruned_transformer(pipeline, prune_transformer(pipeline.transformer, plan))


def with_pruned_transformer(pipeline: DiffusionPipeline, transformer) -> DiffusionPipeline:
    """A ``HierarchicalPruned*Pipeline`` with ``pipeline``'s other components and an already pruned ``transformer``.

    Used to wrap a distilled student: the text encoders, tokenizers, VAE and scheduler are shared.
    """
    target = _pruned_version(pipeline)
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
