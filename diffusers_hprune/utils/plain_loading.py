"""Pipeline folders that load in one dtype when no ``torch_dtype`` is given.

Diffusers builds its own models (transformer, VAE) in fp32 unless told otherwise, whatever
dtype their files hold. Transformers 5 builds a model in the dtype its ``config.json``
records (``dtype``, earlier ``torch_dtype``), which for 16-bit text encoders is 16-bit. So a
plain ``DiffusionPipeline.from_pretrained(folder)`` of a folder with 16-bit text encoders
gives fp16 prompt embeddings to an fp32 transformer, and the first call fails. Every
pipeline folder diffusers-hprune writes records ``float32`` for its Transformers components
instead: a plain load then gives fp32 throughout (Diffusers' own default), and an explicit
``torch_dtype`` still gives that dtype throughout. The weights files are not touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers_hprune.utils.fileio import atomic_write_json

DTYPE_KEYS = ("dtype", "torch_dtype")


def record_fp32_default(folder: str | os.PathLike) -> list[str]:
    """Make the Transformers components of the pipeline folder ``folder`` load in fp32 by default.

    Sets ``dtype`` (and ``torch_dtype``, where present) to ``"float32"`` in the ``config.json``
    of every component that ``model_index.json`` names from ``transformers`` and whose config
    records another dtype or none. Returns the components changed. A folder without
    ``model_index.json`` is left alone.
    """
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    changed = []
    for name, entry in index.items():
        path = folder / name / "config.json"
        if not (isinstance(entry, list) and entry and entry[0] == "transformers" and path.is_file()):
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        recorded = [k for k in DTYPE_KEYS if k in config] or ["dtype"]  # none: Transformers takes the files' dtype
        if all(config.get(k) == "float32" for k in recorded):
            continue
        config.update(dict.fromkeys(recorded, "float32"))
        atomic_write_json(path, config)
        changed.append(name)
    return changed


__all__ = ["DTYPE_KEYS", "record_fp32_default"]
