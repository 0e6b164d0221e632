"""What a pipeline folder holds, as the card and the export read it: its plan and its export format."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.remote_code import MODULE_NAME
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import HPruneError

FORMATS = ("stock", "remote")
"""Export formats: the stock Diffusers classes (whole blocks removed), or the pruned classes as remote code."""
PLAN_FILE = "hprune_plan.json"
"""The side file of a stock export (in ``transformer/``): the plan with the original block indices."""
SIDE_FORMAT = "diffusers-hprune/stock-export"


class FolderError(HPruneError):
    """A folder that is not a pipeline folder, or one with unreadable files."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path} does not exist; export a pipeline folder that `hprune compress`, `distill`, "
                          "`quantize` or `save_pretrained` wrote.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FolderError(f"{path} is not valid JSON ({e}); write the folder again with the command that made it.") from None


def folder_plan(folder: str | os.PathLike) -> tuple[dict[str, Any], PrunePlan]:
    """The transformer config and prune plan of a pipeline folder, exported or not."""
    folder = Path(folder)
    config = read_json(folder / "transformer" / "config.json")
    if (folder / "transformer" / PLAN_FILE).is_file():
        side = read_json(folder / "transformer" / PLAN_FILE)
        return side["original_config"], PrunePlan.from_dict(side["plan"])
    family = get_family(config)
    plan = PrunePlan.from_dict(config["prune_plan"]) if config.get("prune_plan") else family.empty_plan(config)
    return config, plan


def folder_format(folder: str | os.PathLike) -> str | None:
    """``"stock"`` or ``"remote"`` for a folder :func:`export_folder` wrote, ``None`` for any other."""
    transformer = Path(folder) / "transformer"
    if (transformer / PLAN_FILE).is_file():
        return "stock"
    if (transformer / f"{MODULE_NAME}.py").is_file():
        return "remote"
    return None


def default_format(plan: PrunePlan) -> str:
    """``stock`` when the plan removes whole blocks only (the stock classes hold that), else ``remote``."""
    return "remote" if plan.removed_components else "stock"


def original_blocks(folder: str | os.PathLike) -> dict[str, str]:
    """For a stock export: each block's path in the exported model -> its path in the original model."""
    side = read_json(Path(folder) / "transformer" / PLAN_FILE)
    return {new: old for old, new in side["blocks"].items()}


__all__ = ["FORMATS", "PLAN_FILE", "SIDE_FORMAT", "FolderError", "default_format", "folder_format", "folder_plan",
           "original_blocks", "read_json"]
