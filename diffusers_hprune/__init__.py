"""diffusers-hprune: HierarchicalPrune (arXiv 2508.04663) for Diffusers SD3/SD3.5 and FLUX.1 transformers.

``import diffusers_hprune`` makes Diffusers find the pruned transformer and pipeline classes,
so ``DiffusionPipeline.from_pretrained`` loads pruned checkpoints. The public names below are
loaded on first use (PEP 562), so importing one sub-package (``diffusers_hprune.plan``,
``diffusers_hprune.quantization``, ...) loads only what that sub-package needs. The package
map is in docs/layout.md.
"""

from __future__ import annotations

import importlib
import importlib.util

from diffusers_hprune.utils.quiet import quiet_third_party_notices as _quiet
from diffusers_hprune.utils.quiet import running_as_cli as _running_as_cli

if _running_as_cli():
    _quiet()

from diffusers_hprune.utils.nf4_cpu import import_bitsandbytes as _import_bitsandbytes  # noqa: E402

if importlib.util.find_spec("bitsandbytes") is not None:  # before Diffusers imports it: no Hub code at import
    _import_bitsandbytes()

from diffusers import DiffusionPipeline, ModelMixin  # noqa: E402, F401  (Diffusers' loader looks these up here)

from diffusers_hprune import families as _families  # noqa: E402, F401  (registers the built-in families)
from diffusers_hprune.architecture import (  # noqa: E402  (the registry, which plans check names against)
    BLOCK,
    BlockSpec,
    ModelFamily,
    family_names,
    get_family,
    register_family,
)
from diffusers_hprune.architecture import registered_families as _registered_families  # noqa: E402
from diffusers_hprune.plan import PrunePlan  # noqa: E402
from diffusers_hprune.utils.errors import (  # noqa: E402
    CheckpointMismatchError,
    HPruneError,
    PlanError,
    UnsupportedModelError,
)
from diffusers_hprune.utils.registration import after_import as _after_import  # noqa: E402
from diffusers_hprune.utils.registration import guard_lora_loading as _guard_lora_loading  # noqa: E402
from diffusers_hprune.utils.registration import register_lazily as _register_lazily  # noqa: E402

__version__ = "0.1.0.dev0"

# public name -> the module that defines it, imported on first use
_LAZY = {
    "DistillConfig": "diffusers_hprune.distillation.settings",
    "HPruneConfig": "diffusers_hprune.compression.config",
    "analyze": "diffusers_hprune.analysis",
    "compress": "diffusers_hprune.compression",
    "distill": "diffusers_hprune.distillation.trainer",
    "inspect_transformer": "diffusers_hprune.architecture.inventory",
    "load_transformer_config": "diffusers_hprune.architecture.inventory",
    "make_plan": "diffusers_hprune.planning",
    "prune_pipeline": "diffusers_hprune.pipelines",
    "prune_transformer": "diffusers_hprune.pruning",
    "quantize": "diffusers_hprune.quantization",
    "quantize_pipeline": "diffusers_hprune.quantization",
}
_SUBPACKAGES = ("analysis", "architecture", "budget", "commands", "compression", "contributions", "demo", "distillation", "evaluation",
                "families", "hub", "loading", "metrics", "models", "pipelines", "plan", "planning", "profiles",
                "pruning", "quantization", "toy", "utils")

# Each built-in family's pruned transformer and pipeline classes (ModelFamily.class_modules): public names here, and
# found by Diffusers on the `diffusers` module (a model_index.json names them) before their modules are imported.
_FAMILY_CLASSES = {name: module for family in _registered_families() for name, module in family.class_modules().items()}
_LAZY.update(_FAMILY_CLASSES)
_register_lazily(_FAMILY_CLASSES)
# AutoPipelineFor* find the pruned pipelines in their tables: filled when Diffusers loads those tables.
_after_import("diffusers.pipelines.auto_pipeline", "diffusers_hprune.pipelines.auto")
# A base-model LoRA loaded into a stock export (renumbered blocks) is refused with the command that converts it.
_guard_lora_loading("diffusers_hprune.hub.lora_guard")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


__all__ = [
    "BLOCK",
    "BlockSpec",
    "CheckpointMismatchError",
    "DistillConfig",
    "HPruneConfig",
    "HPruneError",
    "HierarchicalPrunedFluxImg2ImgPipeline",
    "HierarchicalPrunedFluxInpaintPipeline",
    "HierarchicalPrunedFluxPipeline",
    "HierarchicalPrunedFluxTransformer2DModel",
    "HierarchicalPrunedSD3Img2ImgPipeline",
    "HierarchicalPrunedSD3InpaintPipeline",
    "HierarchicalPrunedSD3Pipeline",
    "HierarchicalPrunedSD3Transformer2DModel",
    "ModelFamily",
    "PlanError",
    "PrunePlan",
    "UnsupportedModelError",
    "analyze",
    "compress",
    "distill",
    "family_names",
    "get_family",
    "inspect_transformer",
    "load_transformer_config",
    "make_plan",
    "prune_pipeline",
    "prune_transformer",
    "quantize",
    "quantize_pipeline",
    "register_family",
]
