"""Stable Diffusion 3 family: SD3 Medium, SD3.5 Large / Large Turbo, SD3.5 Medium.

Diffusers class ``SD3Transformer2DModel``: ``num_layers`` ``JointTransformerBlock``s
in ``transformer_blocks``. The last block is ``context_pre_only`` (no text output,
no ``ff_context``); blocks listed in ``dual_attention_layers`` (SD3.5 Medium) carry
a second, image-only attention ``attn2`` that belongs to the ``attn`` component.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusers_hprune.architecture.base import BlockSpec, ModelFamily
from diffusers_hprune.architecture.mmdit import PrunedDualStreamBlock
from diffusers_hprune.architecture.published import CLIP_G, CLIP_L, T5_XXL, VAE_16_CHANNELS, VAE_16_CHANNELS_LAYOUT
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import CheckpointMismatchError, PlanError

# What a context_pre_only block lacks: it has no text-stream output.
_TEXT_OUTPUT = ("ff_context.", "norm2_context.", "attn.to_add_out.")

_SUBMODULES = {
    "attn": ("attn", "attn2"),
    "ff": ("ff",),
    "ff_context": ("ff_context",),
    "norm1": ("norm1",),
    "norm1_context": ("norm1_context",),
}


def _stock_last_modulation(rows: torch.Tensor) -> torch.Tensor:
    """Rows of an ``AdaLayerNormZero`` output layer (shift, scale, gate of attention, then of the MLP)
    as the stock last block's ``AdaLayerNormContinuous`` orders its two: scale, shift."""
    chunks = rows.chunk(6, dim=0)
    return torch.cat([chunks[1], chunks[0]], dim=0).contiguous()


class PrunedJointTransformerBlock(PrunedDualStreamBlock):
    """A partly pruned SD3 ``JointTransformerBlock`` (same call signature as the stock block)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        return self._forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs or {})


class SD3Family(ModelFamily):
    name = "sd3"
    display_name = "Stable Diffusion 3 / 3.5"
    base_class_name = "SD3Transformer2DModel"
    pruned_class_name = "HierarchicalPrunedSD3Transformer2DModel"
    text_has_clip_tokens = True
    negative_prompt_default = ""  # StableDiffusion3Pipeline's classifier-free guidance encodes "" unless told otherwise
    component_names = ("attn", "ff", "ff_context", "norm1", "norm1_context")
    default_alpha = 0.55
    input_modules = ("pos_embed", "time_text_embed", "context_embedder")
    block_count_keys = {"transformer_blocks": "num_layers"}
    original_layout_module = "diffusers_hprune.families.sd3.original_layout"
    model_module = "diffusers_hprune.families.sd3.transformer"
    pipeline_module = "diffusers_hprune.families.sd3.pipelines"
    pipeline_class_names = ("HierarchicalPrunedSD3Pipeline", "HierarchicalPrunedSD3Img2ImgPipeline",
                            "HierarchicalPrunedSD3InpaintPipeline")
    auto_pipeline_name = "hprune-stable-diffusion-3"
    builtin_configs = {"sd3-medium": "sd3-medium.json", "sd3.5-large": "sd3.5-large.json",
                       "sd3.5-large-turbo": "sd3.5-large.json", "sd3.5-medium": "sd3.5-medium.json"}
    published_components = {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL,
                            "vae": VAE_16_CHANNELS}
    published_vae_config = dict(VAE_16_CHANNELS_LAYOUT, scaling_factor=1.5305, shift_factor=0.0609)
    # The model cards' settings (the Hugging Face model card of each repository, its Diffusers example).
    published_models = {
        "sd3.5-large-turbo": dict(display_name="Stable Diffusion 3.5 Large Turbo",
                                  repo_ids=("stabilityai/stable-diffusion-3.5-large-turbo",), num_inference_steps=4,
                                  guidance_scale=0.0, guidance_argument="guidance_scale", max_sequence_length=256,
                                  resolution=1024),
        "sd3.5-large": dict(display_name="Stable Diffusion 3.5 Large", repo_ids=("stabilityai/stable-diffusion-3.5-large",),
                            num_inference_steps=28, guidance_scale=3.5, guidance_argument="guidance_scale",
                            max_sequence_length=256, resolution=1024),
        "sd3.5-medium": dict(display_name="Stable Diffusion 3.5 Medium",
                             repo_ids=("stabilityai/stable-diffusion-3.5-medium",), num_inference_steps=40,
                             guidance_scale=4.5, guidance_argument="guidance_scale", max_sequence_length=256,
                             resolution=1024),
        "sd3-medium": dict(display_name="Stable Diffusion 3 Medium",
                           repo_ids=("stabilityai/stable-diffusion-3-medium-diffusers",
                                     "stabilityai/stable-diffusion-3-medium"),
                           num_inference_steps=28, guidance_scale=7.0, guidance_argument="guidance_scale",
                           max_sequence_length=256, resolution=1024),
    }
    guidance_is_cfg = True  # StableDiffusion3Pipeline batches the unconditional and the conditional pass
    paper_max_sequence_length = 256  # 77 CLIP + 256 T5 tokens
    marker_parameters = {"attn": "attn.to_q.weight", "ff": "ff.net.0.proj.weight",
                         "ff_context": "ff_context.net.0.proj.weight", "norm1": "norm1.linear.weight",
                         "norm1_context": "norm1_context.linear.weight"}

    def block_specs(self, config: Mapping[str, Any]) -> list[BlockSpec]:
        num_layers = int(config.get("num_layers", 18))
        dual = set(config.get("dual_attention_layers") or ())
        specs = []
        for i in range(num_layers):
            last = i == num_layers - 1
            components = ("attn", "ff", "norm1", "norm1_context") if last else self.component_names
            specs.append(
                BlockSpec(
                    index=i,
                    path=f"transformer_blocks.{i}",
                    kind="joint",
                    components=components,
                    branches=("attn", "ff") if last else ("attn", "ff", "ff_context"),
                    dual_attention=i in dual,
                    context_pre_only=last,
                    # the last block's text modulation feeds only its attention (no text MLP, no text output)
                    modulations=(("norm1", ("attn", "ff")),
                                 ("norm1_context", ("attn",) if last else ("attn", "ff_context"))),
                )
            )
        return specs

    def component_submodules(self, spec: BlockSpec, component: str) -> tuple[str, ...]:
        return _SUBMODULES[component]

    def pruned_block(self, block: nn.Module, spec: BlockSpec, removed: frozenset[str]) -> nn.Module:
        return PrunedJointTransformerBlock(block, removed)

    def pruned_block_classes(self):
        return (*super().pruned_block_classes(), PrunedJointTransformerBlock)

    def stock_config(self, config, plan):
        out = super().stock_config(config, plan)
        paths = self.stock_block_paths(config, plan)
        dual = config.get("dual_attention_layers") or ()
        out["dual_attention_layers"] = [int(paths[f"transformer_blocks.{i}"].rsplit(".", 1)[1]) for i in dual
                                        if f"transformer_blocks.{i}" in paths]
        return out

    def stock_state_dict(self, state_dict, config, plan: PrunePlan):
        """Renumbered weights; when the plan removes the last block, the new last block becomes
        ``context_pre_only`` as the stock class builds it.

        Its text-stream output (``ff_context``, ``norm2_context``, ``attn.to_add_out``) goes, and
        its text modulation keeps the two chunks the stock ``AdaLayerNormContinuous`` computes,
        in that class's order (scale, shift) instead of ``AdaLayerNormZero``'s (shift, scale,
        gate, ...). The block computed that output before, but nothing read it: the image
        stream, and so the image, is the same.
        """
        out = super().stock_state_dict(state_dict, config, plan)
        last = self._new_last_block(config, plan)
        if last is None:
            return out
        original, block = last
        modulation = f"{block}.norm1_context.linear."
        quantised = [k for k in out if k.startswith(modulation) and k not in (modulation + "weight", modulation + "bias")]
        if quantised:
            raise PlanError(
                f"The plan removes the last block, so {original} becomes the last block of the stock model and its "
                "text modulation must be cut to the two chunks the stock last block has, but these weights are "
                "quantised (4-bit or int8). Export the 16-bit folder this one was quantised from with --stock "
                "(`hprune compress` keeps it as 4-distilled/), or export this one with --format remote."
            )
        for key in list(out):
            if key.startswith(tuple(f"{block}.{name}" for name in _TEXT_OUTPUT)):
                del out[key]
            elif key.startswith(modulation):
                out[key] = _stock_last_modulation(out[key])
        return out

    def _new_last_block(self, config, plan: PrunePlan) -> tuple[str, str] | None:
        """``(original path, stock path)`` of the block that becomes the stock model's last block in
        place of a removed original last block; ``None`` when the plan keeps the last block."""
        if int(config.get("num_layers", 18)) - 1 not in plan.removed_blocks:
            return None
        paths = self.stock_block_paths(config, plan)
        return max(paths.items(), key=lambda item: int(item[1].rsplit(".", 1)[1]))

    def stock_lora_state_dict(self, lora, config, plan: PrunePlan, prefix: str = ""):
        """Renumbered adapters; when the plan removes the last block, the new last block's adapters
        follow its weights: those of its text-stream output go, its text modulation's ``lora_B``
        keeps the stock last block's two chunks (scale, shift)."""
        out, dropped = super().stock_lora_state_dict(lora, config, plan, prefix=prefix)
        last = self._new_last_block(config, plan)
        if last is None:
            return out, dropped
        original, block = last
        block = f"{prefix}{block}."
        for key in list(out):
            if key.startswith(tuple(block + name for name in _TEXT_OUTPUT)):
                module = original + "." + key[len(block):].split(".lora_")[0]
                if module not in dropped:
                    dropped.append(module)
                del out[key]
            elif key.startswith(block + "norm1_context.linear.lora_B."):
                rows = out[key]
                if rows.ndim != 2 or rows.shape[0] % 6:
                    raise CheckpointMismatchError(
                        f"The LoRA's {key} has shape {tuple(rows.shape)}; an SD3 block's text modulation has 6 "
                        "chunks of rows (a 2-D lora_B with a multiple of 6 rows). The LoRA is damaged or made for "
                        "another model.")
                out[key] = _stock_last_modulation(rows)
        return out, dropped

    def encode_text(self, pipe, prompts, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def denoiser_inputs(self, transformer, latents, sigmas, text, guidance_scale=None):
        # SD3 takes the timestep on the scheduler's 0..1000 scale.
        return {"hidden_states": latents, "timestep": sigmas * 1000.0,
                "encoder_hidden_states": text["prompt_embeds"], "pooled_projections": text["pooled_projections"]}


SD3 = SD3Family()
