"""``HierarchicalPrunedFluxTransformer2DModel``: a FLUX.1 transformer whose config carries its prune plan."""

from __future__ import annotations

from typing import Any

from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config

from diffusers_hprune.families.flux.structure import FLUX
from diffusers_hprune.models.pruned import HierarchicalPrunedMixin
from diffusers_hprune.utils.registration import register


class HierarchicalPrunedFluxTransformer2DModel(HierarchicalPrunedMixin, FluxTransformer2DModel):
    """``FluxTransformer2DModel`` with blocks and components removed as ``prune_plan`` says.

    Block indices in the plan are global: double-stream blocks ``0..num_layers-1``,
    then single-stream blocks. Kept parameters keep their original names
    (``single_transformer_blocks.5.proj_mlp...``); a single block without ``attn``
    or ``mlp`` keeps only the matching input columns of its ``proj_out``.

    Args:
        prune_plan: a :class:`~diffusers_hprune.PrunePlan` dict; ``None`` builds the unpruned
            model. All other arguments are those of ``FluxTransformer2DModel``.
    """

    family_name = FLUX.name
    _no_split_modules = [
        "FluxTransformerBlock",
        "FluxSingleTransformerBlock",
        "PrunedFluxTransformerBlock",
        "PrunedFluxSingleTransformerBlock",
        "RemovedBlock",
    ]
    # compile_repeated_blocks(): every block class a pruned model holds (a removed block computes nothing)
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock", "PrunedFluxTransformerBlock",
                        "PrunedFluxSingleTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        prune_plan: dict[str, Any] | None = None,
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        self._build_pruned_structure(prune_plan)


register(HierarchicalPrunedFluxTransformer2DModel)
