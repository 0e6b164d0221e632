"""Publishing a compressed pipeline folder to the Hugging Face Hub (``hprune push``).

The folder is exported first (:func:`diffusers_hprune.hub.export.export_folder`, into a
temporary folder beside it; the folder itself is not changed), so what goes up loads with
stock Diffusers: the stock classes for a plan that removes whole blocks, the pruned classes'
code with ``auto_map`` otherwise. Then one repository (``create_repo(exist_ok=True)``) and one
commit (``upload_folder``) with the pipeline, its model card (``README.md``) and sample
images. Training leftovers (checkpoints, the data cache, logs, validation grids, hidden
temporary files) stay home. The repository id and the credentials are checked before
anything is written, created or uploaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.export import check_export, export_folder, write_json
from diffusers_hprune.hub.file_card import write_file_card
from diffusers_hprune.hub.folders import folder_format, folder_plan, read_json
from diffusers_hprune.hub.gguf_file import export_gguf
from diffusers_hprune.hub.single_file import FILE_FORMATS, export_single_file
from diffusers_hprune.loading import check_pipeline_weights
from diffusers_hprune.pipelines.pruned import stock_pipeline_name
from diffusers_hprune.utils.errors import HPruneError

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


def upload_tree(folder: str | os.PathLike) -> list[str]:
    """The files ``push_folder`` uploads, relative to ``folder`` (as ``upload_folder`` filters them)."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS))


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``ORG/NAME`` (``huggingface_hub``'s rules); ``PushError`` otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'.")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--repo-id must be ORG/NAME (or USER/NAME), e.g. my-org/sd3.5-large-hprune, got {repo_id!r}: "
                        f"{str(e).strip()} Nothing was written or uploaded.") from None
    return repo_id


def check_pipeline_folder(folder: str | os.PathLike, *, weights: bool = True) -> Path:
    """``folder`` as a Path when it is a pipeline folder; with ``weights``, its weight files checked too."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise PushError(f"{folder} is not a pipeline folder (no model_index.json); push the folder that "
                        "`hprune distill`, `hprune quantize`, `hprune compress` or `save_pretrained` wrote.")
    if weights:
        check_pipeline_weights(folder)  # safetensors only, none damaged: nothing broken is uploaded
    return folder


@contextlib.contextmanager
def exported(folder: str | os.PathLike, format: str | None = None, repo_id: str | None = None, *,
             quant: str | None = None, dtype: str | None = None, base_model: str | None = None,
             license: str | None = None) -> Iterator[Path]:
    """``folder`` exported for the Hub (:func:`export_folder`) in a temporary folder beside it, removed afterwards.

    A folder that is an export already is used as it is. A file format (:data:`FILE_FORMATS`) exports the transformer
    as one file (``NAME.safetensors`` / ``NAME-QUANT.gguf``, NAME from ``repo_id``) beside ``transformer/config.json``
    (its stock Diffusers config, what ``from_single_file(config=repo_id, subfolder="transformer")`` reads) and a
    model card naming ``base_model`` (required: the card says where the other components come from).
    """
    folder = check_pipeline_folder(folder, weights=False)  # export_folder checks the weights as it reads them
    already = folder_format(folder)
    if format not in FILE_FORMATS and already is not None and format in (None, already):
        check_pipeline_weights(folder)
        yield check_export(folder)  # uploaded as it is: only what an export writes
        return
    if format in FILE_FORMATS and not base_model:
        raise PushError(f"--format {format} needs --base-model ID: the card of a single file names the pipeline its "
                        "text encoders and VAE come from. Nothing was written or uploaded.")
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.push-", dir=folder.parent))
    try:
        if format not in FILE_FORMATS:
            yield export_folder(folder, scratch / folder.name, format=format, repo_id=repo_id)
            return
        yield _file_export(folder, scratch / folder.name, format, repo_id, quant=quant, dtype=dtype,
                           base_model=base_model, license=license)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # only what exported() wrote


def _file_export(folder: Path, out: Path, format: str, repo_id: str | None, *, quant, dtype, base_model,
                 license) -> Path:
    name = (repo_id or folder.name).split("/")[-1]
    out.mkdir()
    if format == "gguf":
        quant = quant or "Q8_0"
        file, _ = export_gguf(folder, out / f"{name}-{quant}.gguf", quant=quant, progress=False)
    else:
        file = export_single_file(folder, out / f"{name}.safetensors", dtype=dtype)
    config, plan = folder_plan(folder)
    (out / "transformer").mkdir()
    write_json(out / "transformer" / "config.json", get_family(config).stock_config(config, plan))
    pipeline = stock_pipeline_name(read_json(folder / "model_index.json")["_class_name"])
    write_file_card(out, file_name=file.name, config=config, plan=plan, pipeline_class=pipeline,
                    base_model=base_model, repo_id=repo_id or name, quant=quant if format == "gguf" else None,
                    license=license)
    return out


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, api=None, format: str | None = None, card=None,
                file_options: dict | None = None) -> str:
    """Export ``folder`` (``format``: ``stock``, ``remote``, ``single-file``, ``gguf`` or the plan's default), create
    ``repo_id`` if needed and upload the export in one commit; returns the commit URL. ``file_options``: for a file
    format, :func:`exported`'s ``quant``, ``dtype``, ``base_model`` (required) and ``license``.

    ``card``: called with the exported folder before the upload (``hprune push --base-model``
    writes the model card there). ``folder`` itself is left as it is.

    Raises:
        PushError: ``folder`` is not a pipeline folder, the export has no model card
            (``README.md``), ``repo_id`` is not ``ORG/NAME``, or no token is available (nothing is
            written or uploaded then).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    check_pipeline_folder(folder)
    token = require_token(token)
    with exported(folder, format, repo_id, **(file_options or {})) as export:
        if card is not None:
            card(export)
        if not (export / "README.md").is_file():
            raise PushError(f"{folder} has no model card (README.md); write one first (`hprune push ... --base-model "
                            "ID` writes it, or diffusers_hprune.hub.write_model_card).")
        api = api or HfApi(token=token)
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, repo_type="model", folder_path=str(export), ignore_patterns=IGNORE_PATTERNS,
                commit_message=commit_message or "Upload a HierarchicalPrune-compressed pipeline (diffusers-hprune)",
            )
        except Exception as e:  # the Hub client's errors: HTTP status, offline mode, network, authentication
            raise PushError(
                f"Publishing to https://huggingface.co/{repo_id} failed ({type(e).__name__}: {str(e).strip()[:300]}). "
                "Check the network connection (and that HF_HUB_OFFLINE is not set), the token's write access and the "
                f"repository name, then push again; {folder} itself was not changed."
            ) from None
    return str(getattr(info, "commit_url", info))


__all__ = ["IGNORE_PATTERNS", "PushError", "check_repo_id", "exported", "push_folder", "require_token", "upload_tree"]
