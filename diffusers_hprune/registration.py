"""Make Diffusers' loaders find the diffusers-hprune classes.

``DiffusionPipeline.from_pretrained`` resolves a pipeline's ``_class_name`` on the
``diffusers`` module, and resolves components through the module named in
``model_index.json`` (only modules the caller has imported), checking their
loadable base classes through that module's namespace. So:

* the four public classes are attached to the ``diffusers`` namespace;
* their ``__module__`` is the stable top-level ``diffusers_hprune``, so saved
  ``model_index.json`` files say ``["diffusers_hprune", "HierarchicalPruned..."]``
  whatever our internal module layout becomes;
* ``diffusers_hprune`` exposes ``ModelMixin`` / ``DiffusionPipeline`` for the base-class check.
"""

from __future__ import annotations

import diffusers


def register(*classes: type) -> None:
    for cls in classes:
        cls.__module__ = "diffusers_hprune"
        setattr(diffusers, cls.__name__, cls)
