"""The resumable state of a toy transformer's training: weights, AdamW moments, the EMA and the random stream.

``python -m diffusers_hprune.toy.train NAME --out DIR`` keeps it beside the pipeline folder, in ``DIR.state/``
(``state.safetensors`` and ``state.json``), written atomically every few minutes and when the wall-clock budget
ends; the next run with the same ``--out`` and settings continues from it, step for step as one long run would
(the same batches, noise and timesteps). Tensors are stored with safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusers_hprune.utils.checks import InputError
from diffusers_hprune.utils.fileio import atomic_path, atomic_write_json

#: What must match for a saved state to be continued (the rest of ``state.json`` is progress).
SETTINGS = ("name", "seed", "batch", "lr", "n_images", "config")


def state_folder(out: str | Path) -> Path:
    """Where the training state of the pipeline folder ``out`` lives: ``<out>.state`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".state")


def save_state(folder: Path, settings: dict, progress: dict, transformer, optimizer, ema, gen: torch.Generator) -> None:
    """Write the state (tensors first, then the JSON that names them, so a cut leaves the previous JSON valid)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in transformer.state_dict().items()}
    tensors |= {f"ema.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}
    for i, slot in optimizer.state_dict()["state"].items():
        tensors |= {f"adam.{i}.{k}": torch.as_tensor(v).contiguous() for k, v in slot.items()}
    tensors["rng"] = gen.get_state()
    folder.mkdir(parents=True, exist_ok=True)
    step = int(progress["step"])
    with atomic_path(folder / f"state-{step}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    previous = read_settings(folder)
    atomic_write_json(folder / "state.json", {**settings, **progress, "ema_optimization_step": ema.optimization_step,
                                              "tensors": f"state-{step}.safetensors"})
    if previous and previous.get("tensors") not in (None, f"state-{step}.safetensors"):
        (folder / previous["tensors"]).unlink(missing_ok=True)  # this module wrote it; the new one is in place


def read_settings(folder: Path) -> dict | None:
    """The ``state.json`` of ``folder``, or None when there is none."""
    path = Path(folder) / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def record(folder: Path, **fields) -> None:
    """Add ``fields`` (progress that holds no tensor, e.g. evaluations) to the ``state.json`` of ``folder``."""
    atomic_write_json(Path(folder) / "state.json", read_settings(folder) | fields)


def check_resumable(folder: Path, settings: dict) -> dict | None:
    """The saved progress of ``folder`` if it continues ``settings``; None if there is none; else an InputError."""
    saved = read_settings(folder)
    if saved is None:
        return None
    differ = [k for k in SETTINGS if saved.get(k) != json.loads(json.dumps(settings[k]))]
    if differ:
        raise InputError(f"{folder} holds the training state of another run ({', '.join(differ)} differ: "
                         + "; ".join(f"{k} {saved.get(k)!r} there, {settings[k]!r} now" for k in differ)
                         + "). Give the settings it was started with, or another --out.")
    return saved


def load_state(folder: Path, saved: dict, transformer, optimizer, ema, gen: torch.Generator) -> None:
    """Put the state named by ``saved`` (from :func:`check_resumable`) into the live objects."""
    tensors = load_file(str(Path(folder) / saved["tensors"]))
    transformer.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(ema.shadow_params):
        p.copy_(tensors[f"ema.{i}"])
    ema.optimization_step = int(saved["ema_optimization_step"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    gen.set_state(tensors["rng"])
