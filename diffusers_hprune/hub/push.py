"""Publishing a compressed pipeline folder to the Hugging Face Hub (``hprune push``).

One repository (``create_repo(exist_ok=True)``) and one commit (``upload_folder``) holding the
pipeline, its model card (``README.md``), sample images and the family's custom-code pipeline
file from ``pipelines/`` (``hprune_<family>_pipeline.py``, written into the folder before the
upload) for ``trust_remote_code=True`` loading. Training leftovers (checkpoints,
the data cache, logs, validation grids, hidden temporary files) stay home. The credentials are
checked before anything is created or uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers_hprune.families import get_family
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_path

#: Patterns (``fnmatch``, as ``upload_folder`` takes them) left out of the upload.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", "**/.*", "data-cache/**", "logs/**", "validation/**",
                   "*.tmp"]


class PushError(HPruneError):
    """A folder that is not ready to publish, or no credentials."""


def require_token(token: str | None = None) -> str:
    """``token``, else the logged-in one or ``HF_TOKEN``; ``PushError`` when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError("No Hugging Face token: run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN, "
                        "then push again. Nothing was uploaded.")
    return token


def remote_code_name(folder: str | os.PathLike) -> str:
    """``hprune_<family>_pipeline``: the ``custom_pipeline`` name of the pipeline folder ``folder``."""
    import json

    config_path = Path(folder) / "transformer" / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise PushError(f"Cannot read {config_path} ({e}); push a pipeline folder with a transformer.") from None
    return f"hprune_{get_family(config).name}_pipeline"


def add_remote_code(folder: str | os.PathLike) -> Path:
    """Copy the family's custom-code pipeline file from ``pipelines/`` into ``folder`` (atomically)."""
    from importlib.resources import files

    name = remote_code_name(folder) + ".py"
    target = Path(folder) / name
    with atomic_path(target) as tmp:
        tmp.write_bytes((files("diffusers_hprune.remote_code") / name).read_bytes())
    return target


def upload_tree(folder: str | os.PathLike) -> list[str]:
    """The files ``push_folder`` uploads, relative to ``folder`` (as ``upload_folder`` filters them)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, api=None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; returns the commit URL.

    Raises:
        PushError: ``folder`` is not a pipeline folder or has no model card (``README.md``),
            ``repo_id`` is not ``ORG/NAME``, or no token is available (nothing is uploaded then).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise PushError(f"{folder} is not a pipeline folder (no model_index.json); push the folder that "
                        "`hprune distill`, `hprune quantize`, `hprune compress` or `save_pretrained` wrote.")
    if not (folder / "README.md").is_file():
        raise PushError(f"{folder} has no model card (README.md); write one first (`hprune push ... --base-model "
                        "ID` writes it, or diffusers_hprune.hub.write_model_card).")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PushError(f"--repo-id must be ORG/NAME (or USER/NAME), got {repo_id!r}.")
    token = require_token(token)
    add_remote_code(folder)
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(folder), ignore_patterns=IGNORE_PATTERNS,
        commit_message=commit_message or "Upload a HierarchicalPrune-compressed pipeline (diffusers-hprune)",
    )
    return str(getattr(info, "commit_url", info))


__all__ = ["IGNORE_PATTERNS", "PushError", "add_remote_code", "push_folder", "remote_code_name", "require_token", "upload_tree"]
