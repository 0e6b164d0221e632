"""Make Diffusers' loaders find the diffusers-hprune classes.

``DiffusionPipeline.from_pretrained`` resolves a pipeline's ``_class_name`` on the
``diffusers`` module, and resolves components through the module named in
``model_index.json`` (only modules the caller has imported), checking their
loadable base classes through that module's namespace. So:

* each public class is attached to the ``diffusers`` namespace when the module that defines
  it is imported (:func:`register`); before that, :func:`register_lazily` lets a lookup of
  its name on ``diffusers`` import that module (PEP 562 module ``__getattr__``, chained to
  any one already there), so ``import diffusers_hprune`` is enough for Diffusers to find
  every class without importing the models and pipelines up front;
* their ``__module__`` is the stable top-level ``diffusers_hprune``, so saved
  ``model_index.json`` files say ``["diffusers_hprune", "HierarchicalPruned..."]``
  whatever the internal module layout is;
* ``diffusers_hprune`` exposes ``ModelMixin`` / ``DiffusionPipeline`` for the base-class check.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Mapping

import diffusers

_LAZY: dict[str, str] = {}


def register(*classes: type) -> None:
    """Attach ``classes`` to the ``diffusers`` namespace under their own names, as members of ``diffusers_hprune``."""
    for cls in classes:
        cls.__module__ = "diffusers_hprune"
        setattr(diffusers, cls.__name__, cls)


def _lookup(name: str, fallback):
    module = _LAZY.get(name)
    if module is not None:
        importlib.import_module(module)  # its import calls register(), which sets the attribute
        return diffusers.__dict__[name]
    if fallback is not None:
        return fallback(name)
    raise AttributeError(f"module 'diffusers' has no attribute {name!r}")


def register_lazily(classes: Mapping[str, str]) -> None:
    """Let ``diffusers.<name>`` import ``classes[name]`` (a module path) the first time it is looked up."""
    first = not _LAZY
    _LAZY.update(classes)
    if first:
        fallback = diffusers.__dict__.get("__getattr__")
        diffusers.__dict__["__getattr__"] = lambda name: _lookup(name, fallback)


class _AfterImport:
    """A meta-path finder that imports ``then`` right after the module ``name`` has been executed."""

    def __init__(self, name: str, then: str):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and so the search below finds the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then_import(module):
            exec_module(module)
            importlib.import_module(then)

        spec.loader.exec_module = exec_then_import
        return spec


def after_import(name: str, then: str) -> None:
    """Import the module ``then`` as soon as the module ``name`` is imported (now, if it is already).

    ``import diffusers_hprune`` uses it to fill Diffusers' ``AutoPipelineFor*`` tables with the
    pruned pipelines when Diffusers loads them, without importing the pipelines before.
    """
    if name in sys.modules:
        importlib.import_module(then)
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


def guard_lora_loading(check: str) -> None:
    """Make Diffusers' ``PeftAdapterMixin.load_lora_adapter`` call ``<check>.check_lora(model, state_dict, prefix)``
    (``check``: a module path, imported on the first LoRA load) before it loads a LoRA given as a state dict,
    which is how ``pipe.load_lora_weights`` gives it. Once per process; the method is otherwise unchanged."""
    from diffusers.loaders.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_lora_adapter
    if getattr(original, "hprune_checks", None) == check:
        return

    @functools.wraps(original)
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            importlib.import_module(check).check_lora(self, pretrained_model_name_or_path_or_dict, prefix)
        return original(self, pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap, **kwargs)

    load_lora_adapter.hprune_checks = check
    PeftAdapterMixin.load_lora_adapter = load_lora_adapter


__all__ = ["after_import", "guard_lora_loading", "register", "register_lazily"]
