"""``HierarchicalPrunedSD3Transformer2DModel``: an SD3/SD3.5 transformer whose config carries its prune plan."""

from __future__ import annotations

from typing import Any

from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.cache_utils import CacheMixin

from diffusers_hprune.families.sd3.structure import SD3
from diffusers_hprune.models.pruned import HierarchicalPrunedMixin
from diffusers_hprune.utils.compat import cache_context_set
from diffusers_hprune.utils.registration import register


class HierarchicalPrunedSD3Transformer2DModel(HierarchicalPrunedMixin, SD3Transformer2DModel, CacheMixin):
    """``SD3Transformer2DModel`` with blocks and components removed as ``prune_plan`` says.

    Unlike the stock class it also has ``enable_cache`` (Diffusers' ``CacheMixin``: First Block
    Cache, Pyramid Attention Broadcast, TaylorSeer, ...) and ``_repeated_blocks`` for
    ``compile_repeated_blocks()``.

    The pruned structure is built in ``__init__``, before any weights load, so
    ``from_pretrained`` / ``save_pretrained`` round-trip with strict loading. Kept
    parameters keep their original names (``transformer_blocks.29.attn...``).

    Args:
        prune_plan: a :class:`~diffusers_hprune.PrunePlan` dict (``PrunePlan.to_dict()``);
            ``None`` builds the unpruned model. All other arguments are those of
            ``SD3Transformer2DModel``.
    """

    family_name = SD3.name
    _no_split_modules = ["JointTransformerBlock", "PrunedJointTransformerBlock", "RemovedBlock"]
    # compile_repeated_blocks(): every block class a pruned model holds (a removed block computes nothing)
    _repeated_blocks = ["JointTransformerBlock", "PrunedJointTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        prune_plan: dict[str, Any] | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        self._build_pruned_structure(prune_plan)

    def forward(self, *args, **kwargs):
        """``SD3Transformer2DModel.forward``; with a cache enabled and no cache context set, inside one.

        Diffusers' cache hooks keep their state per named context, which FluxPipeline opens
        around each transformer call and StableDiffusion3Pipeline does not (SD3 runs both
        classifier-free-guidance branches in one batch, so one context serves every call).
        """
        if self.is_cache_enabled and not cache_context_set(self):
            with self.cache_context("cond"):
                return super().forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


register(HierarchicalPrunedSD3Transformer2DModel)
