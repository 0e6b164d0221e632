"""``hprune export --format single-file``: the pruned transformer as one ``.safetensors`` file in its family's
original key layout (Black Forest Labs' for FLUX.1, Stability AI's for SD3 / SD3.5), the layout single-file tools
(ComfyUI and the like) load and Diffusers' ``from_single_file`` converts. Whether a tool builds the pruned depth from
the file is the layout's ``tools_count_blocks`` (yes for FLUX.1; not for SD3, whose depth ComfyUI derives from
the width).

Only a plan that removes whole blocks fits: the file holds the stock model of the stock export (the kept blocks
renumbered), and the tools infer the block counts from its keys. The plan, the stock config and the original
config travel in the file's metadata (``hprune.*``) beside the ModelSpec fields (``modelspec.*``) that
single-file tools show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.hub.export import ExportError, source_folder
from diffusers_hprune.loading import check_pipeline_weights
from diffusers_hprune.utils.checks import InputError, check_not_inside
from diffusers_hprune.utils.errors import PlanError
from diffusers_hprune.utils.fileio import atomic_path, safetensors_user_modes
from diffusers_hprune.utils.quant_config import quantization_method

FILE_FORMATS = ("single-file", "gguf")
"""Export formats that write one file of the transformer (the other components stay those of the base model)."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""``--dtype`` of a single-file export: the weights' dtype in the file (default: as the folder stores them)."""
PLAN_KEY = "hprune.plan"
"""Metadata of a file this project wrote: the plan (JSON, original block indices)."""
CONFIG_KEY = "hprune.config"
"""Metadata: the stock Diffusers config of the file's model (JSON), what ``from_single_file(config=...)`` needs."""
ORIGINAL_CONFIG_KEY = "hprune.original_config"
"""Metadata: the unpruned model's config (JSON)."""


def _refused(plan, family) -> str:
    parts = "; ".join(f"block {i}: {', '.join(c)}" for i, c in sorted(plan.removed_components.items()))
    return (f"This plan removes components inside blocks ({parts}); the single-file and GGUF layouts of "
            f"{family.display_name or family.name} hold whole blocks only. Export it with --format remote (a Diffusers "
            "folder with the pruned classes' code, for trust_remote_code=True), or make a plan that removes whole "
            "blocks only.")


def stock_transformer(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], Any]:
    """The transformer of the pipeline folder ``folder`` as the stock Diffusers model of its whole-block plan:
    ``(weights, stock config, original config, plan)``; every weight in memory (a pruned FLUX.1 in bf16 is about
    16 GB of host memory).

    Raises:
        ExportError: not a pipeline folder, an export already, 4-bit weights, components removed inside blocks,
            or a family without an original layout.
    """
    from safetensors import safe_open

    folder = Path(folder)
    _, _, config, plan = source_folder(folder)
    family = get_family(config)
    if config.get("quantization_config"):
        raise ExportError(f"The transformer in {folder} holds quantised weights ({quantization_method(config)}), which "
                          "the single-file and GGUF layouts cannot carry. Export the 16-bit folder it was quantised "
                          "from (`hprune compress` keeps it as 4-distilled/); --format gguf quantises in the file's "
                          "own kinds.")
    if family.original_layout is None:
        raise ExportError(f"The {family.display_name or family.name} family has no single-file layout in "
                          "diffusers-hprune; export it with --format stock or --format remote.")
    if plan.removed_components:
        raise ExportError(_refused(plan, family))
    check_pipeline_weights(folder)  # safetensors only, none damaged
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update(family.stock_state_dict({k: f.get_tensor(k) for k in f.keys()}, config, plan))
    return tensors, family.stock_config(config, plan), config, plan


def original_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
    """The transformer of ``folder`` in its family's original layout (in ``dtype``, default as stored), the
    metadata a single file of it carries, and its family."""
    tensors, stock_config, config, plan = stock_transformer(folder)
    family = get_family(config)
    layout = family.original_layout
    try:
        original = layout.to_original(tensors, stock_config)
    except PlanError as e:
        raise ExportError(str(e)) from None
    if dtype is not None:
        original = {k: v.to(dtype) if v.is_floating_point() else v for k, v in original.items()}
    kept = family.num_blocks(config) - len(plan.removed_blocks)
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": layout.architecture(config),
        "modelspec.implementation": layout.implementation,
        "modelspec.title": f"{family.display_name or family.name}, {kept} of {family.num_blocks(config)} blocks "
                           "(HierarchicalPrune)",
        "modelspec.description": f"Pruned with diffusers-hprune: {plan.describe()}.",
        PLAN_KEY: json.dumps(plan.to_dict(), sort_keys=True),
        CONFIG_KEY: json.dumps(stock_config, sort_keys=True),
        ORIGINAL_CONFIG_KEY: json.dumps(config, sort_keys=True),
    }
    return original, metadata, family


def check_file_output(out: str | os.PathLike, folder: str | os.PathLike, suffix: str, overwrite: bool,
                      ours) -> Path:
    """``out`` as a Path when a file export may write it: ``suffix``, not inside ``folder``, and either absent or
    (with ``overwrite``) a file ``ours(path)`` recognises as one this project wrote."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise ExportError(f"--out {out} must end in {suffix}, the file type the tools recognise; name it "
                          f"{out.with_suffix(suffix).name}, say.")
    try:
        check_not_inside(out, folder, "--out", "FOLDER")
    except InputError as e:
        raise ExportError(str(e)) from None
    if out.is_dir():
        raise ExportError(f"{out} is a folder; --out names the file to write.")
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} exists; choose another --out or pass --overwrite.")
        if not ours(out):
            raise ExportError(f"{out} exists and is not a file diffusers-hprune wrote; --overwrite replaces only "
                              "earlier exports. Choose another --out.")
    return out


def _written_by_us(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return PLAN_KEY in (f.metadata() or {})
    except Exception:  # safetensors' own error types for foreign or damaged files
        return False


def export_single_file(folder: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                       overwrite: bool = False) -> Path:
    """Write the transformer of the pipeline folder ``folder`` to ``out`` (``.safetensors``) in its family's original
    key layout, in ``dtype`` (a :data:`DTYPES` name; default as stored). Written beside ``out`` and renamed into it
    when complete. Returns ``out``.

    Read back in Diffusers with ``<StockClass>.from_single_file(out, config=STOCK, subfolder="transformer")``, where
    ``STOCK`` is the stock export of the same folder (``hprune export``) or a Hub repository holding its
    ``transformer/config.json`` (``hprune push --format single-file`` uploads one).
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"Unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    out = check_file_output(out, folder, ".safetensors", overwrite, _written_by_us)
    tensors, metadata, _ = original_tensors(folder, DTYPES[dtype] if dtype else None)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        safetensors_user_modes(tmp)  # safetensors writes 0600 whatever the umask
    return out


__all__ = ["CONFIG_KEY", "DTYPES", "FILE_FORMATS", "ORIGINAL_CONFIG_KEY", "PLAN_KEY", "check_file_output",
           "export_single_file", "original_tensors", "stock_transformer"]
