"""The trained student as it is saved: adapters merged one layer at a time, in the weight dtype, one shard at a time.

``hprune distill`` writes the student's transformer itself instead of building the whole merged model and calling
``save_pretrained`` on it: every process walks the trained student layer by layer (a weight sharded by FSDP2 is
gathered whole, one at a time, on every rank), a LoRA layer's adapters are merged into its base weight (an NF4 base
is dequantised first) in float32 and the result is cast to the run's weight dtype, and the main process writes each
shard (Diffusers' default of at most 10 GB, named as ``save_pretrained`` names them) as soon as it is complete. Host
memory at the save is therefore about one shard, not the fp32 model. The folder is the one ``save_pretrained``
writes: ``config.json``, the shard files, and with several shards their index.

Under DeepSpeed the student is gathered whole by Accelerate (``get_state_dict``: ZeRO-3 partitions every weight),
then written the same way.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from diffusers_hprune.distillation.qlora import dequantized_weight
from diffusers_hprune.distillation.settings import DistillError
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.utils.distributed import full_tensor
from diffusers_hprune.utils.fileio import copy_files, with_user_mode
from diffusers_hprune.utils.interrupts import uninterrupted
from diffusers_hprune.utils.plain_loading import record_fp32_default

#: Diffusers' names for a model's weights files and their index, and its default shard size.
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
MAX_SHARD_SIZE = 10 * 10**9  # "10GB"


def _lora_layers() -> tuple[type, ...]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no LoRA without peft
        return ()
    return (LoraLayer,)


def _merged(layer) -> torch.Tensor:
    """A LoRA layer's weight with its active adapters merged, float32: ``W + scaling * B @ A`` (W dequantised from
    NF4 where it is 4-bit). Each tensor is gathered whole first (on every rank)."""
    base = layer.get_base_layer()
    weight = dequantized_weight(base) if getattr(base.weight, "quant_state", None) is not None \
        else full_tensor(base.weight.detach()).float()
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a = full_tensor(layer.lora_A[adapter].weight.detach()).float()
        b = full_tensor(layer.lora_B[adapter].weight.detach()).float()
        weight = weight + (b @ a) * layer.scaling[adapter]
    return weight


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight as it is written: floating point in ``dtype``, on the CPU, contiguous."""
    tensor = full_tensor(tensor.detach())
    return tensor.to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()


def saved_tensors(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the plain pruned model ``module`` stands for, in its state-dict order, one at a time (CPU,
    ``dtype``): LoRA layers merged and named as plain layers. Call on every rank, in step (gathers are collective)."""
    lora = _lora_layers()
    merged_prefixes: list[str] = []
    persistent = set(module.state_dict(keep_vars=True))  # a non-persistent buffer is not saved
    for path, sub in module.named_modules():
        if any(path.startswith(prefix) for prefix in merged_prefixes):
            continue
        prefix = f"{path}." if path else ""
        if lora and isinstance(sub, lora):
            merged_prefixes.append(prefix)
            yield f"{prefix}weight", _merged(sub).to("cpu", dtype).contiguous()
            bias = sub.get_base_layer().bias
            if bias is not None:
                yield f"{prefix}bias", _stored(bias, dtype)
            continue
        for name, param in sub.named_parameters(recurse=False):
            if getattr(param, "quant_state", None) is not None:  # a QLoRA student's 4-bit layer without adapters
                yield f"{prefix}{name}", dequantized_weight(sub).to("cpu", dtype).contiguous()
            else:
                yield f"{prefix}{name}", _stored(param, dtype)
        for name, buffer in sub.named_buffers(recurse=False):
            if f"{prefix}{name}" in persistent:
                yield f"{prefix}{name}", _stored(buffer, dtype)


def empty_twin(module: torch.nn.Module, family) -> torch.nn.Module:
    """A weightless (meta) plain pruned model of ``module``'s class and config: what the saved folder holds.

    Its buffers are on the meta device too: SD3's constructor would otherwise compute its positional table in host
    memory (about 1.5 GB at SD3.5 Large's width, while the save is meant to hold one shard)."""
    from accelerate import init_empty_weights

    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=True):
        return pruned_class_for(family).from_config(config)


def write_transformer(folder: Path | None, twin: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]],
                      dtype: torch.dtype, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Write ``tensors`` (from :func:`saved_tensors`) as ``twin``'s transformer folder ``folder``, one shard at a time.

    ``folder`` is ``None`` on the processes that do not write: they only consume ``tensors`` (whose gathers every rank
    must join). Every key of ``twin``'s state dict must come, once, in its shape; anything else is a DistillError.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    expected = {k: torch.empty(v.shape, device="meta", dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in twin.state_dict().items()}
    split = split_torch_state_dict_into_shards(expected, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    pending = {file: set(keys) for file, keys in split.filename_to_tensors.items()}
    held: dict[str, dict[str, torch.Tensor]] = {file: {} for file in pending}
    seen = set()
    for key, tensor in tensors:
        if key not in expected or key in seen or tuple(tensor.shape) != tuple(expected[key].shape):
            raise DistillError(f"The trained student's weight {key} ({tuple(tensor.shape)}) is not one the pruned "
                               "model holds: this is a bug of diffusers-hprune; please report it with the plan.")
        seen.add(key)
        if folder is None:
            continue
        file = split.tensor_to_filename[key]
        held[file][key] = tensor
        pending[file].discard(key)
        if not pending[file]:  # complete: written now, then freed
            path = folder / file
            save_file(held.pop(file), str(path), metadata={"format": "pt"})
            with_user_mode(path)  # safetensors creates the file 0600 whatever the umask
    missing = sorted(set(expected) - seen)
    if missing:
        raise DistillError(f"The trained student lacks {len(missing)} weight(s) of the pruned model (e.g. "
                           f"{missing[0]}): this is a bug of diffusers-hprune; please report it with the plan.")
    if folder is None:
        return
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        with_user_mode(folder / INDEX_FILE)
    twin.save_config(folder)


def staging_folder(output_dir: Path) -> Path:
    """A new folder in ``output_dir`` for the pipeline being written (``.pipeline.*``: a leftover the next run
    removes, should this one be killed)."""
    return with_user_mode(Path(tempfile.mkdtemp(prefix=".pipeline.", dir=output_dir)))


def final_student(accelerator, student, family, lora_config):
    """The trained student as a plain fp32 module on the main process (``None`` elsewhere), LoRA merged: the
    DeepSpeed path, where Accelerate's ``get_state_dict`` gathers the partitioned weights whole.

    The weights go into a fresh module of the student's class and plan (built without allocating weights), so
    nothing depends on how the training wrapper holds them.
    """
    from accelerate import init_empty_weights

    state = accelerator.get_state_dict(student)
    if not accelerator.is_main_process:
        return None
    inner = accelerator.unwrap_model(student)
    config = {k: v for k, v in inner.config.items() if not k.startswith("_")}
    with init_empty_weights():
        final = pruned_class_for(family).from_config(config)
        if lora_config is not None:
            final.add_adapter(copy.deepcopy(lora_config))
    final.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=True,
                          assign=True)
    final.to(torch.float32)
    if lora_config is not None:
        final.fuse_lora()
        final.unload_lora()
    return final.requires_grad_(False).eval()


def save_pipeline(pipeline, staging: Path, output_dir: Path, teacher_folder: Path | None = None) -> None:
    """Complete the pipeline in ``staging`` (whose ``transformer/`` is written) and move it into ``output_dir``.

    The components other than the transformer are the teacher's: with the teacher's folder at hand they are its
    files, copied (their bytes and dtypes as published), not re-saved from memory in the dtype they were loaded in;
    without it each is saved with its own ``save_pretrained``. ``model_index.json`` comes last.
    """
    for name, component in pipeline.components.items():
        if name == "transformer" or component is None:
            continue
        if teacher_folder is not None and (teacher_folder / name).is_dir():
            copy_files(teacher_folder / name, staging / name, root=teacher_folder)
        else:
            component.save_pretrained(staging / name)
    pipeline.save_config(staging)  # model_index.json
    record_fp32_default(staging)  # the copied encoders' configs too: a plain from_pretrained loads one dtype
    # A folder with model_index.json looks complete: the old one goes first, the new one comes last, and
    # SIGTERM / Ctrl-C wait until every component is in place.
    with uninterrupted():
        (output_dir / "model_index.json").unlink(missing_ok=True)
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)


__all__ = ["INDEX_FILE", "MAX_SHARD_SIZE", "WEIGHTS_PATTERN", "empty_twin", "final_student", "save_pipeline",
           "saved_tensors", "staging_folder", "write_transformer"]
