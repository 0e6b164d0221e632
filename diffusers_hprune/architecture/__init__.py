"""Model-family registry, and what every family shares (``base``, ``checkpoints``, ``mmdit``, ``inventory``, ``sizes``).

``get_family(x)`` accepts a family name, a transformer (instance or class) or a
transformer config dict and returns the family object; unsupported inputs get an
error that lists the supported families. The built-in families (``diffusers_hprune/families/sd3``,
``families/flux``) register themselves when ``diffusers_hprune`` is imported, before any
lookup; ``register_family`` adds another one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers_hprune.architecture.base import BLOCK, BlockSpec, ModelFamily, RemovedBlock
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


use_family_registry(lambda: {name: family.component_names for name, family in _FAMILIES.items()})


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def registered_families() -> tuple[ModelFamily, ...]:
    """Every registered family object, in the order they were registered."""
    return tuple(_FAMILIES.values())


def _supported() -> str:
    return "; ".join(f"{f.name} ({f.display_name}: {f.base_class_name})" for f in _FAMILIES.values())


def get_family(obj: Any) -> ModelFamily:
    """The family of a name (``ModelFamily.name``), a transformer instance or class, a config dict, or a family object.

    A transformer whose class several families match (a family registered for a subclass of another family's
    class) belongs to the family of the most derived class.
    """
    if isinstance(obj, ModelFamily):
        return obj
    if isinstance(obj, str):
        if obj in _FAMILIES:
            return _FAMILIES[obj]
        raise UnsupportedModelError(f"Unknown model family {obj!r}. Supported families: {_supported()}.")
    found = [family for family in _FAMILIES.values() if family.matches(obj)]
    if len(found) == 1 or (found and isinstance(obj, Mapping)):
        return found[0]
    if found:
        return max(found, key=lambda family: len(family.base_class.__mro__))
    if isinstance(obj, Mapping):
        what = f"a config with _class_name {obj.get('_class_name')!r}"
    else:
        what = f"a {(obj if isinstance(obj, type) else type(obj)).__name__}"
    raise UnsupportedModelError(
        f"diffusers-hprune cannot prune {what}. Supported families: {_supported()}. "
        "Pass the `transformer` of a StableDiffusion3Pipeline or FluxPipeline."
    )


__all__ = ["BLOCK", "BlockSpec", "ModelFamily", "RemovedBlock", "family_names", "get_family", "register_family",
           "registered_families"]
