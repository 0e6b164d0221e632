"""diffusers-hprune: HierarchicalPrune (arXiv 2508.04663) for Diffusers SD3/SD3.5 and FLUX.1 transformers.

``import diffusers_hprune`` registers the pruned transformer and pipeline classes
with Diffusers, so ``DiffusionPipeline.from_pretrained`` loads pruned checkpoints.
"""

from ._quiet import quiet_third_party_notices as _quiet
from ._quiet import running_as_cli as _running_as_cli

if _running_as_cli():
    _quiet()

from diffusers import DiffusionPipeline, ModelMixin  # noqa: E402, F401  (Diffusers' loader looks these up here)

from .architectures import BLOCK, BlockSpec, ModelFamily, family_names, get_family
from .config import HPruneConfig
from .errors import (
    CheckpointMismatchError,
    HPruneError,
    PlanError,
    UnsupportedModelError,
)
from .inventory import inspect_transformer, load_transformer_config
from .models import (
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Transformer2DModel,
)
from .pipelines import (
    HierarchicalPrunedFluxPipeline,
    HierarchicalPrunedSD3Pipeline,
    prune_pipeline,
)
from .plan import PrunePlan
from .prune import prune_transformer
from .quantization import quantize, quantize_pipeline
from .registration import register as _register

__version__ = "0.1.0.dev0"

_register(
    HierarchicalPrunedSD3Transformer2DModel,
    HierarchicalPrunedFluxTransformer2DModel,
    HierarchicalPrunedSD3Pipeline,
    HierarchicalPrunedFluxPipeline,
)

__all__ = [
    "BLOCK",
    "BlockSpec",
    "CheckpointMismatchError",
    "HPruneConfig",
    "HPruneError",
    "HierarchicalPrunedFluxPipeline",
    "HierarchicalPrunedFluxTransformer2DModel",
    "HierarchicalPrunedSD3Pipeline",
    "HierarchicalPrunedSD3Transformer2DModel",
    "ModelFamily",
    "PlanError",
    "PrunePlan",
    "UnsupportedModelError",
    "family_names",
    "get_family",
    "inspect_transformer",
    "load_transformer_config",
    "prune_pipeline",
    "prune_transformer",
    "quantize",
    "quantize_pipeline",
]
