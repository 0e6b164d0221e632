"""Shared behaviour of the pruned transformer classes: the plan in the config,
structure built before weights load, and strict loading with clear errors."""

from __future__ import annotations

import re
from typing import Any

from diffusers_hprune.families import get_family
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import CheckpointMismatchError, UnsupportedModelError
from diffusers_hprune.utils.nf4_cpu import (
    accelerator_available,
    compute_in_fp32_on_cpu,
    cpu_nf4_loading,
    keep_cpu_layout,
)

_SHOWN = 8


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _shape_problems(message: str) -> str:
    """The key and shapes named in one of Diffusers' shape-mismatch errors."""
    found = re.findall(r"(\S+) expected shape (torch\.Size\(\[[^]]*\]\)), but got (torch\.Size\(\[[^]]*\]\))", message)
    found = [f"{k} (file {got}, plan needs {want})" for k, want, got in found]
    found += [
        f"{k} (file {got}, plan needs {want})"
        for k, got, want in re.findall(r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^]]*\]\)) from "
                                       r"checkpoint, the shape in current model is (torch\.Size\(\[[^]]*\]\))", message)
    ]
    return "; ".join(found) or message


_PRUNED_CLASSES: dict[str, type] = {}


def pruned_class_for(family) -> type:
    """The pruned transformer class of a family (a :class:`ModelFamily` or its name).

    Every subclass of :class:`HierarchicalPrunedMixin` that names a ``family_name`` is
    registered when it is defined, so a family added from outside the package brings its
    own pruned class by subclassing the mixin.
    """
    name = family if isinstance(family, str) else family.name
    try:
        return _PRUNED_CLASSES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"No pruned transformer class for the {name!r} family; define one by subclassing "
            "diffusers_hprune.models.HierarchicalPrunedMixin with `family_name = " + repr(name) + "`."
        ) from None


class HierarchicalPrunedMixin:
    """Mixed into a Diffusers transformer subclass whose config has a ``prune_plan`` entry."""

    family_name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family_name and cls.family_name not in _PRUNED_CLASSES:
            _PRUNED_CLASSES[cls.family_name] = cls

    def _build_pruned_structure(self, prune_plan: dict[str, Any] | PrunePlan | None) -> None:
        family = get_family(self.family_name)
        plan = family.empty_plan(self.config) if prune_plan is None else PrunePlan.from_dict(prune_plan)
        plan = family.check_plan(plan, self.config)
        family.apply_plan(self, plan)
        # Store the normalised plan, so the saved config.json says exactly what the weights hold.
        self.register_to_config(prune_plan=plan.to_dict())

    @property
    def prune_plan(self) -> PrunePlan:
        """The :class:`PrunePlan` this transformer was pruned with (read from its config)."""
        return PrunePlan.from_dict(self.config.prune_plan)

    @property
    def family(self):
        """The model family object (structure knowledge) of this transformer."""
        return get_family(self.family_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``ModelMixin.from_pretrained`` with strict loading: the weights must match the prune plan exactly.

        Raises :class:`CheckpointMismatchError` naming the missing, unexpected or
        wrongly shaped keys instead of leaving parts of the model uninitialised.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            with cpu_nf4_loading():  # NF4 checkpoints (hprune quantize) load on a CPU too
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
                )
        except (RuntimeError, ValueError) as e:
            # Diffusers reports a shape mismatch as RuntimeError("size mismatch ...") or,
            # when loading onto the meta device, ValueError("... expected shape ...").
            if "size mismatch" not in str(e) and "expected shape" not in str(e):
                raise
            raise CheckpointMismatchError(
                f"The weights at {pretrained_model_name_or_path} do not match the prune plan in its config.json: "
                f"keys with other shapes: {_shape_problems(str(e))}. The config and the weights come from different "
                "models; save the pruned model again with `save_pretrained`, or restore the config.json that came "
                "with these weights."
            ) from None
        problems = []
        if info["missing_keys"]:
            problems.append(f"missing keys (the plan keeps them, the file lacks them): {_listing(info['missing_keys'])}")
        if info["unexpected_keys"]:
            problems.append(
                f"unexpected keys (in the file, removed by the plan): {_listing(info['unexpected_keys'])}"
            )
        if info["mismatched_keys"]:
            problems.append(f"keys with other shapes: {_listing([k[0] for k in info['mismatched_keys']])}")
        if problems:
            raise CheckpointMismatchError(
                f"The weights at {pretrained_model_name_or_path} do not match the prune plan in its config.json "
                f"({model.prune_plan.describe()}): " + "; ".join(problems) + ". The config and the weights come "
                "from different models; save the pruned model again with `save_pretrained`, or restore the "
                "config.json that came with these weights."
            )
        if getattr(model.config, "quantization_config", None):
            keep_cpu_layout(model)
            if not accelerator_available():
                compute_in_fp32_on_cpu(model)  # the recorded dtype (bf16) is for GPUs
        return (model, info) if output_loading_info else model
