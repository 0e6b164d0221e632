"""Model-family registry: the one place each family's structure is known.

``get_family(x)`` accepts a family name, a transformer (instance or class) or a
transformer config dict and returns the family object; unsupported inputs get an
error that lists the supported families. The built-in families (SD3, FLUX) are
registered when this module is imported; ``register_family`` adds another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers_hprune.families.base import BLOCK, BlockSpec, ModelFamily, RemovedBlock
from diffusers_hprune.families.flux import FLUX
from diffusers_hprune.families.sd3 import SD3
from diffusers_hprune.plan import use_family_registry
from diffusers_hprune.utils.errors import UnsupportedModelError

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a model family (a :class:`ModelFamily` instance with a ``name``) to the registry; returns it.

    Raises:
        UnsupportedModelError: not a ``ModelFamily``, no name, or a family of that name is registered already.
    """
    if not isinstance(family, ModelFamily):
        raise UnsupportedModelError(
            f"register_family takes a ModelFamily instance, got {type(family).__name__}; subclass "
            "diffusers_hprune.ModelFamily and register an instance of it.")
    if not family.name:
        raise UnsupportedModelError(f"{type(family).__name__} has no `name`; set the class attribute `name`.")
    if family.name in _FAMILIES:
        known = _FAMILIES[family.name]
        raise UnsupportedModelError(
            f"A model family named {family.name!r} is registered already ({known.display_name or type(known).__name__}"
            "); give the new family another name.")
    _FAMILIES[family.name] = family
    return family


register_family(SD3)
register_family(FLUX)
use_family_registry(lambda: {name: family.component_names for name, family in _FAMILIES.items()})


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def _supported() -> str:
    return "; ".join(f"{f.name} ({f.display_name}: {f.base_class_name})" for f in _FAMILIES.values())


def get_family(obj: Any) -> ModelFamily:
    """The family of a name (``"sd3"``), a transformer instance or class, or a config dict."""
    if isinstance(obj, str):
        if obj in _FAMILIES:
            return _FAMILIES[obj]
        raise UnsupportedModelError(f"Unknown model family {obj!r}. Supported families: {_supported()}.")
    for family in _FAMILIES.values():
        if family.matches(obj):
            return family
    if isinstance(obj, Mapping):
        what = f"a config with _class_name {obj.get('_class_name')!r}"
    else:
        what = f"a {(obj if isinstance(obj, type) else type(obj)).__name__}"
    raise UnsupportedModelError(
        f"diffusers-hprune cannot prune {what}. Supported families: {_supported()}. "
        "Pass the `transformer` of a StableDiffusion3Pipeline or FluxPipeline."
    )


__all__ = ["BLOCK", "BlockSpec", "ModelFamily", "RemovedBlock", "family_names", "get_family", "register_family"]
