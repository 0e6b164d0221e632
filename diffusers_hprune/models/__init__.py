"""What the pruned transformer classes share (Diffusers ``ModelMixin`` subclasses), as Diffusers' own ``models/``.

Each family's pruned transformer class lives in its folder (``diffusers_hprune/families/<family>/transformer.py``);
the built-in ones are also public names of ``diffusers_hprune`` itself.
"""

from diffusers_hprune.models.pruned import HierarchicalPrunedMixin, pruned_class_for

__all__ = ["HierarchicalPrunedMixin", "pruned_class_for"]
