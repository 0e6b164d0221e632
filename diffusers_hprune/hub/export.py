"""``hprune export``: a pruned pipeline folder as it goes to the Hub, loadable with stock Diffusers alone.

Two formats (:data:`FORMATS`):

- ``stock`` (plans that remove whole blocks only): the transformer becomes the stock
  ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` with fewer blocks, renumbered
  (the family's ``stock_config`` / ``stock_state_dict``), in the stock pipeline. The plan,
  with the original block indices, stays beside it in ``transformer/hprune_plan.json``.
- ``remote`` (any plan): the pruned transformer as it is, with its modeling code
  (``transformer/hprune_transformer.py``, :mod:`.remote_code`) named in ``auto_map`` and
  ``model_index.json``, for ``trust_remote_code=True``.

Either way ``model_index.json`` names the stock pipeline class (``StableDiffusion3Pipeline``,
``FluxPipeline``), so Diffusers' pipelines, ``from_pipe`` and ``AutoPipelineFor*`` treat it as
theirs. ``hprune push`` uploads exactly what :func:`export_folder` writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.card import rewrite_usage
from diffusers_hprune.hub.folders import (
    FORMATS,
    PLAN_FILE,
    SIDE_FORMAT,
    FolderError,
    default_format,
    folder_format,
    folder_plan,
    read_json,
)
from diffusers_hprune.hub.remote_code import MODULE_NAME, modeling_source
from diffusers_hprune.loading import check_pipeline_weights
from diffusers_hprune.pipelines.pruned import check_pipeline_family, stock_pipeline_name
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.checks import InputError, check_not_inside
from diffusers_hprune.utils.errors import CheckpointMismatchError
from diffusers_hprune.utils.fileio import atomic_directory, atomic_path, safetensors_user_modes
from diffusers_hprune.utils.plain_loading import record_fp32_default
from diffusers_hprune.utils.untrusted import check_model_index, input_files

#: Files of a pipeline folder an export leaves out (training leftovers, old custom-code files).
LEFT_OUT = ("checkpoint-*", ".*", "data-cache", "logs", "validation", "*.tmp", "hprune_*_pipeline.py")
#: What an export carries: in a component's folder, configs, weights, tokenizer files (vocabularies, merges,
#: sentencepiece models); at the top, JSON records, the card and its images, a license. Nothing else (no code:
#: a ``.py`` file in the source would be run by ``trust_remote_code=True``).
COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken")
TOP_SUFFIXES = (".json", ".md", ".txt", ".png", ".jpg", ".jpeg", ".webp")


class ExportError(FolderError):
    """A folder that cannot be exported in the format asked for."""


def _left_out(relative: Path) -> bool:
    if any(part.match(pattern) for part in map(Path, relative.parts) for pattern in LEFT_OUT):
        return True
    return relative.suffix.lower() not in (COMPONENT_SUFFIXES if len(relative.parts) > 1 else TOP_SUFFIXES)


def _with_auto_map(path: Path) -> dict[str, Any] | None:
    """A component's JSON file that names code in ``auto_map`` (its author's, not the project's), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "auto_map" in data else None


def _copy_config(source: Path, target: Path) -> None:
    """Copy a component's JSON file without ``auto_map``."""
    data = _with_auto_map(source)
    if data is None:
        _copy(source, target)
        return
    data.pop("auto_map")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, data)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)  # with the user's umask, not the source's mode


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A config or index as the export writes them: indented, keys sorted, a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _stock_metadata(metadata: dict[str, str], rename) -> dict[str, str]:
    """A shard's metadata under the stock names. torchao's safetensors (an int8 transformer) describe each
    parameter under its name and list them in ``tensor_names``: those are renamed as the tensors are, and the
    entries of removed blocks dropped. Other metadata (``format``) is kept as it is."""
    if "tensor_names" not in metadata:
        return metadata
    out = {}
    for key, value in metadata.items():
        if key == "tensor_names":
            out[key] = json.dumps([new for name in json.loads(value) if (new := rename(name)) is not None])
        elif key == "format":
            out[key] = value
        elif (new := rename(key)) is not None:
            out[new] = value
    return out


def _stock_transformer(source: Path, target: Path, config: dict[str, Any], plan: PrunePlan) -> None:
    """Write the stock transformer folder: renumbered weights, file by file (one shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    family = get_family(config)
    target.mkdir(parents=True, exist_ok=True)
    key_file: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path in sorted(source.iterdir()):
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                metadata = _stock_metadata(f.metadata() or {"format": "pt"}, family.stock_renamer(config, plan))
                tensors = family.stock_state_dict({k: f.get_tensor(k) for k in f.keys()}, config, plan)
            if not tensors:  # a shard that held only removal markers of removed blocks: nothing left to write
                continue
            save_file(tensors, str(target / path.name), metadata=metadata)
            safetensors_user_modes(target / path.name)  # safetensors writes 0600 whatever the umask
            for key, tensor in tensors.items():
                key_file[key] = path.name
                sizes[path.name] = sizes.get(path.name, 0) + tensor.numel() * tensor.element_size()
            del tensors
        elif path.name.endswith(".safetensors.index.json"):
            continue  # rewritten below from the shards
        elif path.name == "config.json":
            write_json(target / "config.json", family.stock_config(config, plan))
        elif path.is_file() and path.name != PLAN_FILE and not _left_out(Path("transformer", path.name)):
            _copy(path, target / path.name)
    for path in sorted(source.glob("*.safetensors.index.json")):
        index = read_json(path)
        shards = set(index.get("weight_map", {}).values())
        index["weight_map"] = {key: name for key, name in sorted(key_file.items()) if name in shards}
        index.setdefault("metadata", {})["total_size"] = sum(sizes[name] for name in shards if name in sizes)
        write_json(target / path.name, index)
    paths = family.stock_block_paths(config, plan)
    write_json(target / PLAN_FILE, {
        "format": SIDE_FORMAT, "version": 1, "plan": plan.to_dict(), "blocks": paths, "original_config": config,
    })


def source_folder(folder: Path) -> tuple[dict[str, Any], list[Path], dict[str, Any], PrunePlan]:
    """What every export reads of the pipeline folder ``folder`` before it writes anything: ``model_index.json``
    (checked: plain component names, folders present), its files (every link checked), the transformer config
    (without its author's ``auto_map``) and plan, its pipeline class of the config's family. ``ExportError`` for a
    folder that is no pipeline or an export already."""
    index = read_json(folder / "model_index.json")
    check_model_index(index, folder, error=ExportError)
    files = list(input_files(folder, error=ExportError))  # every link checked before anything is written
    if folder_format(folder) is not None:
        raise ExportError(f"{folder} is an export already ({folder_format(folder)}); export the folder it was "
                          "made from.")
    config, plan = folder_plan(folder)
    config.pop("auto_map", None)  # its author's code; a remote export writes the project's own
    check_pipeline_family(index["_class_name"], config, folder)
    return index, files, config, plan


def export_folder(folder: str | os.PathLike, out: str | os.PathLike, *, format: str | None = None,
                  overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write the pipeline folder ``folder`` to ``out`` in ``format`` (default: :func:`default_format`).

    The files a pipeline needs are copied (:data:`COMPONENT_SUFFIXES` in component folders,
    :data:`TOP_SUFFIXES` at the top; no code, no training leftovers :data:`LEFT_OUT`, no ``auto_map``
    but the one the export writes); the transformer, ``model_index.json`` and the model card's
    "How to use" section are rewritten for the format. ``folder`` is untrusted: component names
    must be plain names and symbolic links must stay inside it
    (:mod:`diffusers_hprune.utils.untrusted`). ``out`` is written beside its place and renamed into it when
    complete; an existing ``out`` is an error unless ``overwrite``. Returns ``out``.

    Raises:
        ExportError: ``folder`` is not a pipeline folder, or ``format`` is unknown or cannot
            hold the plan (``stock`` with components removed inside blocks).
    """
    folder, out = Path(folder), Path(out)
    index, files, config, plan = source_folder(folder)
    family = get_family(config)
    check_pipeline_weights(folder)  # a truncated file is named, not copied into the export
    format = format or default_format(plan)
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if format == "stock":
        family.check_stock_exportable(plan)
    try:
        check_not_inside(out, folder, "--out", "FOLDER")  # nor around it: --overwrite would delete it
        if out.exists() and not overwrite:
            raise ExportError(f"{out} exists; choose another --out or pass --overwrite.")
    except InputError as e:
        raise ExportError(str(e)) from None
    pipeline = stock_pipeline_name(index.get("_class_name", ""))
    with atomic_directory(out, overwrite=True) as tmp:
        tmp = Path(tmp)
        for path in files:
            relative = path.relative_to(folder)
            if _left_out(relative) or relative.parts[0] == "transformer":
                continue
            if relative.as_posix() in ("model_index.json", "README.md"):
                continue
            (_copy_config if relative.suffix == ".json" and len(relative.parts) > 1 else _copy)(path, tmp / relative)
        index = {**index, "_class_name": pipeline}
        index.pop("auto_map", None)
        if format == "stock":
            _stock_transformer(folder / "transformer", tmp / "transformer", config, plan)
            index["transformer"] = ["diffusers", family.base_class_name]
        else:
            for path in sorted((folder / "transformer").iterdir()):
                if path.is_file() and path.name != "config.json" and not _left_out(Path("transformer", path.name)):
                    _copy(path, tmp / "transformer" / path.name)
            class_name = config["_class_name"]
            auto_map = {"AutoModel": f"{MODULE_NAME}.{class_name}"}
            write_json(tmp / "transformer" / "config.json", {**config, "auto_map": auto_map})
            (tmp / "transformer" / f"{MODULE_NAME}.py").write_text(modeling_source(), encoding="utf-8")
            index["transformer"] = [MODULE_NAME, class_name]
            index["auto_map"] = auto_map  # AutoModel(subfolder="transformer") reads it here, not in config.json
        write_json(tmp / "model_index.json", index)
        record_fp32_default(tmp)  # a plain from_pretrained(repo) loads one dtype
        if (folder / "README.md").is_file():
            card = (folder / "README.md").read_text(encoding="utf-8")
            # the snippet loads the export where it is published: repo_id, the Hub id the card names, else `out`
            (tmp / "README.md").write_text(rewrite_usage(card, tmp, repo_id, where=out), encoding="utf-8")
    return out


def check_export(folder: str | os.PathLike) -> Path:
    """Refuse a folder that claims to be an export (``folder_format``) but holds what :func:`export_folder` never
    writes: a link out of it, a component name that is not a plain name, a file an export leaves out (code
    above all), an ``auto_map`` in a component's config, or remote code that is not this version's.

    ``hprune push`` uploads such a folder as it is, so this runs before anything goes up.
    """
    folder = Path(folder)
    check_model_index(read_json(folder / "model_index.json"), folder, error=ExportError)
    ours = {f"transformer/{MODULE_NAME}.py"} if folder_format(folder) == "remote" else set()
    stray = []
    for path in input_files(folder, error=ExportError):
        relative = path.relative_to(folder)
        if relative.parts[0].startswith(".") or relative.as_posix() in ours:
            continue  # hidden files are not uploaded (push's IGNORE_PATTERNS)
        if _left_out(relative):
            stray.append(relative.as_posix())
        elif (relative.suffix == ".json" and len(relative.parts) > 1 and relative.parts[0] != "transformer"
              and _with_auto_map(path) is not None):
            stray.append(f"{relative.as_posix()} (auto_map)")
    if stray:
        raise ExportError(f"{folder} holds what an export of diffusers-hprune never writes: {', '.join(stray[:8])}"
                          f"{' ...' if len(stray) > 8 else ''}. Nothing was uploaded; export the folder it was made "
                          "from again (`hprune export`) and push that.")
    if ours and (folder / f"transformer/{MODULE_NAME}.py").read_text(encoding="utf-8") != modeling_source():
        raise ExportError(f"{folder / 'transformer' / MODULE_NAME}.py is not the modeling code this version of "
                          "diffusers-hprune writes: nothing was uploaded. Export the folder it was made from again "
                          "(`hprune export`) and push that.")
    return folder


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _side_file(export: str | os.PathLike) -> Path:
    """The stock export's ``transformer/hprune_plan.json``, from a folder or a Hub repository."""
    local = Path(export)
    if local.is_dir():
        if folder_format(local) != "stock":
            raise ExportError(f"{local} is not a stock export (no transformer/{PLAN_FILE}); a LoRA for the base model "
                              "loads into pruned folders and remote-code exports as it is, with load_lora_weights.")
        return local / "transformer" / PLAN_FILE
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(export), f"transformer/{PLAN_FILE}"))
    except EntryNotFoundError:
        raise ExportError(f"{export} has no transformer/{PLAN_FILE}: it is not a stock export of diffusers-hprune, and "
                          "a LoRA for its base model loads into it as it is.") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as e:
        raise ExportError(f"Cannot read transformer/{PLAN_FILE} of {export!r} ({e}); give a stock export's folder, "
                          "or a Hub id you can reach.") from None


def _rename_metadata(metadata: dict[str, str], family, config, plan) -> dict[str, str]:
    """The LoRA's adapter config (``lora_adapter_metadata``) with full module names renumbered and removed ones dropped."""
    if "lora_adapter_metadata" not in metadata:
        return metadata
    try:
        adapter = json.loads(metadata["lora_adapter_metadata"])
    except ValueError as e:
        raise ExportError(f"The LoRA's lora_adapter_metadata is not JSON ({e}); the file is damaged. Save the LoRA "
                          "again (save_lora_weights), or remove that metadata entry.") from None
    if not isinstance(adapter, dict):
        raise ExportError(f"The LoRA's lora_adapter_metadata is a JSON {type(adapter).__name__}, not the adapter "
                          "config (a JSON object) that save_lora_weights writes; save the LoRA again.")
    rename = family.stock_renamer(config, plan)
    for key, value in list(adapter.items()):
        field = key.rsplit(".", 1)[-1]
        if field == "target_modules" and isinstance(value, list):
            if not all(isinstance(n, str) for n in value):
                raise ExportError(f"The LoRA's adapter metadata lists target_modules that are not all names: "
                                  f"{value[:5]!r}; save the LoRA again.")
            adapter[key] = [n for n in map(rename, value) if n is not None]
        elif field in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
            adapter[key] = {new: v for k, v in value.items() if (new := rename(k)) is not None}
    return {**metadata, "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}


def convert_lora_for_export(lora: str | os.PathLike, export: str | os.PathLike, out: str | os.PathLike, *,
                            overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write a LoRA made for the base model (Diffusers' format, a ``.safetensors`` file or the folder holding
    ``pytorch_lora_weights.safetensors``) as it fits the stock export ``export`` (a folder or a Hub id).

    A stock export renumbers the kept blocks, and stock Diffusers applies a LoRA by module names,
    so the base model's LoRA would land in the wrong blocks. The converted one drops the adapters
    of removed blocks and renames the rest (``ModelFamily.stock_lora_state_dict``); its adapter
    metadata is renamed the same way. Text-encoder adapters are kept as they are. Returns ``out``
    and the dropped module paths (the base model's names).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(lora)
    if source.is_dir():
        source = source / LORA_WEIGHTS
    if not source.is_file() or source.suffix != ".safetensors":
        raise ExportError(f"{lora} is not a LoRA .safetensors file (or a folder with {LORA_WEIGHTS}); give the file "
                          "that save_lora_weights or a trainer wrote.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another --out or pass --overwrite.")
    side_file = _side_file(export)
    side = read_json(side_file)
    if not (isinstance(side, dict) and isinstance(side.get("original_config"), dict)
            and isinstance(side.get("plan"), dict)):
        raise ExportError(f"{side_file} lacks the original_config and plan objects that `hprune export` writes; "
                          "export the pruned folder again.")
    config, plan = side["original_config"], PrunePlan.from_dict(side["plan"])
    family = get_family(config)
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ExportError(f"Cannot read the LoRA {source} ({e}); give a complete safetensors file.") from None
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    ours = {k: v for k, v in tensors.items() if not prefix or k.startswith(prefix)}
    others = {k: v for k, v in tensors.items() if k not in ours}  # text encoders: not touched
    try:
        converted, dropped = family.stock_lora_state_dict(ours, config, plan, prefix=prefix)
    except CheckpointMismatchError as e:
        raise ExportError(f"Cannot convert {source} for {export}: {e}") from None
    if not converted:
        raise ExportError(f"None of the LoRA's {len(ours)} transformer adapters is in a block the export keeps; "
                          "nothing to write.")
    with atomic_path(out) as tmp:
        save_file({**others, **converted}, str(tmp), metadata=_rename_metadata(metadata, family, config, plan))
        safetensors_user_modes(tmp)
    return out, dropped


__all__ = ["LORA_WEIGHTS", "ExportError", "check_export", "convert_lora_for_export", "export_folder", "source_folder",
           "write_json"]
