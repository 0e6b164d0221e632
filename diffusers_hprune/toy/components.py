"""Tiny but genuine SD3 and FLUX pipelines built in code: the stock Diffusers and
Transformers classes (CLIP x2 + T5 text encoders with their tokenizers, a VAE, a
flow-matching scheduler) at toy sizes, with tokenizers made from a word list.

Nothing is downloaded. The toy models of the embedded default are trained from
these builders; tests use them untrained.
"""

from __future__ import annotations

from typing import Iterable

import torch

DEFAULT_WORDS = (
    "a an the one two three red green blue yellow circle square triangle and of left right above below "
    "to on photo"
).split()

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A byte-pair ``CLIPTokenizer`` whose vocabulary is the letters plus every word of ``words`` as one token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in (CLIP_BOS, CLIP_EOS):
        add(token)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,":
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>
            merge = (symbols[0], symbols[1])
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            add(symbols[0])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 256):
    """A unigram ``T5TokenizerFast`` whose vocabulary is ``words`` (plus pad, eos, unk)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w.lower(), -1.0) for w in sorted({w.lower() for w in words})]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(hidden_size: int, vocab_size: int, projection_dim: int, seed_layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=seed_layers,
        max_position_embeddings=77,
        vocab_size=vocab_size,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _t5_encoder(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )


def tiny_sd3_transformer_config(num_layers: int = 4, dual_attention_layers: tuple[int, ...] = (0, 1), **overrides):
    """Config of a tiny ``SD3Transformer2DModel`` (SD3.5-style: qk RMS-norm, some dual-attention blocks)."""
    config = dict(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm="rms_norm",
    )
    config.update(overrides)
    return config


def tiny_flux_transformer_config(num_layers: int = 2, num_single_layers: int = 3, **overrides):
    """Config of a tiny ``FluxTransformer2DModel`` (double then single blocks)."""
    config = dict(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    config.update(overrides)
    return config


def tiny_sd3_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **transformer_overrides):
    """A randomly initialised ``StableDiffusion3Pipeline`` with genuine tiny components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    words = list(words)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_clip_tokenizer(words)
    tokenizer_3 = build_t5_tokenizer(words)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(32, len(tokenizer), 32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, len(tokenizer_2), 32))
    text_encoder_3 = _t5_encoder(32, len(tokenizer_3))
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(**transformer_overrides))
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent_channels=4),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
        transformer=transformer.eval(),
    )


def tiny_flux_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **transformer_overrides):
    """A randomly initialised ``FluxPipeline`` with genuine tiny components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    words = list(words)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_t5_tokenizer(words)
    text_encoder = CLIPTextModel(_clip_text_config(32, len(tokenizer), 32))
    text_encoder_2 = _t5_encoder(32, len(tokenizer_2))
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(**transformer_overrides))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(latent_channels=4),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
