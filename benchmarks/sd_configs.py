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
