"""Test helper: diffusers-layout PyTorch state dicts -> one CompVis/LDM single-file state dict.

The inverse of the LDM -> diffusers mapping of diffusers' single-file loader
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``), written independently of
``disentangle_jax.single_file`` so that a test compares two separate implementations; diffusers'
own ``from_single_file`` reading the written file proves the layout is the real one.

Only SD v1.x-style models: every down/up block has ``layers_per_block`` (+1 for up blocks)
resnets, cross-attention blocks have one transformer, the VAE's mid attention is stored as 1x1
convolutions (as in the original release).
"""
from __future__ import annotations

import re

import numpy as np

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
# Buffers of the original LatentDiffusion module that real files carry beside the weights.
_LDM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                "posterior_mean_coef2")


def _resnet(rest: str) -> str:
  module, _, leaf = rest.partition(".")
  for diffusers_name, ldm_name in _UNET_RESNET:
    if module == diffusers_name:
      return f"{ldm_name}.{leaf}"
  raise KeyError(rest)


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
  """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
  n = layers_per_block
  out = {}
  for key, value in state.items():
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
      new = f"{_UNET_TOP[module]}.{leaf}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
      new = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0.{_resnet(m[3])}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
      new = f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
      new = f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
      new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
      new = f"middle_block.1.{m[1]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
      new = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.0.{_resnet(m[3])}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
      new = f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1.{m[3]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
      has_attention = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state)
      new = f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if has_attention else 1}.conv.{m[2]}"
    else:
      raise KeyError(f"no LDM name for UNet key {key!r}")
    out["model.diffusion_model." + new] = value
  return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
  """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys (1x1-conv attention)."""
  out = {}
  for key, value in state.items():
    new = key.replace("conv_norm_out", "norm_out")
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.",
                 new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", new)
    new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
    new = new.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
      new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
      if m[3] == "weight" and m[2] != "group_norm":
        value = value[:, :, None, None]  # linear [O, I] -> 1x1 conv [O, I, 1, 1]
    out["first_stage_model." + new] = value
  return out


def text_to_ldm(state: dict) -> dict:
  """transformers CLIPTextModel state dict -> ``cond_stage_model.transformer.*`` keys."""
  return {"cond_stage_model.transformer." + k: v for k, v in state.items()}


def to_ldm(unet, vae, text_encoder, alphas_cumprod=None) -> dict[str, np.ndarray]:
  """The three PyTorch modules as one LDM single-file state dict of numpy arrays.

  Adds the DDPM buffers that real files carry (``alphas_cumprod`` etc.; zeros except
  ``alphas_cumprod`` when given), so a loader must know to skip them.
  """
  def numpy(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
  state = {}
  state.update(unet_to_ldm(numpy(unet), unet.config.layers_per_block))
  state.update(vae_to_ldm(numpy(vae), len(vae.config.block_out_channels)))
  state.update(text_to_ldm(numpy(text_encoder)))
  for name in _LDM_BUFFERS:
    state[name] = np.zeros(1000, np.float32)
  if alphas_cumprod is not None:
    state["alphas_cumprod"] = np.asarray(alphas_cumprod, np.float32)
  return {k: np.ascontiguousarray(v) for k, v in state.items()}
