"""How a family's checkpoints are named: the pruned state dict, the removal markers, the stock export's
renumbered names, and LoRAs made for the unpruned model.

:class:`CheckpointLayout` is a part of :class:`~diffusers_hprune.architecture.base.ModelFamily`; its methods
read only the family's structure (``block_specs``, ``component_submodules``, ``shared_parameter_slices``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import CheckpointMismatchError, PlanError


class CheckpointLayout:
    """The checkpoint side of a model family (mixed into ``ModelFamily``)."""

    base_class_name: str = ""
    original_layout_module: str = ""
    """The module whose ``LAYOUT`` (an ``architecture.original.OriginalLayout``) is the family's authors' key layout,
    for single-file and GGUF exports; imported on first use (the generated modeling file names it only). Empty: the
    family has none."""

    @property
    def original_layout(self):
        """The family's ``OriginalLayout`` (``original_layout_module``'s ``LAYOUT``), ``None`` when it has none."""
        if not self.original_layout_module:
            return None
        import importlib

        return importlib.import_module(self.original_layout_module).LAYOUT

    def prune_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], plan: PrunePlan, config: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The state dict of the pruned model, from the state dict of the unpruned one (plan already checked).

        Keys of removed parts are dropped; parameters shared between components are
        sliced to the kept parts. Kept keys keep their original block indices.
        """
        drop = tuple(path + "." for path in self.removed_module_paths(config, plan))
        slices: dict[str, list[tuple[int, slice]]] = {}
        for spec in self.block_specs(config):
            if spec.index in plan.removed_blocks:
                continue
            for component in plan.removed_components.get(spec.index, []):
                for name, part in self.shared_parameter_slices(spec, component, config).items():
                    slices.setdefault(f"{spec.path}.{name}", []).append(part)
        out = {}
        for key, tensor in state_dict.items():
            if key.startswith(drop):
                continue
            if key in slices:
                tensor = _remove_slices(tensor, slices[key])
            out[key] = tensor
        return out

    # -- LoRAs made for the unpruned model ---------------------------------------------------
    def sliced_layers(self, config: Mapping[str, Any], plan: PrunePlan) -> dict[str, tuple[int, list[slice], int]]:
        """Linear layers the plan slices: module path -> (weight dim, removed slices, full size along it).

        FLUX single-stream blocks without ``attn`` or ``mlp`` keep only some input columns of
        their ``proj_out``.
        """
        out = {}
        for spec in self.block_specs(config):
            if spec.index in plan.removed_blocks:
                continue
            for component in plan.removed_components.get(spec.index, []):
                for name, (dim, sl) in self.shared_parameter_slices(spec, component, config).items():
                    if not name.endswith(".weight"):
                        continue
                    full = max(part.stop for other in spec.components
                               for n, (_, part) in self.shared_parameter_slices(spec, other, config).items() if n == name)
                    path = f"{spec.path}.{name[: -len('.weight')]}"
                    entry = out.setdefault(path, (dim, [], full))
                    entry[1].append(sl)
        return out

    def removed_module_paths(self, config: Mapping[str, Any], plan: PrunePlan) -> list[str]:
        """Module paths the plan removes: whole blocks, and the submodules of removed components."""
        out = []
        for spec in self.block_specs(config):
            if spec.index in plan.removed_blocks:
                out.append(spec.path)
                continue
            for component in plan.removed_components.get(spec.index, []):
                out += [f"{spec.path}.{sub}" for sub in self.component_submodules(spec, component)]
        return out

    def prune_lora_state_dict(self, lora: Mapping[str, torch.Tensor], config: Mapping[str, Any], plan: PrunePlan,
                              prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
        """A LoRA (Diffusers' format) for the unpruned model, made to fit the model pruned by ``plan``.

        Adapters of removed blocks and components are dropped; the ``lora_A`` of a sliced layer
        loses the input columns its weight lost (the LoRA's update ``B @ A`` is then the base
        model's update with those columns cut, so adding it to the pruned model equals adding
        it to the base model and pruning afterwards). Keys may carry ``prefix`` (e.g.
        ``"transformer."``). Returns the state dict and the dropped module paths. A ``lora_A``
        already cut to the pruned width is left as it is.
        """
        removed = self.removed_module_paths(config, plan)
        sliced = self.sliced_layers(config, plan)
        out, dropped = {}, []
        for key, tensor in lora.items():
            module, sep, rest = _without_prefix(key, prefix)[1].partition(".lora_")
            if sep and any(module == path or module.startswith(path + ".") for path in removed):
                if module not in dropped:
                    dropped.append(module)
                continue
            if sep and module in sliced:
                dim, parts, full = sliced[module]
                side = {1: "A", 0: "B"}[dim]  # input columns live in lora_A, output rows in lora_B
                if rest.startswith(side + ".") and tensor.shape[dim] == full:
                    tensor = _remove_slices(tensor, [(dim, sl) for sl in parts])
            out[key] = tensor
        return out, dropped

    # -- markers: what a stock class handed a pruned checkpoint trips over --------------------
    marker_parameters: Mapping[str, str] = {}
    """Component -> the name (relative to the block) of one parameter it owns in the stock block."""

    def removal_markers(self, config: Mapping[str, Any], plan: PrunePlan) -> list[str]:
        """One stock parameter name per removed block and per removed component.

        A pruned checkpoint stores a zero-size tensor under each of them. The pruned classes
        ignore these; a stock class built from the same config expects a full-size tensor
        there and stops with a shape error, instead of filling the removed parts with random
        weights.
        """
        out = []
        for spec in self.block_specs(config):
            if spec.index in plan.removed_blocks:
                out.append(f"{spec.path}.{self.marker_parameters[spec.components[0]]}")
            for component in plan.removed_components.get(spec.index, []):
                out.append(f"{spec.path}.{self.marker_parameters[component]}")
        return out

    # -- export to the stock class --------------------------------------------------------
    block_count_keys: Mapping[str, str] = {}
    """Block list (module path) -> the config key that counts its blocks, e.g. ``{"transformer_blocks": "num_layers"}``."""

    def check_stock_exportable(self, plan: PrunePlan) -> None:
        """Raise :class:`PlanError` unless ``plan`` removes whole blocks only (what a stock class can hold)."""
        if plan.removed_components:
            parts = "; ".join(f"block {i}: {', '.join(c)}" for i, c in sorted(plan.removed_components.items()))
            raise PlanError(
                f"This plan removes components inside blocks ({parts}); the stock {self.base_class_name} cannot "
                "hold such blocks. Export without --stock (the folder then carries its modeling code for "
                "`trust_remote_code=True`), or make a plan that removes whole blocks only."
            )

    def stock_block_paths(self, config: Mapping[str, Any], plan: PrunePlan) -> dict[str, str]:
        """Kept block path -> its path in the stock model, where the removed blocks are gone and the rest renumbered."""
        kept: dict[str, int] = {}
        out = {}
        for spec in self.block_specs(config):
            if spec.index in plan.removed_blocks:
                continue
            prefix = spec.path.rsplit(".", 1)[0]
            out[spec.path] = f"{prefix}.{kept.get(prefix, 0)}"
            kept[prefix] = kept.get(prefix, 0) + 1
        return out

    def stock_config(self, config: Mapping[str, Any], plan: PrunePlan) -> dict[str, Any]:
        """The stock class's ``config.json`` for the pruned model: the block counts reduced, no prune plan."""
        self.check_stock_exportable(plan)
        paths = self.stock_block_paths(config, plan)
        out = {k: v for k, v in config.items() if k not in ("prune_plan", "_name_or_path")}
        out["_class_name"] = self.base_class_name
        for prefix, key in self.block_count_keys.items():
            out[key] = sum(1 for p in paths if p.rsplit(".", 1)[0] == prefix)
        return out

    def stock_renamer(self, config: Mapping[str, Any], plan: PrunePlan):
        """A function taking a module path or parameter name of the pruned model to its name in the stock
        export (``None`` for one in a removed block; names outside the block lists unchanged)."""
        paths = self.stock_block_paths(config, plan)
        prefixes = tuple(prefix + "." for prefix in self.block_count_keys)

        def rename(name: str) -> str | None:
            if not name.startswith(prefixes):
                return name
            head, index, *rest = name.split(".", 2)
            new = paths.get(f"{head}.{index}")
            return None if new is None else ".".join([new, *rest])

        return rename

    def stock_state_dict(self, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         plan: PrunePlan) -> dict[str, torch.Tensor]:
        """The pruned model's weights (``state_dict``, or any part of it) under the stock model's names.

        Block keys are renumbered; keys of removed blocks must not occur (a pruned model has none).
        Works on 4-bit state dicts too (bitsandbytes' extra keys follow their weight's name).
        """
        self.check_stock_exportable(plan)
        rename = self.stock_renamer(config, plan)
        markers = set(self.removal_markers(config, plan))
        out = {}
        for key, tensor in state_dict.items():
            if key in markers and tensor.numel() == 0:
                continue  # the removed block is gone from the stock model: no marker needed
            new = rename(key)
            if new is None:
                raise PlanError(f"The weights hold {key}, a key of a block the plan removes; the weights and "
                                "the plan come from different models.")
            out[new] = tensor
        return out

    def check_lora_blocks(self, lora: Mapping[str, Any], config: Mapping[str, Any], prefix: str = "") -> None:
        """Raise :class:`CheckpointMismatchError` when a key of ``lora`` (under ``prefix``) names a block that
        the model of ``config`` does not have (an index beyond its count, or no index): the LoRA was made for
        another model."""
        blocks = {spec.path for spec in self.block_specs(config)}
        heads = tuple(self.block_count_keys)
        foreign = set()
        for key in lora:
            name = _without_prefix(key, prefix)[1]
            head, _, rest = name.partition(".")
            if head in heads:
                path = f"{head}.{rest.split('.', 1)[0]}" if rest else head
                if path not in blocks:
                    foreign.add(path)
        if foreign:
            shown = sorted(foreign)
            listed = ", ".join(shown[:3]) + (f", ... ({len(shown) - 3} more)" if len(shown) > 3 else "")
            counts = ", ".join(f"{int(config.get(key, 0) or 0)} {head}" for head, key in self.block_count_keys.items())
            raise CheckpointMismatchError(
                f"The LoRA has adapters for {listed}, which the base model ({counts}) does not have: it was made "
                "for another model. Use a LoRA made for this export's base model."
            )

    def stock_lora_state_dict(self, lora: Mapping[str, torch.Tensor], config: Mapping[str, Any], plan: PrunePlan,
                              prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
        """A LoRA for the unpruned model, for the stock export of ``plan`` (whole blocks removed, the rest renumbered).

        Stock Diffusers applies a LoRA by module names, so a base-model LoRA on a stock export would
        land in the wrong blocks; this one lands where the base model's did. Returns the state dict
        and the dropped module paths (original names).
        """
        self.check_stock_exportable(plan)
        self.check_lora_blocks(lora, config, prefix)
        kept, dropped = self.prune_lora_state_dict(lora, config, plan, prefix=prefix)
        rename = self.stock_renamer(config, plan)
        out = {}
        for key, tensor in kept.items():
            head, name = _without_prefix(key, prefix)
            out[head + rename(name)] = tensor
        return out, dropped


def _without_prefix(key: str, prefix: str) -> tuple[str, str]:
    """``(prefix, rest)`` when ``key`` starts with ``prefix`` (e.g. ``"transformer."``), else ``("", key)``."""
    return (prefix, key[len(prefix):]) if prefix and key.startswith(prefix) else ("", key)


def _remove_slices(tensor: torch.Tensor, parts: list[tuple[int, slice]]) -> torch.Tensor:
    """``tensor`` without the given (dim, slice) parts, all along one dimension."""
    dim = parts[0][0]
    removed = set()
    for d, sl in parts:
        assert d == dim, "slices of one parameter must share a dimension"
        removed.update(range(sl.start, sl.stop))
    keep = [i for i in range(tensor.shape[dim]) if i not in removed]
    index = torch.tensor(keep, dtype=torch.long, device=tensor.device)
    return tensor.index_select(dim, index).contiguous()
