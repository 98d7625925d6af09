"""The 16-channel VAE of SD 3.x and Flux.1 through diffusers' FlaxAutoencoderKL.

Two differences from the SD 1.x/2.x/SDXL VAE: the checkpoints have no quant convs
(``use_quant_conv`` / ``use_post_quant_conv`` false), and the latent space is shifted as well as
scaled: latents = (z - shift_factor) * scaling_factor. diffusers' Flax class always has both
1 x 1 quant convs, so the converted tree gets identity ones (a 1 x 1 convolution with the
identity kernel and zero bias is the identity: the same numbers); the shift is applied around
the existing decode / encode wrappers (apply.py).

  decode(params, latents [B,H,W,16]) -> images [B,8H,8W,3] in [0, 1]
  encode(params, images [B,h,w,3] in [0, 1], key=None) -> latents [B,h/8,w/8,16]
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from disentangle_jax import convert
from disentangle_jax.models import apply, build
from disentangle_jax.models.config import ModelConfig


def build_vae(cfg: dict, config: ModelConfig = ModelConfig()):
  """FlaxAutoencoderKL from a vae/config.json dict (the quant-conv switches are not its fields)."""
  cfg = {k: v for k, v in cfg.items()
         if not k.startswith("_") and k not in ("use_quant_conv", "use_post_quant_conv",
                                                 "shift_factor", "latents_mean", "latents_std",
                                                 "mid_block_add_attention")}
  return build.build_vae(cfg, config)


def vae_params(state_dict: dict[str, np.ndarray], vae, cfg: dict, source: str = "vae") -> dict:
  """The Flax VAE tree of a diffusers AutoencoderKL state dict, with identity quant convs where
  the checkpoint has none (module docstring)."""
  shapes = build.init_shapes(vae)
  state = dict(state_dict)
  c = vae.config.latent_channels
  for name, used, width in (("quant_conv", cfg.get("use_quant_conv", True), 2 * c),
                            ("post_quant_conv", cfg.get("use_post_quant_conv", True), c)):
    if not used:
      state[f"{name}.weight"] = np.eye(width, dtype=np.float32)[:, :, None, None]
      state[f"{name}.bias"] = np.zeros((width,), np.float32)
  return convert.torch_to_flax(state, shapes, "diffusers", source)


def make_decode_fn(vae, scaling_factor: float, shift_factor: float,
                   config: ModelConfig = ModelConfig()) -> Callable:
  """decode(params, latents [B,H,W,C]) -> images in [0, 1]: VAE.decode(latents / scaling +
  shift), as StableDiffusion3Pipeline / FluxPipeline decode."""
  decode = apply.make_decode_fn(vae, 1.0, config)

  def flow_decode(params, latents):
    return decode(params, latents / scaling_factor + shift_factor)

  return flow_decode


def make_encode_fn(vae, scaling_factor: float, shift_factor: float,
                   config: ModelConfig = ModelConfig()) -> Callable:
  """encode(params, images [B,h,w,3] in [0, 1], key=None) -> (z - shift) * scaling (the
  posterior mean, a sample with ``key``): the latents an Euler inversion starts from."""
  encode = apply.make_encode_fn(vae, 1.0, config)

  def flow_encode(params, images, key=None):
    return (encode(params, images, key) - shift_factor) * scaling_factor

  return flow_encode
