"""The toy world's models: Stable Diffusion v1 families at toy size, and their files.

Same classes as the real thing (diffusers ``FlaxUNet2DConditionModel`` / ``FlaxAutoencoderKL``,
transformers ``FlaxCLIPTextModel`` / ``FlaxCLIPModel``, ``CLIPTokenizer``), sized for 32 px
scenes: the VAE downsamples by 4 (latents [8, 8, 4]), the UNet by 4, the text encoder reads 16
tokens of a word-level vocabulary (every caption word is one BPE token). Saved in the layouts
real weights use, so ``models.load`` (``model.path``) and ``loss_models.load_clip``
(``loss_models.clip_path``) read them unchanged.

Folder of a trained world (``WEIGHTS_DIR`` ships one):
  sd/      diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
  clip/    Hugging Face CLIP layout (config.json, flax_model.msgpack, tokenizer files)
  judge/   the judge classifier (config.json, judge.msgpack)
  vgg/     the perceptual network, VGG16-shaped, torchvision layout (vgg.safetensors)
  made.json  how the weights were made (command, seed, commit, time, final losses)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any, NamedTuple

import jax
import numpy as np
import transformers

from disentangle_jax import models, schedule
from disentangle_jax.toy import perceptual, scenes

# The shipped weights, and the command that rebuilds them.
WEIGHTS_DIR = str(pathlib.Path(__file__).resolve().parent / "weights")
REBUILD = ("python -m launch.train_toy --config=configs/train_toy.py --workdir=WORKDIR, then "
           "copy WORKDIR/world to disentangle_jax/toy/weights")
SD_DIR, CLIP_DIR, JUDGE_DIR, VGG_DIR, MADE_FILE = "sd", "clip", "judge", "vgg", "made.json"
VGG_FILE = perceptual.FILE

MAX_TOKENS = 16  # context length of both text towers (the longest caption has 15 with bos/eos)
LATENT_CHANNELS = 4


def words() -> tuple[str, ...]:
  """Every word of every caption (each becomes one token)."""
  seen = []
  for text in scenes.all_captions():
    for w in text.replace(",", " ").split():
      if w not in seen:
        seen.append(w)
  return tuple(seen)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Widths of the toy networks (configs/train_toy.py, section `sizes`)."""

  unet_channels: tuple[int, ...] = (32, 64, 64)  # UNet block widths (multiples of 32: GroupNorm(32))
  unet_heads: int = 4  # attention heads in the UNet
  vae_channels: tuple[int, ...] = (16, 32, 32)  # VAE block widths; 3 blocks = downsampling 4
  vae_groups: int = 8  # GroupNorm groups of the VAE
  clip_width: int = 64  # toy CLIP tower widths (its text tower is SD's text encoder)
  clip_layers: int = 2  # toy CLIP layers per tower
  clip_patch: int = 4  # toy CLIP vision patch size (32 px / 4 = 8 x 8 patches)
  clip_projection: int = 32  # toy CLIP embedding width


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
  """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none applies."""
  while len(symbols) > 1:
    pairs = [(ranks.get(p, len(ranks) + 1), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
    rank, i = min(pairs)
    if rank > len(ranks):
      break
    symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
  return symbols


def merges() -> list[tuple[str, str]]:
  """BPE merges that make every caption word one token: each word is first encoded with the
  merges so far, then its remaining symbols are merged left to right (new merges rank last, so
  earlier words still encode the same)."""
  out: list[tuple[str, str]] = []
  for word in words():
    symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], {m: r for r, m in enumerate(out)})
    while len(symbols) > 1:
      out.append((symbols[0], symbols[1]))
      symbols = [symbols[0] + symbols[1]] + symbols[2:]
  return out


def write_tokenizer(directory) -> None:
  models.write_tiny_tokenizer(directory, merges(), MAX_TOKENS)


def tokenizer():
  with tempfile.TemporaryDirectory() as tmp:
    write_tokenizer(tmp)
    return transformers.CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def unet_config(sizes: Sizes, latent_size: int) -> dict:
  n = len(sizes.unet_channels)
  return {
      "sample_size": latent_size, "in_channels": LATENT_CHANNELS,
      "out_channels": LATENT_CHANNELS,
      "down_block_types": ["CrossAttnDownBlock2D"] * n,
      "up_block_types": ["CrossAttnUpBlock2D"] * n,
      "block_out_channels": list(sizes.unet_channels), "layers_per_block": 1,
      "attention_head_dim": sizes.unet_heads, "cross_attention_dim": sizes.clip_width,
      "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
  }


def vae_config(sizes: Sizes, image_size: int, scaling_factor: float = 1.0) -> dict:
  n = len(sizes.vae_channels)
  return {
      "sample_size": image_size, "in_channels": 3, "out_channels": 3,
      "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(sizes.vae_channels), "layers_per_block": 1,
      "latent_channels": LATENT_CHANNELS, "norm_num_groups": sizes.vae_groups, "act_fn": "silu",
      "scaling_factor": scaling_factor,
  }


def _text_common(tok, width: int, layers: int) -> dict:
  return {"vocab_size": len(tok), "hidden_size": width, "intermediate_size": 2 * width,
          "num_hidden_layers": layers, "num_attention_heads": 4,
          "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu",
          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id}


def text_config(sizes: Sizes, tok) -> dict:
  """SD's text encoder: the toy CLIP's text tower (as SD v1's is CLIP ViT-L/14's)."""
  return dict(_text_common(tok, sizes.clip_width, sizes.clip_layers),
              projection_dim=sizes.clip_width)


def clip_config(sizes: Sizes, tok, image_size: int) -> transformers.CLIPConfig:
  text = _text_common(tok, sizes.clip_width, sizes.clip_layers)
  vision = {"hidden_size": sizes.clip_width, "intermediate_size": 2 * sizes.clip_width,
            "num_hidden_layers": sizes.clip_layers, "num_attention_heads": 4,
            "image_size": image_size, "patch_size": sizes.clip_patch, "hidden_act": "quick_gelu"}
  return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=sizes.clip_projection)


def build_sd(sizes: Sizes, image_size: int, scaling_factor: float, params: dict,
             tok=None) -> models.StableDiffusion:
  """A models.StableDiffusion of the toy sizes holding ``params`` (unet, vae, text_encoder)."""
  tok = tok or tokenizer()
  mc = models.ModelConfig()
  factor = 2 ** (len(sizes.vae_channels) - 1)
  vae_cfg = vae_config(sizes, image_size, scaling_factor)
  return models.StableDiffusion(
      unet=models.build_unet(unet_config(sizes, image_size // factor), mc, "toy unet"),
      vae=models.build_vae(vae_cfg, mc),
      text_encoder=models.build_text_encoder(text_config(sizes, tok), mc),
      tokenizer=tok, params=params, schedule=schedule.ScheduleConfig(),
      latent_channels=LATENT_CHANNELS, latent_size=image_size // factor,
      vae_scale_factor=factor, scaling_factor=scaling_factor)


def save_clip(directory, config: transformers.CLIPConfig, params) -> None:
  """Hugging Face CLIP layout: config.json, flax_model.msgpack and the tokenizer files."""
  directory = pathlib.Path(directory)
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  model.save_pretrained(directory, params=jax.device_get(params))
  write_tokenizer(directory)


def missing_files(root: str) -> list[str]:
  """The files of a trained world that are absent under ``root`` (empty = complete)."""
  need = [os.path.join(SD_DIR, p) for p in (
      "model_index.json", "unet/config.json", "unet/diffusion_flax_model.msgpack",
      "vae/config.json", "vae/diffusion_flax_model.msgpack", "text_encoder/config.json",
      "text_encoder/flax_model.msgpack", "tokenizer/vocab.json", "tokenizer/merges.txt")]
  need += [os.path.join(CLIP_DIR, p) for p in ("config.json", "flax_model.msgpack",
                                               "vocab.json", "merges.txt")]
  need += [os.path.join(JUDGE_DIR, p) for p in ("config.json", "judge.msgpack")]
  need += [os.path.join(VGG_DIR, VGG_FILE)]
  return [p for p in need if not os.path.isfile(os.path.join(root, p))]


def check_world(root: str) -> None:
  """Raises FileNotFoundError naming the first missing file and how to rebuild the world."""
  missing = missing_files(root)
  if missing:
    raise FileNotFoundError(
        f"toy world weights {os.path.join(root, missing[0])} are missing"
        f"{f' (and {len(missing) - 1} more files)' if len(missing) > 1 else ''}; rebuild them "
        f"with {REBUILD}.")


def read_made(root: str) -> dict:
  path = os.path.join(root, MADE_FILE)
  return json.loads(pathlib.Path(path).read_text()) if os.path.isfile(path) else {}


def caption_ids(tok, captions) -> np.ndarray:
  return models.tokenize(tok, list(captions))


class ToyWorld(NamedTuple):
  """A loaded world: the SD model, the loss networks (toy CLIP + the world's VGG), the judge."""

  sd: models.StableDiffusion
  loss_models: Any
  judge_config: Any
  judge_params: dict
  root: str


def load(root: str = WEIGHTS_DIR) -> ToyWorld:
  """Loads a trained world folder through the project's loaders (models.load, load_clip).

  A missing or unreadable file is one FileNotFoundError / ValueError naming it and the
  command that rebuilds the world.
  """
  from disentangle_jax import loss_models  # noqa: PLC0415
  from disentangle_jax.toy import judge  # noqa: PLC0415
  check_world(root)
  hint = f"rebuild the toy world with {REBUILD}."
  try:
    sd = models.load(models.ModelConfig(path=os.path.join(root, SD_DIR)))
    lm = loss_models.load_loss_models(loss_model_config(root), sd.tokenizer)
  except (ValueError, OSError) as e:
    raise ValueError(f"toy world {root}: {e} To {hint}") from None
  judge_config, judge_params = judge.load(os.path.join(root, JUDGE_DIR), hint)
  return ToyWorld(sd, lm, judge_config, judge_params, root)


def loss_model_config(root: str = WEIGHTS_DIR):
  """The world's loss networks: its CLIP and its trained VGG16-shaped network (read at the
  world's image size)."""
  from disentangle_jax import loss_models  # noqa: PLC0415
  return loss_models.LossModelConfig(clip_path=os.path.join(root, CLIP_DIR),
                                     vgg_path=os.path.join(root, VGG_DIR, VGG_FILE),
                                     vgg_input_size=scenes.IMAGE_SIZE)


def world_root(path) -> str | None:
  """The world folder that ``path`` (a model.path or clip_path) is part of, if any."""
  if not path:
    return None
  parent = os.path.dirname(os.path.normpath(os.path.abspath(os.path.expanduser(path))))
  if parent == os.path.normpath(WEIGHTS_DIR) or os.path.isfile(os.path.join(parent, MADE_FILE)):
    return parent
  return None


@contextlib.contextmanager
def rebuild_hint(path):
  """Around loading ``path``: if it belongs to a toy world, a missing file is reported up
  front and any loading error names how to rebuild the world (one message, same type)."""
  root = world_root(path)
  if root is None:
    yield
    return
  check_world(root)
  try:
    yield
  except (ValueError, OSError) as e:
    raise type(e)(f"{e} To rebuild the toy world: {REBUILD}.") from None
