"""Shared behaviour of the pruned transformer classes: the plan in the config,
structure built before weights load, and strict loading with clear errors."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from torch import nn

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.base import refuse_adapters
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.checks import refuse_pickled
from diffusers_hprune.utils.compat import (
    UNUSED_WEIGHTS_LOGGER,
    UnusedWeightsNotice,
    is_shape_mismatch,
    shape_mismatches,
)
from diffusers_hprune.utils.errors import CheckpointMismatchError, UnsupportedModelError
from diffusers_hprune.utils.fileio import safetensors_user_modes
from diffusers_hprune.utils.nf4_cpu import (
    accelerator_available,
    compute_in_fp32_on_cpu,
    cpu_nf4_loading,
    keep_cpu_layout,
)

_SHOWN = 8
logger = logging.getLogger(__name__)


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _shape_problems(error: BaseException) -> str:
    """The key and shapes named in one of Diffusers' shape-mismatch errors."""
    found = [f"{key} (the file marks it removed: a zero-size marker; the plan keeps it)" if file == "torch.Size([0])"
             else f"{key} (file {file}, plan needs {want})" for key, file, want in shape_mismatches(error)]
    return "; ".join(found) or str(error)


_PRUNED_CLASSES: dict[str, type] = {}


@contextlib.contextmanager
def _markers_not_reported():
    """Without Diffusers' "weights ... were not used" notice, which the removal markers would raise on every load.

    The pruned classes check unexpected keys themselves (and raise for any that is no marker).
    """
    log = logging.getLogger(UNUSED_WEIGHTS_LOGGER)
    notice = UnusedWeightsNotice("HierarchicalPruned")
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


def _add_removal_markers(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: while ``save_pretrained`` runs, a zero-size tensor under each removed part's name."""
    if getattr(module, "_saving_markers", False) and prefix == "":
        dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
        for key in module.family.removal_markers(module.config, module.prune_plan):
            state_dict[key] = torch.empty(0, dtype=dtype)


def pruned_class_for(family) -> type:
    """The pruned transformer class of a family (a :class:`ModelFamily` or its name).

    Every subclass of :class:`HierarchicalPrunedMixin` that names a ``family_name`` is
    registered when it is defined; a family's class not defined yet is imported from the
    family's ``model_module``. A family added from outside the package brings its own pruned
    class by subclassing the mixin.
    """
    name = family if isinstance(family, str) else family.name
    if name not in _PRUNED_CLASSES:
        module = get_family(name).model_module if isinstance(family, str) else family.model_module
        if module:
            import_module(module)  # defining the class registers it
    try:
        return _PRUNED_CLASSES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"No pruned transformer class for the {name!r} family; define one by subclassing "
            "diffusers_hprune.models.HierarchicalPrunedMixin with `family_name = " + repr(name) + "`."
        ) from None


def _with_signature_of(original):
    """Give the decorated method ``original``'s signature (what ``inspect.signature`` reports), whatever Diffusers
    version is installed."""

    def decorate(method):
        method.__signature__ = inspect.signature(original)
        return method

    return decorate


class HierarchicalPrunedMixin:
    """Mixed into a Diffusers transformer subclass whose config has a ``prune_plan`` entry."""

    family_name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.family_name and cls.family_name not in _PRUNED_CLASSES:
            _PRUNED_CLASSES[cls.family_name] = cls

    def _build_pruned_structure(self, prune_plan: dict[str, Any] | PrunePlan | None) -> None:
        family = get_family(self.family_name)
        family.register_with_diffusers_hooks()
        plan = family.empty_plan(self.config) if prune_plan is None else PrunePlan.from_dict(prune_plan)
        plan = family.check_plan(plan, self.config)
        family.apply_plan(self, plan)
        # Store the normalised plan, so the saved config.json says exactly what the weights hold.
        self.register_to_config(prune_plan=plan.to_dict())
        self.register_state_dict_post_hook(_add_removal_markers)

    @_with_signature_of(ModelMixin.save_pretrained)
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``ModelMixin.save_pretrained``, with a zero-size marker under each removed block's and component's name.

        Its signature is ``ModelMixin``'s: a pipeline's ``save_pretrained`` passes ``variant``,
        ``max_shard_size`` and ``safe_serialization`` only to components whose method names them.

        The markers (:meth:`ModelFamily.removal_markers`) make a stock class that is handed this
        checkpoint (``SD3Transformer2DModel.from_pretrained(pruned_folder)``) stop with a shape
        error naming a removed part, instead of building the full model with random weights
        in the removed parts. The pruned classes skip them when loading.
        """
        refuse_adapters(self, "save this transformer")  # its keys would be PEFT's base_layer / lora_A names
        self._saving_markers = True
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self._saving_markers = False
        safetensors_user_modes(save_directory)
        return result

    @property
    def prune_plan(self) -> PrunePlan:
        """The :class:`PrunePlan` this transformer was pruned with (read from its config)."""
        return PrunePlan.from_dict(self.config.prune_plan)

    @property
    def family(self):
        """The model family object (structure knowledge) of this transformer."""
        return get_family(self.family_name)

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        """``PeftAdapterMixin.load_lora_adapter`` for a LoRA made for the unpruned model (Diffusers' format).

        Adapters of removed blocks and components are dropped (one info line names them);
        the ``lora_A`` of a sliced layer (a FLUX single block's ``proj_out`` without ``attn``
        or ``mlp``) is cut the way the weight was. ``pipe.load_lora_weights`` comes through
        here, from any SD3 or FLUX pipeline. A FLUX pipeline first widens a layer whose LoRA
        is wider than it (for Control LoRAs, with zero columns); such widened sliced layers
        are restored first.
        """
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            self._restore_sliced_layers()
            lora, dropped = self.family.prune_lora_state_dict(
                pretrained_model_name_or_path_or_dict, self.config, self.prune_plan, prefix=f"{prefix}." if prefix else "")
            if dropped:
                logger.info("LoRA: dropped the adapters of %d module(s) the prune plan removed: %s", len(dropped),
                            ", ".join(dropped))
                metadata = kwargs.get("metadata")
                if isinstance(metadata, Mapping) and isinstance(metadata.get("target_modules"), (list, tuple, set)):
                    kwargs["metadata"] = {**metadata, "target_modules": sorted(
                        t for t in metadata["target_modules"] if t not in dropped)}
            pretrained_model_name_or_path_or_dict = lora
        return super().load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap,
                                         **kwargs)

    def _restore_sliced_layers(self) -> None:
        """Undo FluxLoraLoaderMixin's widening of sliced layers (it keeps the old weight in the first columns)."""
        restored = False
        for path, (dim, parts, full) in self.family.sliced_layers(self.config, self.prune_plan).items():
            layer = self.get_submodule(path)
            kept = full - sum(sl.stop - sl.start for sl in parts)
            if isinstance(layer, nn.Linear) and dim == 1 and layer.in_features == full != kept:
                narrow = nn.Linear(kept, layer.out_features, bias=layer.bias is not None, device="meta")
                narrow.weight = nn.Parameter(layer.weight.data[:, :kept].contiguous(),
                                             requires_grad=layer.weight.requires_grad)
                narrow.bias = layer.bias
                parent, _, name = path.rpartition(".")
                setattr(self.get_submodule(parent), name, narrow)
                restored = True
        if restored and hasattr(self, "_overwritten_params"):
            # Diffusers recorded the widened layers' old weights under their local names ("proj_out.weight"),
            # which unload_lora_weights would write back into the top-level proj_out.
            for key in ("proj_out.weight", "proj_out.bias"):
                self._overwritten_params.pop(key, None)
            if not self._overwritten_params:
                del self._overwritten_params

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``ModelMixin.from_pretrained`` with strict loading: the weights must match the prune plan exactly.

        Raises :class:`CheckpointMismatchError` naming the missing, unexpected or
        wrongly shaped keys instead of leaving parts of the model uninitialised, and an
        ``InputError`` for a local folder whose weights are pickles only (``.bin``: not read).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):  # pickles only: refused, never unpickled
            refuse_pickled(Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or ""), "transformer weights")
        try:
            with cpu_nf4_loading(), _markers_not_reported():  # NF4 checkpoints (hprune quantize) load on a CPU too
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
                )
        except (RuntimeError, ValueError) as e:
            if not is_shape_mismatch(e):
                raise
            raise CheckpointMismatchError(
                f"The weights at {pretrained_model_name_or_path} do not match the prune plan in its config.json: "
                f"keys with other shapes: {_shape_problems(e)}. The config and the weights come from different "
                "models; save the pruned model again with `save_pretrained`, or restore the config.json that came "
                "with these weights."
            ) from None
        markers = set(model.family.removal_markers(model.config, model.prune_plan))
        # A folder saved before plans removed unread modulations holds their weights: unused, so not a mismatch.
        unread = tuple(path + "." for path in model.family.unread_module_paths(model.config, model.prune_plan))
        info["unexpected_keys"] = [k for k in info["unexpected_keys"] if k not in markers
                                   and not (unread and k.startswith(unread))]
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
