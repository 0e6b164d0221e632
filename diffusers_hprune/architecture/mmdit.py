"""The dual-stream MMDiT block with removable components.

SD3's ``JointTransformerBlock`` and FLUX's ``FluxTransformerBlock`` compute the
same thing (AdaLN-Zero modulation of an image and a text stream, one joint
attention, one MLP per stream); this module holds that computation once, with
every component optional, following the removal semantics of DESIGN.md section 5:
a removed branch adds nothing, a removed modulation leaves a plain LayerNorm
(eps 1e-6) with shift = scale = 0 and gates = 1. Blocks that lose nothing keep
the stock Diffusers module; only partly pruned blocks use this one.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_hprune.architecture.base import gated, match_batch, modulate, plain_layer_norm
from diffusers_hprune.utils.compat import feed_forward_chunking


class PrunedDualStreamBlock(nn.Module):
    """A partly pruned dual-stream block. Kept submodules keep their original names,
    so state-dict keys (``transformer_blocks.7.ff.net.0.proj.weight``) are unchanged."""

    def __init__(self, block: nn.Module, removed: frozenset[str]):
        super().__init__()
        self.removed_components = tuple(sorted(removed))
        self.context_pre_only = bool(getattr(block, "context_pre_only", False))
        self.use_dual_attention = bool(getattr(block, "use_dual_attention", False))
        self.norm1 = None if "norm1" in removed else block.norm1
        self.norm1_context = None if "norm1_context" in removed else block.norm1_context
        self.attn = None if "attn" in removed else block.attn
        self.attn2 = None if "attn" in removed else getattr(block, "attn2", None)
        self.ff = None if "ff" in removed else block.ff
        self.ff_context = None if "ff_context" in removed else getattr(block, "ff_context", None)
        self._chunk_size, self._chunk_dim = feed_forward_chunking(block)

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        self._chunk_size = chunk_size
        self._chunk_dim = dim

    def extra_repr(self) -> str:
        return f"removed={list(self.removed_components)}"

    def _feed_forward(self, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return ff(x)
        size = x.shape[self._chunk_dim]
        if size % self._chunk_size:
            raise ValueError(f"Feed-forward chunking: the dimension to chunk has {size} entries, not a multiple of the "
                             f"chunk size {self._chunk_size}; give `set_chunk_feed_forward` a chunk size that divides it.")
        chunks = x.chunk(size // self._chunk_size, dim=self._chunk_dim)
        return torch.cat([ff(chunk) for chunk in chunks], dim=self._chunk_dim)

    def _forward(self, hidden_states, encoder_hidden_states, temb, attention_kwargs):
        encoder_hidden_states = match_batch(encoder_hidden_states, hidden_states)
        # Image-stream modulation (norm1).
        gate_msa = shift_mlp = scale_mlp = gate_mlp = gate_msa2 = None
        if self.norm1 is None:
            norm_hidden_states = norm_hidden_states2 = plain_layer_norm(hidden_states)
        elif self.use_dual_attention:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = self.norm1(
                hidden_states, emb=temb
            )
        else:
            norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
            norm_hidden_states2 = None

        # Text-stream modulation (norm1_context).
        c_gate_msa = c_shift_mlp = c_scale_mlp = c_gate_mlp = None
        if self.norm1_context is None:
            norm_encoder_hidden_states = plain_layer_norm(encoder_hidden_states)
        elif self.context_pre_only:
            norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb
            )

        # Joint attention (attn, and attn2 in SD3.5 dual-attention blocks).
        context_attn_output = ip_attn_output = None
        if self.attn is not None:
            outputs = self.attn(
                hidden_states=norm_hidden_states,
                encoder_hidden_states=norm_encoder_hidden_states,
                **attention_kwargs,
            )
            attn_output, context_attn_output = outputs[0], outputs[1]
            if len(outputs) == 3:
                ip_attn_output = outputs[2]
            hidden_states = hidden_states + gated(attn_output, gate_msa)
            if self.attn2 is not None:
                extra = {k: v for k, v in attention_kwargs.items() if k != "image_rotary_emb"}
                attn_output2 = self.attn2(hidden_states=norm_hidden_states2, **extra)
                hidden_states = hidden_states + gated(attn_output2, gate_msa2)

        # Image MLP (ff).
        if self.ff is not None:
            ff_input = modulate(plain_layer_norm(hidden_states), shift_mlp, scale_mlp)
            hidden_states = hidden_states + gated(self._feed_forward(self.ff, ff_input), gate_mlp)
        if ip_attn_output is not None:
            hidden_states = hidden_states + ip_attn_output

        # Text stream: attention output, then text MLP (ff_context).
        if self.context_pre_only:
            return None, hidden_states
        if context_attn_output is not None:
            encoder_hidden_states = encoder_hidden_states + gated(context_attn_output, c_gate_msa)
        if self.ff_context is not None:
            ff_input = modulate(plain_layer_norm(encoder_hidden_states), c_shift_mlp, c_scale_mlp)
            encoder_hidden_states = encoder_hidden_states + gated(
                self._feed_forward(self.ff_context, ff_input), c_gate_mlp
            )
        return encoder_hidden_states, hidden_states
