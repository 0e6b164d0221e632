"""The surgery (DESIGN.md section 6, step 5): ``prune_transformer`` removes blocks and components as a plan says."""

from diffusers_hprune.pruning.surgery import prune_transformer

__all__ = ["prune_transformer"]
