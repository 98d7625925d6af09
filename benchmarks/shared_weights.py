"""Tiny and mid-size Stable Diffusion models with one set of weights for Flax and PyTorch.

Used by the benchmarks that compare against diffusers' PyTorch modules (throughput.py,
iteration.py): the weights are created by PyTorch (its default init, seed 0) and converted by
the library's checkpoint converter (``convert.torch_to_flax``), so both sides compute with
identical weights. Import after ``harness.add_repo_to_path()``.
"""
from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import torch
import transformers

from disentangle_jax import convert, models


def size_configs(size: str, mid_latent: int) -> tuple[dict, dict, int]:
  """(UNet config, VAE config, latent H) of a named size (diffusers config dicts)."""
  if size == "tiny":
    return models.tiny_unet_config(8), models.tiny_vae_config(64), 8
  if size == "mid":
    unet = dict(models.tiny_unet_config(mid_latent),
                block_out_channels=[64, 128, 256], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    vae = dict(models.tiny_vae_config(mid_latent * 8),
               block_out_channels=[32, 64, 128, 128], norm_num_groups=32)
    return unet, vae, mid_latent
  raise ValueError(f"--sizes has {size!r}; use tiny or mid.")


def describe(unet_cfg: dict, vae_cfg: dict, latent: int, params) -> str:
  n_unet = sum(x.size for x in jax.tree.leaves(params["unet"]))
  n_vae = sum(x.size for x in jax.tree.leaves(params["vae"]))
  return (f"UNet channels {tuple(unet_cfg['block_out_channels'])} x "
          f"{unet_cfg['layers_per_block']} layers ({n_unet / 1e6:.2f} M params), text width "
          f"{unet_cfg['cross_attention_dim']}; VAE channels {tuple(vae_cfg['block_out_channels'])} "
          f"({n_vae / 1e6:.2f} M params); latents {latent}x{latent}x4, images "
          f"{latent * 8}x{latent * 8}")


class SharedWeights:
  """One set of weights as both a Flax ``StableDiffusion`` and PyTorch modules."""

  def __init__(self, unet_cfg: dict, vae_cfg: dict, latent: int):
    tiny = models.build_tiny(models.ModelConfig(tiny_latent_size=latent))  # tokenizer, CLIP
    torch.manual_seed(0)
    self.torch_unet = diffusers.UNet2DConditionModel.from_config(unet_cfg).eval()
    self.torch_vae = diffusers.AutoencoderKL.from_config(vae_cfg).eval()
    self.torch_text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig.from_dict(models.tiny_text_config(tiny.tokenizer))).eval()
    unet = diffusers.FlaxUNet2DConditionModel.from_config(unet_cfg, dtype=jnp.float32)
    vae = diffusers.FlaxAutoencoderKL.from_config(vae_cfg, dtype=jnp.float32)
    key = jax.random.PRNGKey(0)
    params = {
        "unet": _from_torch(self.torch_unet, jax.eval_shape(unet.init_weights, key), "diffusers"),
        "vae": _from_torch(self.torch_vae, jax.eval_shape(vae.init_weights, key), "diffusers"),
        "text_encoder": _from_torch(self.torch_text, tiny.text_encoder.params_shape_tree,
                                    "transformers"),
    }
    self.sd = tiny._replace(unet=unet, vae=vae, params=params, latent_size=latent)


def _from_torch(module, shape_tree, naming: str) -> dict:
  state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  return jax.tree.map(jnp.asarray, convert.torch_to_flax(state, shape_tree, naming))
