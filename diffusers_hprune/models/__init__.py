"""Pruned transformer classes (Diffusers ``ModelMixin`` subclasses)."""

from .transformer_flux import HierarchicalPrunedFluxTransformer2DModel
from .transformer_sd3 import HierarchicalPrunedSD3Transformer2DModel

__all__ = ["HierarchicalPrunedFluxTransformer2DModel", "HierarchicalPrunedSD3Transformer2DModel"]
