"""Parameter counts and configs of published components that several families' pipelines share.

Counted from the safetensors headers of the Hub checkpoints. A family's folder says which of them its
published pipeline holds (``ModelFamily.published_components``, ``published_vae_config``); the memory
budget uses them when no pipeline folder is at hand.
"""

from __future__ import annotations

CLIP_L = 123_650_304  # CLIPTextModelWithProjection, ViT-L/14
CLIP_L_TEXT_MODEL = 123_060_480  # CLIPTextModel, ViT-L/14 (no projection)
CLIP_G = 694_659_840 + 1280 * 1280  # OpenCLIP ViT-bigG/14 text model + projection
T5_XXL = 4_762_310_656  # T5EncoderModel, t5-v1_1-xxl
VAE_16_CHANNELS = 83_653_863  # AutoencoderKL of VAE_16_CHANNELS_LAYOUT

#: The 16-channel AutoencoderKL of SD3 / SD3.5 and FLUX.1 (each family sets its own scaling and shift).
VAE_16_CHANNELS_LAYOUT = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "mid_block_add_attention": True, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024,
}
