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

Both paths install :mod:`diffusers_hprune.utils.nf4_cpu`'s CPU dequantisation kernel first, so a 4-bit
layer computes the same, correct weights on every processor (bitsandbytes' native CPU kernel
is wrong on AVX-512 processors for weights whose last dimension is not a multiple of 64).
"""

from __future__ import annotations

import torch

from diffusers_hprune.architecture import get_family
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.compat import quantize_in_place
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.nf4_cpu import (
    compute_in_fp32_on_cpu,
    import_bitsandbytes,
    install_cpu_dequantize,
    keep_cpu_layout,
)
from diffusers_hprune.utils.nf4_settings import default_compute_dtype, nf4_config


class QuantizeError(HPruneError):
    """A model that cannot be quantised as asked (already quantised, unknown skip module, ...)."""


def is_quantized(transformer: torch.nn.Module) -> bool:
    bnb = import_bitsandbytes()
    if getattr(transformer.config, "quantization_config", None):
        return True
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in transformer.modules())


def check_skip_modules(transformer: torch.nn.Module, skip_modules) -> None:
    """QuantizeError naming the names of ``skip_modules`` that are no module of ``transformer`` (by path or leaf name)."""
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
        compute_dtype: the compute dtype recorded in the config (default bf16, wherever it is quantised).
            Given, the layers compute in it here too; by default, layers on a CPU compute in fp32.

    The weights are quantised on the transformer's device; the result is a
    ``HierarchicalPruned*Transformer2DModel`` (the given plan, or the empty one) ready for
    ``save_pretrained``. The input module is consumed: its weights move into the result.

    Raises:
        QuantizeError: the model is already quantised, or a skip-list name is not a module of it.
        UnsupportedModelError: not an SD3 or FLUX transformer.
    """
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    install_cpu_dequantize()
    family = get_family(transformer)
    if is_quantized(transformer):
        raise QuantizeError("This transformer is already quantised; quantise the 16- or 32-bit model it came from.")
    skip = tuple(family.default_nf4_skip_modules if skip_modules is None else skip_modules)
    check_skip_modules(transformer, skip)
    if not isinstance(transformer, pruned_class_for(family)):
        transformer = prune_transformer(transformer, family.empty_plan(transformer.config))
    device = next(transformer.parameters()).device
    config = nf4_config(skip, compute_dtype)
    quantizer = BnB4BitDiffusersQuantizer(config, pre_quantized=False)
    quantize_in_place(quantizer, transformer, device)
    transformer.register_to_config(quantization_config=config)
    keep_cpu_layout(transformer)
    if compute_dtype is None:
        compute_in_fp32_on_cpu(transformer)  # bf16 is recorded for the GPUs; here it computes as before
    return transformer.requires_grad_(False).eval()


__all__ = ["QuantizeError", "default_compute_dtype", "is_quantized", "nf4_config", "quantize"]
