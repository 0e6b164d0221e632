"""A LoRA made for the base model, loaded into a stock export: refused, with the command that converts it.

A stock export (``hprune export --format stock``) is the stock Diffusers class with the kept
blocks renumbered from 0. Stock Diffusers applies a LoRA by module names, so the base model's
LoRA lands on the wrong blocks (FLUX: a changed image, no warning; SD3: a size mismatch).
``import diffusers_hprune`` makes Diffusers' ``load_lora_adapter`` (which
``pipe.load_lora_weights`` calls) ask :func:`check_lora` first
(:func:`diffusers_hprune.utils.registration.guard_lora_loading`).

What it can tell: a LoRA with an adapter in a block the export does not have (an index at or
beyond its block count) was made for a deeper model; the export's side file
(``transformer/hprune_plan.json``) says which model and which blocks moved. A LoRA made for the
export, or converted by ``hprune convert-lora``, names only blocks the export has and loads as
usual. A base-model LoRA that touches only blocks below the export's count cannot be told from
one made for the export; docs/sharing.md says so. Without ``import diffusers_hprune`` nothing
checks (stock Diffusers runs no code of ours).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.folders import PLAN_FILE, FolderError, read_json
from diffusers_hprune.utils.errors import CheckpointMismatchError, UnsupportedModelError


def side_file_of(model) -> Path | None:
    """The stock export side file of a transformer Diffusers loaded, found from ``config._name_or_path``
    (``<folder>/transformer`` when a pipeline loaded it; the pipeline folder or Hub id with
    ``subfolder="transformer"``, then only a file already in the Hub cache is read). ``None`` if none."""
    name = str(getattr(model, "config", {}).get("_name_or_path", "") or "")
    if not name:
        return None
    try:
        for candidate in (Path(name) / PLAN_FILE, Path(name) / "transformer" / PLAN_FILE):
            if candidate.is_file():
                return candidate
        if Path(name).exists():
            return None
    except OSError:  # a name no file system takes (too long, say): not a folder
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, f"transformer/{PLAN_FILE}")
    except Exception:  # not a repo id: nothing to find
        return None
    return Path(cached) if isinstance(cached, str) else None


def _out_of_range(keys, prefix: str, counts: Mapping[str, int]) -> list[str]:
    """The block paths (``transformer_blocks.23``) that ``keys`` name at or beyond ``counts`` of their list."""
    heads = "|".join(re.escape(k) for k in counts)
    pattern = re.compile(rf"({heads})\.(\d+)\.")
    found = set()
    for key in keys:
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        match = pattern.match(name)
        if match and int(match.group(2)) >= counts[match.group(1)]:
            found.add((match.group(1), int(match.group(2))))
    return [f"{head}.{index}" for head, index in sorted(found)]


def check_lora(model, state_dict: Mapping[str, Any], prefix: str | None) -> None:
    """Raise :class:`CheckpointMismatchError` when ``state_dict`` (a LoRA in Diffusers' format, as
    ``load_lora_adapter`` gets it) was made for a deeper model than the stock export ``model``."""
    side = side_file_of(model)
    if side is None:
        return
    try:
        family = get_family(model.config)
        original = read_json(side)["original_config"]
    except (UnsupportedModelError, FolderError, KeyError, TypeError):
        return  # not a side file this version reads: load as stock Diffusers would
    counts = {head: int(model.config.get(key, 0) or 0) for head, key in family.block_count_keys.items()}
    beyond = _out_of_range(state_dict.keys(), f"{prefix}." if prefix else "", counts)
    if not beyond:
        return
    folder = side.parent.parent
    total = sum(int(original.get(key, 0) or 0) for key in family.block_count_keys.values())
    shown = ", ".join(beyond[:3]) + (f", ... ({len(beyond) - 3} more)" if len(beyond) > 3 else "")
    raise CheckpointMismatchError(
        f"This LoRA was made for a model with more blocks than this stock export, which keeps "
        f"{sum(counts.values())} of the {total} blocks of {original.get('_name_or_path') or 'its base model'}, "
        f"renumbered from 0 ({side} says which). The LoRA has adapters for {shown}, which this model does not have, "
        "and the rest would land on the wrong blocks. Convert it once for this export, then load the converted "
        f"file: `hprune convert-lora LORA --to {folder} --out converted.safetensors` (LORA: the .safetensors file "
        "or its folder)."
    )


__all__ = ["check_lora", "side_file_of"]
