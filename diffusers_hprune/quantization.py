"""W4A16 post-training quantisation (DESIGN.md section 6, step 8): NF4 weights through bitsandbytes.

``quantize(transformer)`` replaces every ``nn.Linear`` outside the family's skip list with a
bitsandbytes ``Linear4bit`` holding NF4 codes with double quantisation (block size 64), and
computes in 16 bits on a GPU (32 on a CPU). It goes through Diffusers' own bitsandbytes
quantizer, the one ``from_pretrained(..., quantization_config=...)`` uses, so the result saves
in exactly the format Diffusers' loader reads: ``quantization_config`` in ``config.json`` and
the quant-state tensors (``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map``,
``.quant_state.bitsandbytes__nf4``) next to each weight.

The quantised transformer is always a ``HierarchicalPruned*`` class (an unpruned model gets the
empty plan), whose ``from_pretrained`` also loads it on a machine without a GPU, where
Diffusers' own loader stops with "No GPU found" (bitsandbytes runs NF4 on CPU).

Both paths install :mod:`diffusers_hprune.nf4_cpu`'s CPU dequantisation kernel first, so a 4-bit
layer computes the same, correct weights on every processor (bitsandbytes' native CPU kernel
is wrong on AVX-512 processors for weights whose last dimension is not a multiple of 64).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from .errors import HPruneError

# Records of how a pipeline folder was made, copied into its quantised version.
PROVENANCE_FILES = ("distill_summary.json",)


class QuantizeError(HPruneError):
    """A model that cannot be quantised as asked (already quantised, unknown skip module, ...)."""


def _accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def default_compute_dtype() -> torch.dtype:
    """bf16 where a GPU computes, fp32 on a CPU."""
    return torch.bfloat16 if _accelerator_available() else torch.float32


def nf4_config(skip_modules: tuple[str, ...] | list[str], compute_dtype: torch.dtype | None = None):
    """The ``BitsAndBytesConfig`` of our W4A16: NF4, double quantisation, ``skip_modules`` in 16-bit."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(),
        llm_int8_skip_modules=list(skip_modules),
    )


def is_quantized(transformer: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    if getattr(transformer.config, "quantization_config", None):
        return True
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in transformer.modules())


def _check_skip_modules(transformer: torch.nn.Module, skip_modules) -> None:
    names = {n for n, _ in transformer.named_modules() if n}
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    unknown = [s for s in skip_modules if s not in names and s not in leaves]
    if unknown:
        top = sorted({n.split(".")[0] for n in names})
        raise QuantizeError(
            f"Unknown module(s) in the skip list: {', '.join(unknown)}. Name modules of this transformer, e.g. its "
            f"top-level ones: {', '.join(top)}."
        )


def quantize(transformer: torch.nn.Module, *, skip_modules=None, compute_dtype: torch.dtype | None = None):
    """Quantise ``transformer`` (SD3 or FLUX family, pruned or not) to NF4 W4A16; returns the quantised model.

    Args:
        transformer: a transformer of a supported family, on the CPU or a GPU, in any float dtype.
        skip_modules: module names kept in 16-bit (default: the family's
            ``default_nf4_skip_modules``: the input embedders and ``norm_out``, and for SD3 ``proj_out``).
            Matched as Diffusers' loader matches them: a listed name at any depth, or a path prefix.
        compute_dtype: the dtype the 4-bit layers compute in (default: bf16 on a GPU, fp32 on a CPU).

    The weights are quantised on the transformer's device; the result is a
    ``HierarchicalPruned*Transformer2DModel`` (the given plan, or the empty one) ready for
    ``save_pretrained``. The input module is consumed: its weights move into the result.

    Raises:
        QuantizeError: the model is already quantised, or a skip-list name is not a module of it.
        UnsupportedModelError: not an SD3 or FLUX transformer.
    """
    from accelerate.utils import set_module_tensor_to_device
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    from .architectures import get_family
    from .nf4_cpu import install_cpu_dequantize, keep_cpu_layout
    from .prune import prune_transformer

    install_cpu_dequantize()
    family = get_family(transformer)
    if is_quantized(transformer):
        raise QuantizeError("This transformer is already quantised; quantise the 16- or 32-bit model it came from.")
    skip = tuple(family.default_nf4_skip_modules if skip_modules is None else skip_modules)
    _check_skip_modules(transformer, skip)
    if not isinstance(transformer, family.pruned_class):
        transformer = prune_transformer(transformer, family.empty_plan(transformer.config))
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    config = nf4_config(skip, compute_dtype)
    quantizer = BnB4BitDiffusersQuantizer(config, pre_quantized=False)
    state = transformer.state_dict()
    buffers = dict(transformer.named_buffers())
    quantizer._process_model_before_weight_loading(transformer, device_map=None, keep_in_fp32_modules=[])
    for name, value in state.items():
        if quantizer.check_if_quantized_param(transformer, value, name, state):
            quantizer.create_quantized_param(transformer, value, name, device, state)
        else:
            set_module_tensor_to_device(transformer, name, device, value=value)
    for name, value in buffers.items():  # non-persistent buffers are not in the state dict
        module_path, _, buffer_name = name.rpartition(".")
        module = transformer.get_submodule(module_path) if module_path else transformer
        if module._buffers.get(buffer_name) is not None and module._buffers[buffer_name].device.type == "meta":
            module._buffers[buffer_name] = value
    quantizer._process_model_after_weight_loading(transformer)
    transformer.hf_quantizer = quantizer
    transformer.register_to_config(quantization_config=config)
    transformer._pre_quantization_dtype = dtype
    keep_cpu_layout(transformer)
    return transformer.requires_grad_(False).eval()


def quantize_pipeline(source: str | os.PathLike, output_dir: str | os.PathLike, *, skip_modules=None,
                      compute_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.bfloat16,
                      overwrite: bool = False) -> Path:
    """Quantise the transformer of the pipeline folder ``source`` into a new pipeline folder ``output_dir``.

    The transformer's linear weights become NF4; its other parameters (norms, biases, the skip
    list) are stored in ``dtype`` (16-bit by default: W4A16). Loading casts them to the
    ``torch_dtype`` asked for. The other components are saved as they were. The folder is
    written next to its final place and renamed into it when complete. Returns ``output_dir``.
    """
    from diffusers import DiffusionPipeline

    source, output_dir = Path(source), Path(output_dir)
    if not (source / "model_index.json").is_file():
        raise QuantizeError(f"{source} is not a pipeline folder (no model_index.json); give the folder that "
                            "`save_pretrained` or `hprune distill` wrote.")
    if output_dir.exists() and not overwrite:
        raise QuantizeError(f"{output_dir} exists; choose another --out or pass --overwrite.")
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    if is_quantized(pipe.transformer):
        raise QuantizeError(f"The transformer in {source} is already quantised; quantise the 16- or 32-bit model.")
    pipe.transformer.to("cuda" if _accelerator_available() else "cpu", dtype)
    quantized = quantize(pipe.transformer, skip_modules=skip_modules, compute_dtype=compute_dtype)
    from .fileio import atomic_directory
    from .pipelines import with_pruned_transformer

    pruned_pipe = with_pruned_transformer(pipe, quantized)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        pruned_pipe.save_pretrained(tmp)
        for record in PROVENANCE_FILES:  # how the source was made travels with it (the model card reads it)
            if (source / record).is_file():
                shutil.copyfile(source / record, Path(tmp) / record)
    return output_dir


# -- loading on a machine without a GPU ---------------------------------------------------------
def _cpu_quantizer_class():
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    class CPUBnB4BitQuantizer(BnB4BitDiffusersQuantizer):
        """Diffusers' 4-bit quantizer, allowed on the CPU for pre-quantised NF4 weights."""

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                return super().validate_environment(*args, **kwargs)

        def update_device_map(self, device_map):
            return device_map if device_map is not None else {"": "cpu"}

        def update_torch_dtype(self, torch_dtype):
            return torch.float32 if torch_dtype is None else torch_dtype

    return CPUBnB4BitQuantizer


@contextlib.contextmanager
def cpu_nf4_loading():
    """Within the block, Diffusers loads pre-quantised bitsandbytes 4-bit weights on a machine without a GPU.

    Diffusers' 4-bit quantizer refuses to run without a GPU; bitsandbytes runs NF4 on the CPU.
    On a machine with a GPU nothing changes. Quantising 16-bit weights while loading
    (``quantization_config=`` on an unquantised checkpoint) still needs a GPU, as in Diffusers.
    On every machine it first installs the project's CPU 4-bit dequantisation kernel
    (:func:`diffusers_hprune.nf4_cpu.install_cpu_dequantize`).
    """
    from .nf4_cpu import install_cpu_dequantize

    install_cpu_dequantize()
    if _accelerator_available():
        yield
        return
    from diffusers.quantizers import auto

    key = "bitsandbytes_4bit"
    previous = auto.AUTO_QUANTIZER_MAPPING[key]
    auto.AUTO_QUANTIZER_MAPPING[key] = _cpu_quantizer_class()
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING[key] = previous


__all__ = ["QuantizeError", "cpu_nf4_loading", "default_compute_dtype", "is_quantized", "nf4_config", "quantize",
           "quantize_pipeline"]
