"""The tiny random Stable Diffusion (tests, smoke runs): configs, tokenizer and ``build_tiny``."""
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
from disentangle_jax.models.bundle import StableDiffusion
from disentangle_jax.models.config import ModelConfig, compute_dtype

# Words that get whole-word BPE merges in the tiny tokenizer.
_TINY_WORDS = ("a", "photo", "of", "person", "face", "smiling", "church", "the", "style", "lake")


def tiny_unet_config(latent_size: int = 8) -> dict:
  """diffusers config of the tiny UNet (valid for the Flax and the PyTorch class)."""
  return {
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


def tiny_vae_config(image_size: int = 64) -> dict:
  """diffusers config of the tiny VAE: 4 blocks, so the scale factor is 8 as in SD."""
  return {
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


def tiny_text_config(tokenizer) -> dict:
  """transformers CLIPTextConfig dict of the tiny text encoder, sized to ``tokenizer``."""
  return {
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
def build_tiny(config: ModelConfig = ModelConfig()) -> StableDiffusion:
  """A tiny random Stable Diffusion, deterministic in ``config.tiny_seed``; no files read.

  UNet: channels (32, 64), 1 layer per block, cross-attention width 32, 8 heads. VAE: 4 blocks
  of (8, 8, 16, 16) channels (scale factor 8), 4 latent channels. Text encoder: CLIP with width
  32, 2 layers, 4 heads, 77 positions, the tiny tokenizer's vocabulary.
  """
  dtype = compute_dtype(config)
  tokenizer = _tiny_tokenizer()
  unet = build_unet(tiny_unet_config(config.tiny_latent_size), config, "tiny unet")
  vae_cfg = tiny_vae_config(config.tiny_latent_size * 8)
  vae = build_vae(vae_cfg, config)
  text_encoder = build_text_encoder(tiny_text_config(tokenizer), config)
  trees = shape_trees(unet, vae, text_encoder)
  params = {name: noise.random_params(tree, [config.tiny_seed, i])
            for i, (name, tree) in enumerate(sorted(trees.items()))}
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
      params={k: to_device(v, dtype) for k, v in params.items()},
      schedule=schedule_lib.ScheduleConfig(),
      latent_channels=4, latent_size=config.tiny_latent_size,
      vae_scale_factor=vae_scale_factor(vae_cfg), scaling_factor=SD_SCALING_FACTOR,
      config=config)
