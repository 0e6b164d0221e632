"""``quantize_pipeline``: a pipeline folder in, the same pipeline with an NF4 transformer out (``hprune quantize``).

Only the transformer is loaded (in the storage dtype asked for), quantised and saved; the
other components are copied file for file, so a pipeline's text encoders keep their bytes and
dtype and are never loaded. The memory this takes is one 16-bit transformer beside its
quantised version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import diffusers
import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.loading import check_pipeline_weights
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.pipelines.pruned import check_pipeline_family, pruned_pipeline_name
from diffusers_hprune.quantization.nf4 import QuantizeError, quantize
from diffusers_hprune.quantization.torchao_weights import METHODS, TORCHAO_METHODS, load_quantized
from diffusers_hprune.utils.checks import PICKLE_SUFFIXES, InputError, check_not_inside, read_text_file
from diffusers_hprune.utils.fileio import atomic_directory, copy_files, safetensors_user_modes
from diffusers_hprune.utils.nf4_cpu import accelerator_available
from diffusers_hprune.utils.plain_loading import record_fp32_default
from diffusers_hprune.utils.quant_config import quantization_method
from diffusers_hprune.utils.untrusted import check_model_index

# Records of how a pipeline folder was made, copied into its quantised version.
PROVENANCE_FILES = ("distill_summary.json",)


def _model_index(source: Path) -> dict:
    """The pipeline's ``model_index.json``, or a QuantizeError saying why it cannot be read."""
    try:
        index = json.loads(read_text_file(source / "model_index.json", "pipeline index"))
    except InputError as e:
        raise QuantizeError(str(e)) from None
    except ValueError as e:
        raise QuantizeError(f"{source / 'model_index.json'} is not valid JSON ({e}); save the pipeline again.") from None
    if not isinstance(index, dict):
        raise QuantizeError(f"{source / 'model_index.json'} is not a pipeline index (a JSON object); save the pipeline "
                            "again.")
    return check_model_index(index, source, error=QuantizeError)


def _quantized_transformer(source: Path, family, method: str, skip_modules, compute_dtype, dtype):
    """The folder's transformer quantised by ``method``, on the GPU when there is one."""
    device = torch.device("cuda" if accelerator_available() else "cpu")
    if method == "nf4":
        transformer = pruned_class_for(family).from_pretrained(source / "transformer", dtype=dtype)
        transformer.to(device)
        return quantize(transformer, skip_modules=skip_modules, compute_dtype=compute_dtype)
    if method not in TORCHAO_METHODS:
        raise QuantizeError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if compute_dtype is not None or dtype != torch.bfloat16:
        raise QuantizeError(f"--compute-dtype and --dtype apply to --method nf4; torchao's {method} computes and "
                            "stores in bf16. Leave them out.")
    skip = tuple(family.default_nf4_skip_modules if skip_modules is None else skip_modules)
    return load_quantized(pruned_class_for(family), source / "transformer", method, skip, device)


def quantize_pipeline(source: str | os.PathLike, output_dir: str | os.PathLike, *, skip_modules=None,
                      compute_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.bfloat16,
                      overwrite: bool = False, method: str = "nf4") -> Path:
    """Quantise the transformer of the pipeline folder ``source`` into a new pipeline folder ``output_dir``.

    The transformer's linear weights become NF4; its other parameters (norms, biases, the skip
    list) are stored in ``dtype`` (16-bit by default: W4A16). Loading casts them to the
    ``dtype`` asked for. The other components are copied as they are (their files, not
    reloaded). The folder is written next to its final place and renamed into it when complete.
    Returns ``output_dir``.

    ``method``: ``"nf4"`` (above), or a torchao kind (:data:`~.torchao_weights.TORCHAO_METHODS`: int8 weights, for
    speed; :mod:`.torchao_weights`), loaded quantised in bf16 and saved as safetensors; ``compute_dtype`` is NF4's
    only, and ``dtype`` must be bf16 for them.
    """
    source, output_dir = Path(source), Path(output_dir)
    if not (source / "model_index.json").is_file():
        raise QuantizeError(f"{source} is not a pipeline folder (no model_index.json); give the folder that "
                            "`save_pretrained` or `hprune distill` wrote.")
    check_not_inside(output_dir, source, "--out", "MODEL")
    if output_dir.exists() and not overwrite:
        raise QuantizeError(f"{output_dir} exists; choose another --out or pass --overwrite.")
    index = _model_index(source)
    config = load_transformer_config(source)
    if config.get("quantization_config"):
        raise QuantizeError(f"The transformer in {source} is already quantised ({quantization_method(config)}); quantise "
                            "the 16- or 32-bit model.")
    family = get_family(config)
    check_pipeline_family(index["_class_name"], config, source)
    pipeline_name = pruned_pipeline_name(index["_class_name"])
    check_pipeline_weights(source)  # pickles refused, damaged files named (the other components are copied as they are)
    quantized = _quantized_transformer(source, family, method, skip_modules, compute_dtype, dtype)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        tmp = Path(tmp)
        for name, entry in index.items():
            if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or None in entry:
                continue
            if (source / name).is_dir():
                copy_files(source / name, tmp / name, root=source)
        quantized.save_pretrained(tmp / "transformer")
        pickled = [p.name for p in (tmp / "transformer").iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:  # this project writes safetensors only: never publish what Diffusers fell back to
            raise QuantizeError(f"Saving the {method} transformer wrote pickle files ({', '.join(pickled)}), which this "
                                f"project does not publish; nothing was written to {output_dir}. Upgrade torchao, or "
                                "use --method nf4.")
        safetensors_user_modes(tmp / "transformer")  # safetensors writes 0600 whatever the umask
        index.update({"_class_name": pipeline_name, "_diffusers_version": diffusers.__version__,
                      "transformer": ["diffusers_hprune", type(quantized).__name__]})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        record_fp32_default(tmp)  # the folder also loads without dtype
        for record in PROVENANCE_FILES:  # how the source was made travels with it (the model card reads it)
            if (source / record).is_file():
                shutil.copyfile(source / record, tmp / record)
    return output_dir
