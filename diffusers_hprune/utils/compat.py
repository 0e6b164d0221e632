"""Every use of another library's private names, and every match on its message texts, in one place.

Diffusers, torch, bitsandbytes and Accelerate keep these out of their public API, so a new release may change
them without notice. Each helper says what it relies on; ``tests/test_compat.py`` checks each one against the
installed versions, so such a change fails a test instead of silently breaking a run. Where a public API does the
job, the package uses it instead (``nn.Module.register_state_dict_post_hook``, buffer assignment through
``setattr``, a feed-forward chunking of its own).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented base class of dispatch modes
from torch.utils._pytree import tree_leaves  # torch's structure flattening: no public counterpart

# -- torch ---------------------------------------------------------------------------------------------------------


def storage_identity(tensor: torch.Tensor) -> int:
    """An identity of the tensor's storage on every device, the meta device included (``UntypedStorage._cdata``:
    ``data_ptr()`` is 0 for every meta tensor)."""
    return tensor.untyped_storage()._cdata


def meta_flash_attention(query, key, value, dropout_p: float, is_causal: bool, scale):
    """The fused attention kernel's output on meta tensors (``aten._scaled_dot_product_flash_attention_for_cpu``),
    which, unlike the math fallback, holds no ``L x L`` score matrix."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                      scale=scale)[0]


def persistent_buffer(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s own buffer ``name`` goes into its state dict (``Module._non_persistent_buffers_set``)."""
    return name not in module._non_persistent_buffers_set


# -- Diffusers -----------------------------------------------------------------------------------------------------


def vae_tile_settings(vae) -> tuple[bool, int, int]:
    """``(tiling on, tile size in pixels, tile size in latents)`` of a Diffusers ``AutoencoderKL`` (its
    ``use_tiling``, ``tile_sample_min_size`` and ``tile_latent_min_size``: ``enable_tiling`` takes no size, and its
    tile is the VAE's sample size, 1024 px for SD3's and FLUX's, so a 1024 px image would not be tiled)."""
    return vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size


def set_vae_tile_settings(vae, settings: tuple[bool, int, int]) -> None:
    """Set what :func:`vae_tile_settings` reads."""
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = settings


def execution_device(pipe) -> torch.device:
    """The device a pipeline computes on, model offload included (``DiffusionPipeline._execution_device``)."""
    return pipe._execution_device


def feed_forward_chunking(block: torch.nn.Module) -> tuple[int | None, int]:
    """``(chunk size, dim)`` a stock Diffusers block was given by ``set_chunk_feed_forward`` (its ``_chunk_size`` and
    ``_chunk_dim``; ``(None, 0)`` when none)."""
    return getattr(block, "_chunk_size", None), getattr(block, "_chunk_dim", 0)


def register_block_streams(block_classes: Iterable[type], text_index: int = 0, image_index: int = 1) -> None:
    """Tell Diffusers' cache hooks (First Block Cache, TaylorSeer, ...) which outputs of a block class are the text and
    image streams (``diffusers.hooks._helpers.TransformerBlockRegistry``); without it such a hook stops with "Model
    class ... not registered". A Diffusers without the hooks has nothing to register with."""
    try:
        from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    except ImportError:
        return
    for cls in block_classes:
        if cls not in TransformerBlockRegistry._registry:
            TransformerBlockRegistry.register(cls, TransformerBlockMetadata(
                return_hidden_states_index=image_index, return_encoder_hidden_states_index=text_index))


def cache_context_set(model: torch.nn.Module) -> bool:
    """Whether a cache context is set on any of ``model``'s stateful hooks, as Diffusers' own setter walks them
    (``HookRegistry._get_child_registries`` and ``StateManager._context``)."""
    from diffusers.hooks.hooks import HookRegistry, StateManager

    registry = HookRegistry.check_if_exists_or_initialize(model)
    for child in (registry, *registry._get_child_registries()):
        for hook in child.hooks.values():
            if any(isinstance(a, StateManager) and a._context is not None for a in vars(hook).values()):
                return True
    return False


def mark_packed_rows(linear: torch.nn.Linear, blocks: list[int]) -> None:
    """Tell Diffusers' tensor parallelism how a fused projection's input columns are packed
    (``_tp_packed_row_blocks``, read by ``diffusers.hooks.tensor_parallel``)."""
    linear._tp_packed_row_blocks = list(blocks)


def flux_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2 x 2 latent patches, as ``FluxPipeline`` packs them (``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def flux_latent_image_ids(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """The position ids of FLUX's packed latents (``FluxPipeline._prepare_latent_image_ids``), ``height`` x ``width``
    patches."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(batch, height, width, device, dtype)


def flux_unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed FLUX latents back to ``(B, C, H, W)`` (``FluxPipeline._unpack_latents``)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor)


def quantize_in_place(quantizer, model: torch.nn.Module, device) -> None:
    """Quantise a loaded model's weights with a Diffusers quantizer, in the steps ``from_pretrained`` takes while it
    loads: the quantizer's public ``preprocess_model`` / ``postprocess_model`` (which mark the model quantised, so
    ``ModelMixin.to`` refuses a dtype cast as for a loaded NF4 model) around its per-tensor
    ``check_if_quantized_param`` / ``create_quantized_param``; the model's ``hf_quantizer``, as ``from_pretrained``
    sets it (Diffusers' LoRA loaders and ``save_pretrained`` read it)."""
    from accelerate.utils import set_module_tensor_to_device

    state = model.state_dict()
    buffers = dict(model.named_buffers())
    quantizer.preprocess_model(model, device_map=None, keep_in_fp32_modules=[])
    for name, value in state.items():
        if quantizer.check_if_quantized_param(model, value, name, state):
            quantizer.create_quantized_param(model, value, name, device, state)
        else:
            set_module_tensor_to_device(model, name, device, value=value)
    for name, value in buffers.items():  # non-persistent buffers are not in the state dict
        module_path, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        current = getattr(module, buffer_name, None)
        if isinstance(current, torch.Tensor) and current.device.type == "meta":
            setattr(module, buffer_name, value)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


#: The logger and the text of Diffusers' notice for checkpoint keys a model did not use.
UNUSED_WEIGHTS_LOGGER = "diffusers.models.modeling_utils"
UNUSED_WEIGHTS_TEXT = "were not used when initializing {class_prefix}"


class UnusedWeightsNotice(logging.Filter):
    """Drops Diffusers' "weights ... were not used when initializing CLASS" notice for classes named ``prefix*``."""

    def __init__(self, class_prefix: str):
        super().__init__()
        self.text = UNUSED_WEIGHTS_TEXT.format(class_prefix=class_prefix)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# Diffusers reports a checkpoint whose shapes differ from the model as torch's RuntimeError ("size mismatch for KEY:
# copying a param with shape FILE from checkpoint, the shape in current model is MODEL") or, loading onto the meta
# device, as ValueError("... KEY expected shape MODEL, but got FILE ...").
_TORCH_SIZE = r"(torch\.Size\(\[[^]]*\]\))"
_LOAD_MISMATCH = re.compile(rf"size mismatch for (\S+): copying a param with shape {_TORCH_SIZE} from checkpoint, "
                            rf"the shape in current model is {_TORCH_SIZE}")
_META_MISMATCH = re.compile(rf"(\S+) expected shape {_TORCH_SIZE}, but got {_TORCH_SIZE}")


def is_shape_mismatch(error: BaseException) -> bool:
    """Whether a loading error is Diffusers' / torch's report of weights whose shapes differ from the model's."""
    return isinstance(error, (RuntimeError, ValueError)) and any(
        marker in str(error) for marker in ("size mismatch", "expected shape"))


def shape_mismatches(error: BaseException) -> list[tuple[str, str, str]]:
    """``(key, shape in the file, shape the model needs)`` of every mismatch such an error names."""
    text = str(error)
    found = [(key, file, model) for key, model, file in _META_MISMATCH.findall(text)]
    found += [(key, file, model) for key, file, model in _LOAD_MISMATCH.findall(text)]
    return found


# -- Accelerate ----------------------------------------------------------------------------------------------------


def forget_other_precision(mixed_precision: str) -> None:
    """Forget the mixed precision an earlier ``Accelerator`` of this process set, when it differs (Accelerate keeps
    it process-wide in ``AcceleratorState._shared_state`` and refuses another: "restart your runtime"); the process
    group (``PartialState``) stays (``AcceleratorState._reset_state(reset_partial_state=False)``)."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


# -- bitsandbytes --------------------------------------------------------------------------------------------------


def bitsandbytes_generic_dequantize():
    """bitsandbytes' processor-independent 4-bit dequantisation (``backends.default.ops._dequantize_4bit_compute``),
    or None where this bitsandbytes lacks it."""
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        return None
    return _dequantize_4bit_compute


__all__ = [
    "UNUSED_WEIGHTS_LOGGER",
    "UnusedWeightsNotice",
    "TorchDispatchMode",
    "bitsandbytes_generic_dequantize",
    "cache_context_set",
    "execution_device",
    "feed_forward_chunking",
    "flux_latent_image_ids",
    "flux_pack_latents",
    "flux_unpack_latents",
    "forget_other_precision",
    "is_shape_mismatch",
    "mark_packed_rows",
    "meta_flash_attention",
    "persistent_buffer",
    "quantize_in_place",
    "register_block_streams",
    "shape_mismatches",
    "storage_identity",
    "tree_leaves",
]
