"""Stable Diffusion v1.5's published UNet and VAE configs (diffusers config.json values).

Shared by the SD-size benchmarks (memory.py, gpu.py); no weights, no imports beyond Python.
"""

SCALING_FACTOR = 0.18215

# runwayml/stable-diffusion-v1-5 unet/config.json (the keys the Flax class takes).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# runwayml/stable-diffusion-v1-5 vae/config.json.
SD15_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": SCALING_FACTOR,
}

# stabilityai/stable-diffusion-2-1 unet/config.json (768 px, v-prediction; OpenCLIP-H text 1024).
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
