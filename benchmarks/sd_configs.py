"""Stable Diffusion v1.5's published UNet and VAE configs (diffusers config.json values).

Shared by the SD-size benchmarks (memory.py, gpu.py); no weights.
"""

from disentangle_jax.models.ldm_keys import SD_V1_CONFIGS

# runwayml/stable-diffusion-v1-5's unet/ and vae/ config.json: the library's copy (which the
# single-file loader uses), so the two cannot drift apart.
SD15_UNET = dict(SD_V1_CONFIGS["unet"])
SD15_VAE = dict(SD_V1_CONFIGS["vae"])
SCALING_FACTOR = SD15_VAE["scaling_factor"]

SD21_UNET = dict(
    SD15_UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
    use_linear_projection=True)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (1024 px; text 768 + 1280 wide,
# pooled 1280, 6 time ids x 256).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: SD's VAE, another latent scale.
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
