"""FLUX.1 family: FLUX.1-schnell, FLUX.1-dev (and any block counts in tiny configs).

Diffusers class ``FluxTransformer2DModel``: ``num_layers`` double-stream
``FluxTransformerBlock``s (``transformer_blocks``) run first, then
``num_single_layers`` single-stream ``FluxSingleTransformerBlock``s
(``single_transformer_blocks``). Global block index = double index, then
``num_layers + single index`` (FLUX.1: 0..18 double, 19..56 single).

A single-stream block computes ``proj_out(cat[attn(x), gelu(proj_mlp(x))])``:
the ``attn`` component owns the attention and the first ``dim`` input columns of
``proj_out``; ``mlp`` owns ``proj_mlp`` and the remaining columns; ``norm`` is the
AdaLN modulation. ``proj_out.bias`` belongs to the block as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusers_hprune.architecture.base import BlockSpec, ModelFamily, gated, match_batch, plain_layer_norm
from diffusers_hprune.architecture.mmdit import PrunedDualStreamBlock
from diffusers_hprune.architecture.published import CLIP_L_TEXT_MODEL, T5_XXL, VAE_16_CHANNELS, VAE_16_CHANNELS_LAYOUT
from diffusers_hprune.utils.compat import (
    flux_latent_image_ids,
    flux_pack_latents,
    flux_unpack_latents,
    mark_packed_rows,
)

_DOUBLE_SUBMODULES = {
    "attn": ("attn",),
    "ff": ("ff",),
    "ff_context": ("ff_context",),
    "norm1": ("norm1",),
    "norm1_context": ("norm1_context",),
}
_SINGLE_SUBMODULES = {"attn": ("attn",), "mlp": ("proj_mlp",), "norm": ("norm",)}
DOUBLE_COMPONENTS = ("attn", "ff", "ff_context", "norm1", "norm1_context")
SINGLE_COMPONENTS = ("attn", "mlp", "norm")


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class PrunedFluxTransformerBlock(PrunedDualStreamBlock):
    """A partly pruned FLUX double-stream block (same call signature as the stock block)."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        attention_kwargs = {"image_rotary_emb": image_rotary_emb, **(joint_attention_kwargs or {})}
        encoder_hidden_states, hidden_states = self._forward(
            hidden_states, encoder_hidden_states, temb, attention_kwargs
        )
        return _clip_fp16(encoder_hidden_states), hidden_states


class PrunedFluxSingleTransformerBlock(nn.Module):
    """A partly pruned FLUX single-stream block; ``proj_out`` keeps only the columns of kept paths."""

    def __init__(self, block: nn.Module, removed: frozenset[str]):
        super().__init__()
        if {"attn", "mlp"} <= removed:
            raise ValueError("a single block without attn and mlp is a removed block")
        self.removed_components = tuple(sorted(removed))
        dim = block.proj_out.out_features
        self.mlp_hidden_dim = block.mlp_hidden_dim
        self.norm = None if "norm" in removed else block.norm
        self.attn = None if "attn" in removed else block.attn
        self.proj_mlp = None if "mlp" in removed else block.proj_mlp
        self.act_mlp = block.act_mlp
        if self.attn is not None and self.proj_mlp is not None:
            self.proj_out = block.proj_out
        else:
            columns = slice(0, dim) if self.attn is not None else slice(dim, dim + self.mlp_hidden_dim)
            old = block.proj_out
            new = nn.Linear(columns.stop - columns.start, dim, bias=True, device="meta")
            new.weight = nn.Parameter(old.weight[:, columns].contiguous(), requires_grad=old.weight.requires_grad)
            new.bias = old.bias
            mark_packed_rows(new, [columns.stop - columns.start])
            self.proj_out = new

    def extra_repr(self) -> str:
        return f"removed={list(self.removed_components)}"

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_seq_len = encoder_hidden_states.shape[1]
        encoder_hidden_states = match_batch(encoder_hidden_states, hidden_states)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        if self.norm is None:
            norm_hidden_states, gate = plain_layer_norm(hidden_states), None
        else:
            norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        paths = []
        if self.attn is not None:
            paths.append(
                self.attn(
                    hidden_states=norm_hidden_states,
                    image_rotary_emb=image_rotary_emb,
                    **(joint_attention_kwargs or {}),
                )
            )
        if self.proj_mlp is not None:
            paths.append(self.act_mlp(self.proj_mlp(norm_hidden_states)))
        joined = paths[0] if len(paths) == 1 else torch.cat(paths, dim=2)
        hidden_states = _clip_fp16(residual + gated(self.proj_out(joined), gate))
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class FluxFamily(ModelFamily):
    name = "flux"
    display_name = "FLUX.1"
    base_class_name = "FluxTransformer2DModel"
    pruned_class_name = "HierarchicalPrunedFluxTransformer2DModel"
    component_names = ("attn", "ff", "ff_context", "norm1", "norm1_context", "mlp", "norm")
    default_alpha = 0.01
    input_modules = ("pos_embed", "time_text_embed", "context_embedder", "x_embedder")
    block_count_keys = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
    marker_parameters = {"attn": "attn.to_q.weight", "ff": "ff.net.0.proj.weight",
                         "ff_context": "ff_context.net.0.proj.weight", "norm1": "norm1.linear.weight",
                         "norm1_context": "norm1_context.linear.weight", "mlp": "proj_mlp.weight",
                         "norm": "norm.linear.weight"}
    # The single-stream blocks' projections are also named proj_out: listing it would keep
    # 1.8 B parameters of FLUX.1 in 16-bit. The top-level proj_out (3072 x 64) is quantised.
    nf4_skip_modules = ("time_text_embed", "context_embedder", "x_embedder", "norm_out")
    original_layout_module = "diffusers_hprune.families.flux.original_layout"
    model_module = "diffusers_hprune.families.flux.transformer"
    pipeline_module = "diffusers_hprune.families.flux.pipelines"
    pipeline_class_names = ("HierarchicalPrunedFluxPipeline", "HierarchicalPrunedFluxImg2ImgPipeline",
                            "HierarchicalPrunedFluxInpaintPipeline")
    auto_pipeline_name = "hprune-flux"
    builtin_configs = {"flux.1-schnell": "flux.1-schnell.json", "flux.1-dev": "flux.1-dev.json"}
    published_components = {"text_encoder": CLIP_L_TEXT_MODEL, "text_encoder_2": T5_XXL, "vae": VAE_16_CHANNELS}
    published_vae_config = dict(VAE_16_CHANNELS_LAYOUT, scaling_factor=0.3611, shift_factor=0.1159)
    paper_max_sequence_length = 512  # FluxPipeline's T5 length
    # The model cards' settings (the Hugging Face model card of each repository, its Diffusers example).
    published_models = {
        "flux.1-schnell": dict(display_name="FLUX.1 [schnell]", repo_ids=("black-forest-labs/FLUX.1-schnell",),
                               num_inference_steps=4, guidance_scale=0.0, guidance_argument="guidance_scale",
                               max_sequence_length=256, resolution=1024),
        "flux.1-dev": dict(display_name="FLUX.1 [dev]", repo_ids=("black-forest-labs/FLUX.1-dev",),
                           num_inference_steps=50, guidance_scale=3.5, guidance_argument="guidance_scale",
                           max_sequence_length=512, resolution=1024),
    }

    def block_specs(self, config: Mapping[str, Any]) -> list[BlockSpec]:
        num_double = int(config.get("num_layers", 19))
        num_single = int(config.get("num_single_layers", 38))
        specs = [
            BlockSpec(
                index=i,
                path=f"transformer_blocks.{i}",
                kind="double",
                components=DOUBLE_COMPONENTS,
                branches=("attn", "ff", "ff_context"),
                modulations=(("norm1", ("attn", "ff")), ("norm1_context", ("attn", "ff_context"))),
            )
            for i in range(num_double)
        ]
        specs += [
            BlockSpec(
                index=num_double + j,
                path=f"single_transformer_blocks.{j}",
                kind="single",
                components=SINGLE_COMPONENTS,
                branches=("attn", "mlp"),
                modulations=(("norm", ("attn", "mlp")),),
            )
            for j in range(num_single)
        ]
        return specs

    def component_submodules(self, spec: BlockSpec, component: str) -> tuple[str, ...]:
        table = _SINGLE_SUBMODULES if spec.kind == "single" else _DOUBLE_SUBMODULES
        return table[component]

    def shared_parameter_slices(self, spec: BlockSpec, component: str, config: Mapping[str, Any]):
        if spec.kind != "single" or component not in ("attn", "mlp"):
            return {}
        dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        mlp_hidden = int(dim * 4.0)  # FluxSingleTransformerBlock's default mlp_ratio
        columns = slice(0, dim) if component == "attn" else slice(dim, dim + mlp_hidden)
        return {"proj_out.weight": (1, columns)}

    def pruned_block(self, block: nn.Module, spec: BlockSpec, removed: frozenset[str]) -> nn.Module:
        if spec.kind == "single":
            return PrunedFluxSingleTransformerBlock(block, removed)
        return PrunedFluxTransformerBlock(block, removed)

    def pruned_block_classes(self):
        return (*super().pruned_block_classes(), PrunedFluxTransformerBlock, PrunedFluxSingleTransformerBlock)

    def latent_channels(self, config):
        return int(config["in_channels"]) // 4  # FLUX packs 2x2 latent patches into its input channels

    def encode_text(self, pipe, prompts, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(list(prompts), prompt_2=None, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def denoiser_inputs(self, transformer, latents, sigmas, text, guidance_scale=None):
        # FLUX takes packed 2x2 latent patches with position ids, and the timestep in [0, 1]
        # (the model scales it by 1000); FLUX.1-dev also takes the distilled guidance scale.
        b, c, h, w = latents.shape
        packed = flux_pack_latents(latents)
        img_ids = flux_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        embeds = text["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if transformer.config.get("guidance_embeds"):
            guidance = torch.full((b,), 3.5 if guidance_scale is None else guidance_scale, device=latents.device,
                                  dtype=latents.dtype)
        return {"hidden_states": packed, "timestep": sigmas, "guidance": guidance, "encoder_hidden_states": embeds,
                "pooled_projections": text["pooled_projections"], "img_ids": img_ids, "txt_ids": txt_ids}

    def denoiser_output(self, output, latents):
        _, _, h, w = latents.shape
        return flux_unpack_latents(output, h, w, 1)  # height/width in latent pixels: scale factor 1

    def pipeline_latents(self, pipe, latents, height, width):
        return flux_unpack_latents(latents, height, width, pipe.vae_scale_factor)


FLUX = FluxFamily()
