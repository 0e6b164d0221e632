"""The built-in model families, one folder each, registered here (one line per family).

Each folder holds everything the package knows of its family:

- ``structure.py``: the family object (its blocks and components, how each is removed, the pruned blocks,
  its published pipeline's components for the memory budget, which of its modules the classes below live in);
- ``transformer.py``: the pruned transformer class (a Diffusers ``ModelMixin``);
- ``pipelines.py``: the pruned pipelines (text-to-image, img2img, inpainting);
- ``configs/``: the published transformer configs (``hprune budget sd3.5-large``).

``structure.py`` is imported here, with ``import diffusers_hprune``; the model and pipeline classes load on
first use. A family from outside the package does the same with its own objects: subclass
:class:`~diffusers_hprune.ModelFamily`, call :func:`~diffusers_hprune.register_family`, and subclass
``HierarchicalPrunedMixin`` (and ``PrunedPipelineMixin``) for its classes.
"""

from __future__ import annotations

from diffusers_hprune.architecture import register_family
from diffusers_hprune.families.flux.structure import FLUX
from diffusers_hprune.families.sd3.structure import SD3

register_family(SD3)
register_family(FLUX)

__all__ = ["FLUX", "SD3"]
