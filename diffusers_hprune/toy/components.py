"""Tiny but genuine SD3 and FLUX pipelines built in code: the stock Diffusers and
Transformers classes (CLIP x2 + T5 text encoders with their tokenizers, a VAE, a
flow-matching scheduler) at toy sizes, with tokenizers made from a word list.

Nothing is downloaded. The toy models of the embedded default are trained from
these builders; tests use them untrained.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

DEFAULT_WORDS = ["a", "an", "the", "one", "two", "three", "red", "green", "blue", "yellow", "circle", "square", "triangle", "and", "of", "left", "right", "above", "below", "to", "on", "photo"]

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A byte-pair ``CLIPTokenizer`` in which every word of ``words`` is one token (letters cover the rest).

    The merges are learned with the ``tokenizers`` BPE trainer on ``words``, so they are
    consistent: every listed word merges all the way to a single token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,") | set("".join(words)))
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100000, special_tokens=[CLIP_BOS, CLIP_EOS], initial_alphabet=alphabet,
        end_of_word_suffix="</w>", show_progress=False,
    )
    bpe.train_from_iterator(words * 2, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for ch in alphabet:  # CLIP also needs every letter as a word end
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 256):
    """A unigram ``T5TokenizerFast`` whose vocabulary is ``words`` (plus pad, eos, unk)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w.lower(), -1.0) for w in sorted({w.lower() for w in words})]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(hidden_size: int, vocab_size: int, projection_dim: int, max_length: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
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
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def build_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8,), norm_num_groups: int = 2):
    """An ``AutoencoderKL`` for 32x32 RGB; it downsamples by ``2 ** (len(block_out_channels) - 1)``."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
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


def build_sd3_pipeline(transformer, words=DEFAULT_WORDS, seed: int = 0, clip_hidden: int = 32, t5_d_model: int = 32,
                       text_length: int = 77, vae=None, scheduler=None):
    """A ``StableDiffusion3Pipeline`` around ``transformer`` with seeded tiny text encoders and tokenizers from ``words``.

    The transformer must have ``joint_attention_dim == t5_d_model`` and
    ``pooled_projection_dim == 2 * clip_hidden``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    words = list(words)
    torch.manual_seed(seed)
    tokenizers = [build_clip_tokenizer(words, text_length), build_clip_tokenizer(words, text_length)]
    tokenizer_3 = build_t5_tokenizer(words)
    encoders = [
        CLIPTextModelWithProjection(_clip_text_config(clip_hidden, len(t), clip_hidden, text_length)).eval()
        for t in tokenizers
    ]
    return StableDiffusion3Pipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae or build_vae(latent_channels=transformer.config.in_channels),
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=_t5_encoder(t5_d_model, len(tokenizer_3)).eval(),
        tokenizer_3=tokenizer_3,
        transformer=transformer.eval(),
    )


def build_flux_pipeline(transformer, words=DEFAULT_WORDS, seed: int = 0, clip_hidden: int = 32, t5_d_model: int = 32,
                        text_length: int = 77, vae=None, scheduler=None):
    """A ``FluxPipeline`` around ``transformer`` with seeded tiny text encoders and tokenizers from ``words``.

    The transformer must have ``joint_attention_dim == t5_d_model`` and ``pooled_projection_dim == clip_hidden``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    words = list(words)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, text_length)
    tokenizer_2 = build_t5_tokenizer(words)
    return FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=vae or build_vae(latent_channels=transformer.config.in_channels // 4),
        text_encoder=CLIPTextModel(_clip_text_config(clip_hidden, len(tokenizer), clip_hidden, text_length)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(t5_d_model, len(tokenizer_2)).eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def tiny_sd3_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **transformer_overrides):
    """A randomly initialised ``StableDiffusion3Pipeline`` with genuine tiny components."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(**transformer_overrides))
    return build_sd3_pipeline(transformer, words, seed=seed)


def tiny_flux_pipeline(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, **transformer_overrides):
    """A randomly initialised ``FluxPipeline`` with genuine tiny components."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(**transformer_overrides))
    return build_flux_pipeline(transformer, words, seed=seed)
