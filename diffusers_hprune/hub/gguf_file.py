"""``hprune export --format gguf``: the single-file export's tensors (the family's original layout) in one GGUF file,
quantised with the ``gguf`` package (llama.cpp's ``gguf-py``), as ComfyUI-GGUF loads them (FLUX.1; see
``OriginalLayout.tools_count_blocks``) and Diffusers reads them
(``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``).

The community's conventions: ``general.architecture`` is ``flux`` / ``sd3``; tensors of fewer than two dimensions
(biases, norm scales) and the embedders and final layer (the layout's ``high_precision`` prefixes) stay in 32 bits
(lossless from bf16; they are a small part of the model and its most sensitive); a weight whose rows do not split
into the kind's blocks stays in 32 bits too. Everything else is stored in the kind asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from diffusers_hprune.hub.export import ExportError
from diffusers_hprune.hub.single_file import (
    CONFIG_KEY,
    ORIGINAL_CONFIG_KEY,
    PLAN_KEY,
    check_file_output,
    original_tensors,
)
from diffusers_hprune.utils.fileio import atomic_path

GGUF_KINDS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")
"""What ``--quant`` writes: the block kinds the ``gguf`` package can quantise to in Python (the K kinds it cannot:
llama.cpp's ``llama-quantize`` makes them from the F16 / BF16 file) and Diffusers can read."""
EXTRA = "pip install 'diffusers-hprune[gguf]'"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(f"--format gguf needs the gguf package (llama.cpp's gguf-py), which is not installed: "
                          f"{EXTRA}, then export again.") from None
    return gguf


def tensor_kind(name: str, tensor: torch.Tensor, kind: str, high_precision: tuple[str, ...], block: int) -> str:
    """The GGUF type ``name`` is stored in: ``F32`` for tensors of fewer than two dimensions, for the layout's
    ``high_precision`` prefixes and for rows that do not split into ``block`` values; ``kind`` otherwise."""
    if tensor.dim() < 2 or name.startswith(high_precision) or tensor.shape[-1] % block:
        return "F32"
    return kind


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, quant: str = "Q8_0", overwrite: bool = False,
                progress: bool = True, log: Callable[[str], None] | None = None) -> tuple[Path, dict[str, int]]:
    """Write the transformer of the pipeline folder ``folder`` to ``out`` (``.gguf``) in its family's original key
    layout, its weights quantised to ``quant`` (:data:`GGUF_KINDS`) by :func:`tensor_kind`'s rule. Written beside
    ``out`` and renamed into it when complete. Returns ``out`` and how many tensors went into each GGUF type.

    The plan, the stock config and the original config are in the file's key-value metadata (``hprune.*``).
    """
    gguf = _gguf()
    if quant not in GGUF_KINDS:
        raise ExportError(f"Unknown --quant {quant!r}; choose one of {', '.join(GGUF_KINDS)}.")
    out = check_file_output(out, folder, ".gguf", overwrite, lambda path: _written_by_us(gguf, path))
    tensors, metadata, family = original_tensors(folder)
    layout = family.original_layout
    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path=None, arch=layout.gguf_architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{quant}"]))
    writer.add_name(metadata["modelspec.title"])
    writer.add_description(metadata["modelspec.description"])
    for key in (PLAN_KEY, CONFIG_KEY, ORIGINAL_CONFIG_KEY):
        writer.add_string(key, metadata[key])
    counts: dict[str, int] = {}
    from tqdm.auto import tqdm

    for name, tensor in tqdm(sorted(tensors.items()), desc=f"GGUF {quant}", unit="tensor", disable=not progress):
        kind = tensor_kind(name, tensor, quant, layout.high_precision, block)
        data = tensor.detach().to(torch.float32).cpu().numpy()  # bf16 -> fp32 is exact
        quantised = gguf.quants.quantize(data, gguf.GGMLQuantizationType[kind])
        writer.add_tensor(name, quantised, raw_dtype=gguf.GGMLQuantizationType[kind])
        counts[kind] = counts.get(kind, 0) + 1
    del tensors
    with atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    if log:
        log(", ".join(f"{n} tensors {k}" for k, n in sorted(counts.items())))
    return out, counts


def _written_by_us(gguf, path: Path) -> bool:
    try:
        return PLAN_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # the reader's own errors for foreign or damaged files
        return False


def gguf_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The ``hprune.*`` metadata of a GGUF file this project wrote (plan, stock and original config, parsed)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key in (PLAN_KEY, CONFIG_KEY, ORIGINAL_CONFIG_KEY):
        field = reader.fields.get(key)
        if field is not None:
            out[key] = json.loads(bytes(field.parts[field.data[0]]).decode("utf-8"))
    return out


__all__ = ["EXTRA", "GGUF_KINDS", "export_gguf", "gguf_metadata", "tensor_kind"]
