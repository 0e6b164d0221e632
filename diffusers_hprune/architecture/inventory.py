"""Parameter inventory of a transformer: every block and component, counted on the meta device.

Used by ``hprune inspect`` and by every stage that needs sizes (planning, memory
estimates, reports). Nothing here needs weights: a config is enough.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from diffusers_hprune.architecture import BLOCK, BlockSpec, ModelFamily, get_family, registered_families
from diffusers_hprune.architecture.sizes import (
    BYTES_PER_PARAM,
    DTYPES,
    format_bytes,
    is_skipped,
    model_weight_bytes,
    param_bytes,
)
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.checks import InputError, read_text_file
from diffusers_hprune.utils.errors import UnsupportedModelError
from diffusers_hprune.utils.memo import Memo, config_key


def builtin_configs() -> dict[str, Traversable]:
    """The published transformer configs the registered families ship: name -> the file (in the ``configs`` folder
    of the family's folder; e.g. ``sd3.5-large-turbo`` -> ``families/sd3/configs/sd3.5-large.json``)."""
    out = {}
    for family in registered_families():
        for name, file in family.builtin_configs.items():
            out[name] = resources.files(family.folder_package) / "configs" / file
    return out


#: Bounds of a transformer config's sizes (inclusive), checked before anything is built or counted from it. The
#: public models sit far inside them (FLUX.1: 19 + 38 blocks, 24 heads of 128; SD3.5 Large: 38 blocks, 38 heads
#: of 64); a config beyond them is refused instead of allocating gigabytes (``num_layers`` 1e8).
CONFIG_BOUNDS = {
    "num_layers": (1, 1000), "num_single_layers": (0, 1000), "num_attention_heads": (1, 1024),
    "attention_head_dim": (1, 1024), "joint_attention_dim": (1, 65536), "caption_projection_dim": (1, 65536),
    "pooled_projection_dim": (1, 65536), "in_channels": (1, 4096), "out_channels": (1, 4096), "patch_size": (1, 64),
    "sample_size": (1, 16384), "pos_embed_max_size": (1, 16384),
}
#: The widest transformer accepted: heads x head size.
MAX_WIDTH = 65536


def check_config_bounds(config: Mapping[str, Any], source: str | os.PathLike = "the transformer config") -> dict:
    """``config`` (as a dict) when every size in :data:`CONFIG_BOUNDS` is an integer within its bounds and the width
    at most :data:`MAX_WIDTH`; an ``UnsupportedModelError`` naming the first that is not, otherwise."""
    if not isinstance(config, Mapping):
        raise UnsupportedModelError(f"{source} is not a transformer config (a JSON object); use the config.json that "
                                    "save_pretrained wrote.")
    for key, (low, high) in CONFIG_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UnsupportedModelError(f"{source}: {key} must be an integer from {low} to {high:,}, got {value!r}; "
                                        "the config is damaged or not a transformer of a supported model.")
    heads, size = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(size, int) and heads * size > MAX_WIDTH:
        raise UnsupportedModelError(f"{source}: num_attention_heads x attention_head_dim is {heads * size:,}, more "
                                    f"than {MAX_WIDTH:,}; the config is damaged or not a supported transformer.")
    return dict(config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text_file(path, "transformer config"))
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON ({e}); the file is corrupt.") from None
    except InputError as e:
        raise UnsupportedModelError(str(e)) from None
    return check_config_bounds(data, path)


def load_transformer_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A transformer config from a built-in name, a ``config.json``, a model or pipeline folder, or a Hub repo id.

    Built-in names (:func:`builtin_configs`): ``sd3-medium``, ``sd3.5-large``, ``sd3.5-large-turbo``, ``sd3.5-medium``,
    ``flux.1-schnell``, ``flux.1-dev``. A repo id reads only ``transformer/config.json``
    (from the local Hugging Face cache when offline).
    """
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    configs = builtin_configs()
    if text in configs:
        return json.loads(configs[text].read_text(encoding="utf-8"))
    path = Path(text)
    if path.is_file():
        return _read_json(path)
    if path.is_dir():
        for candidate in (path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():
                return _read_json(candidate)
        raise UnsupportedModelError(
            f"{path} has neither config.json nor transformer/config.json; pass a transformer folder, "
            "a pipeline folder or a config file."
        )
    if text.count("/") == 1 and not text.startswith((".", "/")):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        for filename in ("transformer/config.json", "config.json"):
            try:
                return _read_json(Path(hf_hub_download(text, filename)))
            except EntryNotFoundError:
                continue
            except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as e:
                raise UnsupportedModelError(
                    f"Could not get the transformer config of {text!r} from the Hub or the local cache ({e})."
                ) from None
    raise UnsupportedModelError(
        f"{text!r} is not a config file, a model or pipeline folder, a Hub repo id or a built-in config; "
        f"built-in configs: {', '.join(configs)}."
    )


def build_on_meta(config: Mapping[str, Any], pruned: bool | None = None) -> torch.nn.Module:
    """Instantiate the transformer of ``config`` without allocating weights (meta device).

    With a ``prune_plan`` in the config (and ``pruned`` not False) the family's stock class is
    built and the plan applied to it, as the pruned classes do in ``__init__``: the same modules
    and parameters, without needing the pruned classes.
    """
    family = get_family(config)
    config = dict(config)
    plan = config.pop("prune_plan", None)
    if pruned is None:
        pruned = bool(plan)
    with init_empty_weights(include_buffers=True):  # buffers too: the SD3 position table alone is 360 MB
        model = family.base_class.from_config(config)
        if pruned and plan:
            family.apply_plan(model, family.check_plan(PrunePlan.from_dict(plan), config))
    return model


@dataclass
class BlockInventory:
    """Parameters of one block (in the unpruned model) and what the plan does to it."""

    spec: BlockSpec
    params: int
    components: dict[str, int]
    removed: bool = False
    removed_components: tuple[str, ...] = ()
    nbytes: dict[str, dict[str, int]] = field(default_factory=dict)
    """dtype -> {"block" or component -> weight bytes} (see :mod:`diffusers_hprune.architecture.sizes`)."""

    @property
    def status(self) -> str:
        if self.removed:
            return "removed"
        return "pruned" if self.removed_components else "kept"

    @property
    def removed_params(self) -> int:
        if self.removed:
            return self.params
        return sum(self.components[c] for c in self.removed_components)


@dataclass
class TransformerInventory:
    """The parameter inventory of one transformer (see :func:`inspect_transformer`)."""

    family: ModelFamily
    config: dict[str, Any]
    blocks: list[BlockInventory]
    original_params: int
    params: int
    name: str = ""
    plan_description: str = ""
    notes: list[str] = field(default_factory=list)
    original_bytes: dict[str, int] = field(default_factory=dict)
    """dtype -> weight bytes of the unpruned transformer."""

    @property
    def non_block_params(self) -> int:
        return self.original_params - sum(b.params for b in self.blocks)

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params / self.original_params

    def nbytes(self, dtype: str = "bf16", params: int | None = None) -> int:
        """Weight bytes at ``dtype``: of the transformer as it is (pruned parts gone), or of ``params`` parameters.

        ``nf4`` needs the per-parameter accounting, so it is available for the transformer
        itself only (``params`` must be None).
        """
        if params is not None:
            if dtype not in BYTES_PER_PARAM:
                raise ValueError(f"Bytes of a bare parameter count are defined for {', '.join(BYTES_PER_PARAM)} only.")
            return params * BYTES_PER_PARAM[dtype]
        return self.original_bytes[dtype] - sum(self.removed_bytes(b, dtype) for b in self.blocks)

    @staticmethod
    def removed_bytes(block: BlockInventory, dtype: str) -> int:
        if block.removed:
            return block.nbytes[dtype][BLOCK]
        return sum(block.nbytes[dtype][c] for c in block.removed_components)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "name": self.name,
            "original_params": self.original_params,
            "params": self.params,
            "non_block_params": self.non_block_params,
            "blocks": [
                {
                    "index": b.spec.index,
                    "path": b.spec.path,
                    "kind": b.spec.kind,
                    "status": b.status,
                    "params": b.params,
                    "components": b.components,
                    "removed_components": list(b.removed_components),
                }
                for b in self.blocks
            ],
        }


def inspect_transformer(source: Any) -> TransformerInventory:
    """Count the parameters of every block and component of a transformer.

    ``source`` may be a transformer instance, a config dict, or anything
    :func:`load_transformer_config` accepts. Counting happens on the meta device,
    so even FLUX.1 needs no memory. For a pruned transformer the counts are those
    of the original blocks, and each block says what the plan removed.
    """
    if isinstance(source, torch.nn.Module):
        config = dict(source.config)
        # a transformer built in code (not loaded) has no _class_name in its config: its class names it
        config.setdefault("_class_name", type(source).__name__)
        name = str(config.get("_name_or_path", type(source).__name__))
        params = sum(p.numel() for p in source.parameters())
    else:
        config = load_transformer_config(source)
        # the source as given: a saved config's _name_or_path names the folder it was first loaded from
        name = str(source) if isinstance(source, (str, os.PathLike)) else str(config.get("_name_or_path", ""))
        params = None
    family = get_family(config)
    counts = _unpruned_counts(config)
    if params is None:
        params = _PRUNED_PARAMS.get(config_key(config), lambda: sum(p.numel() for p in build_on_meta(config).parameters()))
    plan = family.empty_plan(config)
    if config.get("prune_plan"):
        plan = family.check_plan(PrunePlan.from_dict(config["prune_plan"]), config)
    blocks = [
        BlockInventory(
            spec=spec,
            params=block_params,
            components=dict(components),
            removed=spec.index in plan.removed_blocks,
            removed_components=tuple(plan.removed_components.get(spec.index, ())),
            nbytes={dtype: dict(sizes) for dtype, sizes in nbytes.items()},
        )
        for spec, (block_params, components, nbytes) in zip(family.block_specs(config), counts.blocks)
    ]
    return TransformerInventory(
        family=family,
        config=config,
        blocks=blocks,
        original_params=counts.params,
        params=params,
        name=name,
        plan_description="" if plan.is_empty else plan.describe(),
        original_bytes=dict(counts.nbytes),
    )


@dataclass(frozen=True)
class _Counts:
    """What :func:`inspect_transformer` counts on the unpruned model: per block (params, component params, bytes)."""

    blocks: tuple[tuple[int, dict[str, int], dict[str, dict[str, int]]], ...]
    params: int
    nbytes: dict[str, int]


# Counting builds the whole model on meta; `hprune budget` and the `--gpu-memory` fit inspect the same
# few configs dozens of times. Callers get fresh inventories from the kept counts (they may set ``name``).
_COUNTS: Memo[_Counts] = Memo()
_PRUNED_PARAMS: Memo[int] = Memo()


def _unpruned_counts(config: Mapping[str, Any]) -> _Counts:
    def count() -> _Counts:
        family = get_family(config)
        original = build_on_meta(config, pruned=False)
        blocks = []
        for spec, module in zip(family.block_specs(config), family.block_modules(original)):
            sizes = {c: family.component_parameters(module, spec, c, config) for c in (BLOCK, *spec.components)}
            skipped = is_skipped(spec.path, family.default_nf4_skip_modules)
            nbytes = {
                dtype: {
                    c: sum(param_bytes(n, dtype, linear and not skipped,
                                       tables=not _is_slice(c, name, spec, family, config))
                           for name, n, linear in parts)
                    for c, parts in sizes.items()
                }
                for dtype in DTYPES
            }
            components = {c: sum(n for _, n, _ in sizes[c]) for c in spec.components}
            blocks.append((sum(n for _, n, _ in sizes[BLOCK]), components, nbytes))
        return _Counts(tuple(blocks), sum(p.numel() for p in original.parameters()),
                       {dtype: model_weight_bytes(original, dtype) for dtype in DTYPES})

    return _COUNTS.get(config_key(config, drop=("prune_plan",)), count)


def _is_slice(component: str, name: str, spec: BlockSpec, family: ModelFamily, config) -> bool:
    return component != BLOCK and name in family.shared_parameter_slices(spec, component, config)


def _size(nbytes: int) -> str:
    return format_bytes(nbytes)


def format_inventory(inventory: TransformerInventory, dtype: str = "bf16") -> str:
    """A plain-text table: one row per block with its components' parameter counts."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    family = inventory.family
    names = list(family.component_names)
    header = ["block", "path", "kind", "status", "params", f"MB@{dtype}"] + names
    rows = []
    for b in inventory.blocks:
        cells = [str(b.spec.index), b.spec.path, b.spec.kind + ("+dual" if b.spec.dual_attention else ""), b.status]
        cells += [f"{b.params:,}", f"{b.nbytes[dtype][BLOCK] / 1e6:,.1f}"]
        for c in names:
            if c not in b.components:
                cells.append("")
            else:
                mark = "-" if b.removed or c in b.removed_components else ""
                cells.append(f"{mark}{b.components[c]:,}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    right = {4, 5} | set(range(6, len(header)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [
        f"{inventory.name or family.display_name}: {family.display_name} transformer ({family.name}), "
        f"{len(inventory.blocks)} blocks",
    ]
    if inventory.plan_description:
        out.append(f"prune plan: {inventory.plan_description}")
    out += ["", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + [""]
    out.append("(a leading '-' marks a removed component; counts are those of the original block)")
    out.append(f"embeddings, norm_out and proj_out: {inventory.non_block_params:,} parameters")
    out.append(
        f"original:  {inventory.original_params:,} parameters, "
        f"{_size(inventory.original_bytes[dtype])} at {dtype}"
    )
    if inventory.params != inventory.original_params:
        out.append(
            f"pruned:    {inventory.params:,} parameters, {_size(inventory.nbytes(dtype))} at {dtype} "
            f"({inventory.removed_fraction:.1%} removed)"
        )
    return "\n".join(out)
