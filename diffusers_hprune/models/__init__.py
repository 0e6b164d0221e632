"""Pruned transformer classes (Diffusers ``ModelMixin`` subclasses), as Diffusers' own ``models/``."""

from diffusers_hprune.models.pruned import HierarchicalPrunedMixin, pruned_class_for
from diffusers_hprune.models.transformer_flux import HierarchicalPrunedFluxTransformer2DModel
from diffusers_hprune.models.transformer_sd3 import HierarchicalPrunedSD3Transformer2DModel

__all__ = ["HierarchicalPrunedFluxTransformer2DModel", "HierarchicalPrunedMixin", "HierarchicalPrunedSD3Transformer2DModel",
           "pruned_class_for"]
