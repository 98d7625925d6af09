"""The tiny random Stable Diffusion (tests, smoke runs): configs, tokenizer and ``build_tiny``.

One tiny variant per family (``family``: "sd1", "sd2", "sdxl"), each with its family's
structure: SD 2.x's linear projections, per-block head counts, GELU text encoder and
v-prediction (as SD 2.1); SDXL's two text encoders (the second with a pooled projection),
transformer depth per block and text_time micro-conditioning.
"""
from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Sequence

import transformers
from transformers.models.clip import tokenization_clip

from disentangle_jax import library_logs, noise
from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models.build import (FLAX_UNET_GROUPS, SD_MAX_LENGTH, SD_SCALING_FACTOR,
                                          build_text_encoder, build_unet, build_vae, shape_trees,
                                          to_device, vae_scale_factor)
from disentangle_jax.models import family as family_lib
from disentangle_jax.models.bundle import StableDiffusion
from disentangle_jax.models.config import ModelConfig, compute_dtype

# Words that get whole-word BPE merges in the tiny tokenizer.
_TINY_WORDS = ("a", "photo", "of", "person", "face", "smiling", "church", "the", "style", "lake")


# SDXL's tiny text encoders: widths of the two (their token embeddings are concatenated) and
# the second one's pooled projection; the time ids' embedding width.
_XL_WIDTHS = (32, 48)
_XL_POOLED = 32
_XL_TIME_DIM = 8


def tiny_unet_config(latent_size: int = 8, family: str = "sd1") -> dict:
  """diffusers config of the tiny UNet (valid for the Flax and the PyTorch class)."""
  cfg = {
      "sample_size": latent_size,
      "in_channels": 4,
      "out_channels": 4,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "block_out_channels": [32, 64],
      "layers_per_block": 1,
      "attention_head_dim": 8,  # the number of heads, as in SD v1's config
      "cross_attention_dim": 32,
      "norm_num_groups": FLAX_UNET_GROUPS,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
  }
  if family == "sd2":
    cfg.update(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True)
  elif family == "sdxl":
    cfg.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
               attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
               cross_attention_dim=sum(_XL_WIDTHS), use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=_XL_TIME_DIM,
               projection_class_embeddings_input_dim=(
                   family_lib.NUM_TIME_IDS * _XL_TIME_DIM + _XL_POOLED))
  return cfg


def tiny_vae_config(image_size: int = 64, family: str = "sd1") -> dict:
  """diffusers config of the tiny VAE: 4 blocks, so the scale factor is 8 as in SD."""
  cfg = {
      "sample_size": image_size,
      "in_channels": 3,
      "out_channels": 3,
      "down_block_types": ["DownEncoderBlock2D"] * 4,
      "up_block_types": ["UpDecoderBlock2D"] * 4,
      "block_out_channels": [8, 8, 16, 16],
      "layers_per_block": 1,
      "latent_channels": 4,
      "norm_num_groups": 4,
      "act_fn": "silu",
      "scaling_factor": SD_SCALING_FACTOR,
  }
  if family == "sdxl":
    cfg.update(scaling_factor=0.13025, force_upcast=True)  # SDXL's latent scale
  return cfg


def tiny_text_config(tokenizer, family: str = "sd1", index: int = 0) -> dict:
  """transformers CLIPTextConfig dict of the tiny text encoder ``index`` (SDXL: 0 or 1), sized
  to ``tokenizer``."""
  cfg = {
      "vocab_size": len(tokenizer),
      "hidden_size": 32,
      "intermediate_size": 37,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": SD_MAX_LENGTH,
      "hidden_act": "quick_gelu",
      "layer_norm_eps": 1e-5,
      "projection_dim": 32,
      "bos_token_id": tokenizer.bos_token_id,
      "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
  }
  if family == "sd2":
    cfg.update(hidden_act="gelu")  # OpenCLIP-H stored as CLIPTextModel
  elif family == "sdxl":
    width = _XL_WIDTHS[index]
    cfg.update(hidden_size=width, intermediate_size=width + 5, projection_dim=_XL_POOLED,
               hidden_act="quick_gelu" if index == 0 else "gelu")
  return cfg


def tiny_folder_configs(family: str = "sd1") -> tuple[dict, dict]:
  """(model_index.json, scheduler/scheduler_config.json) of a ``family`` folder in diffusers
  layout, as the real checkpoints ship them (SD 2.x: SD 2.1's v-prediction DDIM; SDXL base:
  its Euler config, whose schedule DDIM / PLMS sample)."""
  scheduler = {
      "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
      "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
      "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
      "prediction_type": "epsilon", "timestep_spacing": "leading"}
  index = {"_class_name": "StableDiffusionPipeline",
           "unet": ["diffusers", "UNet2DConditionModel"],
           "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"]}
  if family == "sd2":
    scheduler.update(_class_name="DDIMScheduler", prediction_type="v_prediction")
  elif family == "sdxl":
    scheduler.update(_class_name="EulerDiscreteScheduler", interpolation_type="linear",
                     use_karras_sigmas=False)
    index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"])
  index["scheduler"] = ["diffusers", scheduler["_class_name"]]
  return index, scheduler

def _tiny_merges() -> list[tuple[str, str]]:
  """Left-to-right merges that make each of _TINY_WORDS a single token."""
  merges = []
  for word in _TINY_WORDS:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pair = (symbols[0], symbols[1])
      if pair not in merges:
        merges.append(pair)
      symbols = ["".join(pair)] + symbols[2:]
  return merges


def write_tiny_tokenizer(directory, merges: Sequence[tuple[str, str]] | None = None,
                         max_length: int = SD_MAX_LENGTH) -> None:
  """Writes the tiny byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

  The vocabulary has CLIP's layout: the 256 byte symbols, the same with "</w>", one token per
  merge, then <|startoftext|> and <|endoftext|>. ``CLIPTokenizer.from_pretrained(directory)``
  loads it offline. ``merges`` replaces the tiny words' merges (the toy world's vocabulary);
  ``max_length`` is the context length written to tokenizer_config.json.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  symbols = list(tokenization_clip.bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = _tiny_merges() if merges is None else list(merges)
  vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  (directory / "vocab.json").write_text(
      json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": max_length,
      "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>",
  }, indent=2))


def _tiny_tokenizer():
  with tempfile.TemporaryDirectory() as tmp:
    write_tiny_tokenizer(tmp)
    return transformers.CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


@library_logs.quietly
def tiny_unet_and_vae(config: ModelConfig) -> tuple:
  """The tiny model's UNet and VAE modules (no weights) and the VAE's config dict."""
  name = config.tiny_family or "sd1"
  unet = build_unet(tiny_unet_config(config.tiny_latent_size, name), config, "tiny unet")
  vae_cfg = tiny_vae_config(config.tiny_latent_size * 8, name)
  vae = build_vae(vae_cfg, config, upcast=family_lib.FAMILIES[name].vae_float32)
  return unet, vae, vae_cfg


def build_tiny(config: ModelConfig = ModelConfig()) -> StableDiffusion:
  """A tiny random Stable Diffusion of family ``config.tiny_family`` ("" = SD 1.x layout),
  deterministic in ``config.tiny_seed``; no files read.

  UNet: channels (32, 64), 1 layer per block, cross-attention width 32, 8 heads. VAE: 4 blocks
  of (8, 8, 16, 16) channels (scale factor 8), 4 latent channels. Text encoder: CLIP with width
  32, 2 layers, 4 heads, 77 positions, the tiny tokenizer's vocabulary. The SD 2.x / SDXL
  variants change what their family changes (module docstring).
  """
  name = config.tiny_family or "sd1"
  fam = family_lib.FAMILIES[name]
  dtype = compute_dtype(config)
  tokenizer = _tiny_tokenizer()
  unet, vae, vae_cfg = tiny_unet_and_vae(config)
  encoders = [build_text_encoder(tiny_text_config(tokenizer, name, i), config,
                                 projection=fam.pooled and i == len(fam.text_encoders) - 1)
              for i in range(len(fam.text_encoders))]
  trees = shape_trees(unet, vae, *encoders)
  params = {name: noise.random_params(tree, [config.tiny_seed, i])
            for i, (name, tree) in enumerate(sorted(trees.items()))}
  params = {k: to_device(v, vae.dtype if k == "vae" else dtype) for k, v in params.items()}
  schedule = schedule_lib.ScheduleConfig.from_diffusers_config(tiny_folder_configs(name)[1])
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, params=params,
      schedule=schedule, latent_channels=4, latent_size=config.tiny_latent_size,
      vae_scale_factor=vae_scale_factor(vae_cfg), scaling_factor=vae_cfg["scaling_factor"],
      config=config, family=fam, text_encoder_2=encoders[1] if fam.pooled else None,
      tokenizer_2=tokenizer if fam.pooled else None)
