"""Activation bytes of the real model code, traced on the meta device at full size.

Every function builds the model from its config without weights (meta device), runs the same
modules the stages run (the transformer's forward, the distillation step's teacher and student
passes with their block features and backward, the VAE's decoder) on meta inputs of the real
shapes, and counts with :class:`~diffusers_hprune.utils.live_memory.LiveTensorBytes` the most
bytes the call's own tensors hold at once. Weights and inputs are not counted (the callers add
them); attention runs the fused kernel, as on the devices (``fused_attention_on_meta``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import init_empty_weights

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import build_on_meta
from diffusers_hprune.distillation.loss import BlockFeatures, kept_blocks, loss_terms
from diffusers_hprune.distillation.pwp import apply_pwp
from diffusers_hprune.loading import sliced_decoding
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.compat import tree_leaves
from diffusers_hprune.utils.live_memory import LiveTensorBytes, fused_attention_on_meta
from diffusers_hprune.utils.memo import Memo, config_key


@dataclass(frozen=True)
class Shapes:
    """The inputs of one transformer call: batch, latent size, text tokens (T5 length and CLIP length)."""

    batch: int
    height: int  # image pixels
    width: int
    max_sequence_length: int
    clip_length: int = 77
    vae_scale_factor: int = 8


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("prune_plan", "quantization_config")}


def meta_transformer(config: Mapping[str, Any], plan: PrunePlan | None, dtype: torch.dtype) -> torch.nn.Module:
    """The (pruned) transformer of ``config`` on the meta device in ``dtype``: the classes the stages use."""
    family = get_family(config)
    if plan is None:
        model = build_on_meta(_settings(config) | {"_class_name": family.base_class_name}, pruned=False)
    else:
        with init_empty_weights(include_buffers=True):
            model = pruned_class_for(family).from_config(_settings(config), prune_plan=plan.to_dict())
    return model.to(dtype).requires_grad_(False).eval()


def meta_latents(model: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> torch.Tensor:
    """The VAE latents (before any patch packing) of one call at ``shapes``, on the meta device."""
    factor = shapes.vae_scale_factor
    return torch.empty(shapes.batch, get_family(model).latent_channels(model.config), shapes.height // factor,
                       shapes.width // factor, device="meta", dtype=dtype)


def meta_inputs(model: torch.nn.Module, shapes: Shapes, dtype: torch.dtype) -> dict[str, Any]:
    """The transformer's keyword arguments for one call at ``shapes`` (the family's own input builder)."""
    family = get_family(model)
    config = model.config
    b = shapes.batch
    latents = meta_latents(model, shapes, dtype)
    tokens = family.text_tokens(shapes.max_sequence_length, shapes.clip_length)
    text = {"prompt_embeds": torch.empty(b, tokens, config["joint_attention_dim"], device="meta", dtype=dtype),
            "pooled_projections": torch.empty(b, config["pooled_projection_dim"], device="meta", dtype=dtype)}
    sigmas = torch.empty(b, device="meta", dtype=dtype)
    return family.denoiser_inputs(model, latents, sigmas, text, None)


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


@dataclass(frozen=True)
class ForwardTrace:
    peak: int
    """Most bytes one no-grad call holds at once (output included), beyond weights and inputs."""
    block_outputs: int
    """Bytes of every block's output of one call (what the analysis cache keeps per recorded call)."""
    output: int
    """Bytes of the call's output."""
    inputs: int
    """Bytes of the call's inputs (what recording a call keeps)."""


# A trace is a function of its arguments alone, and `hprune budget` / the `--gpu-memory` fit ask for the
# same ones many times (every remedy tried re-predicts its stage): each is traced once per process.
_FORWARD: Memo[ForwardTrace] = Memo()
_STEP: Memo[StepTrace] = Memo()
_VAE: Memo[int] = Memo()


def _model_key(config: Mapping[str, Any], plan: PrunePlan | None) -> tuple[str, str]:
    settings = _settings(config) | {"_class_name": get_family(config).base_class_name}
    return config_key(settings), json.dumps(plan.to_dict() if plan else None, sort_keys=True)


def forward_trace(config: Mapping[str, Any], plan: PrunePlan | None, shapes: Shapes, dtype: torch.dtype) -> ForwardTrace:
    """One no-grad call of the transformer (inference, analysis, the teacher drawing the training data)."""
    return _FORWARD.get((*_model_key(config, plan), shapes, str(dtype)),
                        lambda: _forward_trace(config, plan, shapes, dtype))


@torch.no_grad()
def _forward_trace(config: Mapping[str, Any], plan: PrunePlan | None, shapes: Shapes, dtype: torch.dtype) -> ForwardTrace:
    model = meta_transformer(config, plan, dtype)
    family = get_family(model)
    inputs = meta_inputs(model, shapes, dtype)
    sizes = []
    handles = [model.get_submodule(s.path).register_forward_hook(lambda m, a, out: sizes.append(_nbytes(out)))
               for s in family.block_specs(model.config) if s.index not in (plan.removed_blocks if plan else ())]
    counter = LiveTensorBytes([*model.parameters(), *model.buffers(), inputs])
    try:
        with fused_attention_on_meta(), counter:
            out = model(**inputs, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return ForwardTrace(counter.peak, sum(sizes), _nbytes(out), _nbytes(inputs))


@dataclass(frozen=True)
class StepTrace:
    peak: int
    """Most bytes the step holds at once beyond the weights: teacher features, activations, gradients."""
    trainable: int
    """Trainable parameters (LoRA adapters with ``lora_rank``)."""
    gradients: int
    """Bytes of the gradients (in the trace's dtype)."""
    largest_group: int
    """Parameters of the largest parameter group (SGDistill: one per block; else all)."""
    largest_param: int
    """Elements of the largest trainable tensor."""


def step_trace(config: Mapping[str, Any], plan: PrunePlan, shapes: Shapes, dtype: torch.dtype, *, lora_rank: int = 0,
               pwp: bool = True, gradient_checkpointing: bool = False, per_block_groups: bool = True) -> StepTrace:
    """One distillation micro-step: teacher forward (no grad) and student forward + backward, block features kept.

    The modules and the loss are the trainer's (:func:`~diffusers_hprune.distillation.pwp.apply_pwp`,
    LoRA through peft, :class:`~diffusers_hprune.distillation.loss.BlockFeatures`,
    :func:`~diffusers_hprune.distillation.loss.loss_terms`); all weights are in ``dtype``, so
    the gradients are too (the caller corrects for float32 master weights).
    """
    options = (lora_rank, pwp, gradient_checkpointing, per_block_groups)
    return _STEP.get((*_model_key(config, plan), shapes, str(dtype), options),
                     lambda: _step_trace(config, plan, shapes, dtype, *options))


def _step_trace(config: Mapping[str, Any], plan: PrunePlan, shapes: Shapes, dtype: torch.dtype, lora_rank: int,
                pwp: bool, gradient_checkpointing: bool, per_block_groups: bool) -> StepTrace:
    teacher = meta_transformer(config, None, dtype)
    student = meta_transformer(config, plan, dtype)
    family = get_family(teacher)
    result = apply_pwp(student, enabled=pwp)
    if lora_rank:
        from peft import LoraConfig

        student.requires_grad_(False)
        targets = [f"{path}.{name}" if name else path for path in result.trainable_modules
                   for name, m in student.get_submodule(path).named_modules() if isinstance(m, torch.nn.Linear)]
        student.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets))
        student.to(dtype)
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    groups = [sum(p.numel() for p in student.get_submodule(s.path).parameters() if p.requires_grad)
              for s in family.block_specs(student.config) if s.index not in plan.removed_blocks]
    largest_group = max(groups, default=0) if per_block_groups else sum(p.numel() for p in trainable)
    inputs = meta_inputs(student, shapes, dtype)
    latents = meta_latents(student, shapes, dtype)
    peak, gradients = step_peak(teacher, student, inputs, latents)
    return StepTrace(peak, sum(p.numel() for p in trainable), gradients, largest_group,
                     max((p.numel() for p in trainable), default=0))


def step_peak(teacher: torch.nn.Module, student: torch.nn.Module, inputs: dict, latents: torch.Tensor) -> tuple[int, int]:
    """``(peak bytes, gradient bytes)`` of one distillation micro-step of these modules (meta or real tensors).

    The teacher's forward without gradients, then the student's forward and backward, each with
    its kept blocks' outputs recorded for the feature loss, as the trainer runs them.
    """
    family = get_family(teacher)
    kept = kept_blocks(student)
    trainable = [p for p in student.parameters() if p.requires_grad]
    counter = LiveTensorBytes([*teacher.parameters(), *teacher.buffers(), *student.parameters(), *student.buffers(),
                               inputs, latents])
    with fused_attention_on_meta(), counter:
        with torch.no_grad(), BlockFeatures(teacher, kept) as ft:
            v_t = family.denoiser_output(teacher(**inputs, return_dict=False)[0], latents)
        with BlockFeatures(student, kept) as fs:
            v_s = family.denoiser_output(student(**inputs, return_dict=False)[0], latents)
            loss = loss_terms(v_s, v_t, fs.outputs, ft.outputs)["total"]
            loss.backward()
        del loss, v_s, v_t, fs, ft
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    return counter.peak, gradients


def vae_decode_trace(vae_config: Mapping[str, Any], batch: int, height: int, width: int, dtype: torch.dtype,
                     tiled: bool = False) -> int:
    """Most bytes the VAE's ``decode`` of ``batch`` latents holds at once (the decoded images included); ``tiled``:
    decoded in tiles, as ``loading.sliced_decoding`` sets them up (the same code, run on meta)."""
    return _VAE.get((config_key(_settings(vae_config)), batch, height, width, str(dtype), tiled),
                    lambda: _vae_decode_trace(vae_config, batch, height, width, dtype, tiled))


@torch.no_grad()
def _vae_decode_trace(vae_config: Mapping[str, Any], batch: int, height: int, width: int, dtype: torch.dtype,
                      tiled: bool) -> int:
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=True):
        vae = AutoencoderKL.from_config(_settings(vae_config))
    vae = vae.to(dtype).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.empty(batch, vae.config.latent_channels, height // factor, width // factor, device="meta",
                          dtype=dtype)
    holder = SimpleNamespace(vae=vae)  # the one component sliced_decoding reads
    counter = LiveTensorBytes([*vae.parameters(), *vae.buffers(), latents])
    with fused_attention_on_meta(), sliced_decoding(holder, tiled), counter:
        out = vae.decode(latents, return_dict=False)[0]
    del out
    return counter.peak


__all__ = ["ForwardTrace", "Shapes", "StepTrace", "forward_trace", "meta_inputs", "meta_latents", "meta_transformer", "step_peak",
           "step_trace", "vae_decode_trace"]
