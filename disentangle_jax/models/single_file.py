"""Single-file Stable Diffusion checkpoints (the CompVis/LDM layout) -> a StableDiffusion.

The original release ships ``sd-v1-4.ckpt``, and most fine-tuned community models are single
``.safetensors`` files in the same layout: one flat state dict with the UNet under
``model.diffusion_model.*``, the VAE under ``first_stage_model.*`` and the CLIP text encoder
under ``cond_stage_model.transformer.*`` (plus DDPM buffers such as ``alphas_cumprod``). This
module and ``ldm_keys`` (pure numpy) do four things:

  ``read``: the file -> {name: array}. ``.safetensors`` is read without torch; ``.ckpt`` is a
    pickle and is read only when the caller allows pickle, without torch, by a restricted
    unpickler that never imports or calls the objects the trainer saved beside the weights
    (``torch_pickle``: Lightning callbacks, numpy scalars, optimizer states stay inert).
  ``detect_family``: refuses by name what is not an SD v1.x text-to-image checkpoint (SD 2.x,
    SDXL base or refiner, inpainting, instruct-pix2pix, upscaler, ControlNet, a diffusers-layout
    component file, a file without VAE or text encoder, unknown).
  ``split``: renames the keys to the diffusers / transformers names of each component, as
    diffusers' single-file loader does (``diffusers.loaders.single_file_utils``:
    ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` including the VAE
    attention's 1x1 convolutions -> linear weights, ``convert_ldm_clip_checkpoint``). The result
    goes through ``convert.torch_to_flax`` like any diffusers-layout PyTorch file.
  ``load``: all of it, plus the tokenizer folder -> a StableDiffusion.

The architecture. A single file carries weights, not a config. Everything that shapes reveal is
read from the shapes (as diffusers' loader does for some fields): UNet in/out channels, block
channels, layers per block, which blocks have cross-attention, the cross-attention width; VAE
channels, layers, latent channels; text encoder width, depth, MLP width, vocabulary and
positions. What shapes cannot reveal (UNet head count, GroupNorm groups, activations, norm
epsilons, sample size, VAE scaling factor, the noise schedule) comes from a base config: SD
v1.x's standard one (``SD_V1_CONFIGS``, the ``stable-diffusion-v1-5`` folder's config files),
or, when given, a diffusers-layout folder without weights (``model.config_path``: its
unet/config.json, vae/config.json, text_encoder/config.json and scheduler/scheduler_config.json).
So a real SD v1.x file needs nothing but itself and a tokenizer, and a small or unusual
SD-v1-like file (the tests' tiny models) loads with the folder that describes its other fields.

Tokenizer: a single file has none; the caller names a folder with vocab.json and merges.txt.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re

import numpy as np
import safetensors
import safetensors.numpy

from disentangle_jax import convert
from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models import ldm_keys, torch_pickle
from disentangle_jax.models.build import (SD_SCALING_FACTOR, build_text_encoder, build_unet,
                                          build_vae, shape_trees, to_device, vae_scale_factor)
from disentangle_jax.models.bundle import StableDiffusion
from disentangle_jax.models.config import ModelConfig, compute_dtype
from disentangle_jax.models.folder import load_tokenizer, read_json
from disentangle_jax.models.ldm_keys import FIX_FILE, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

SUFFIXES = (".safetensors", ".ckpt")

logger = logging.getLogger(__name__)


def is_single_file(path) -> bool:
  """True if ``path`` names a file (existing or not) with a single-file checkpoint suffix."""
  return pathlib.Path(path).suffix.lower() in SUFFIXES


def read(path: pathlib.Path, allow_pickle: bool) -> dict[str, np.ndarray]:
  """The file's flat state dict {name: numpy array}.

  Args:
    path: a ``.safetensors`` or ``.ckpt`` file.
    allow_pickle: whether a ``.ckpt`` (pickle) may be read (no torch needed; nothing in it runs).

  Raises:
    FileNotFoundError: ``path`` does not exist. ValueError: another suffix, a ``.ckpt`` without
    ``allow_pickle``, or a file that cannot be read (truncated, not a checkpoint).
  """
  if not path.is_file():
    raise FileNotFoundError(f"model.path={str(path)!r} does not exist. {FIX_FILE}")
  suffix = path.suffix.lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"model.path={str(path)!r} is a file but not a single-file checkpoint "
                     f"(one of {SUFFIXES}). {FIX_FILE}")
  if suffix == ".ckpt" and not allow_pickle:
    raise ValueError(
        f"{path} is a PyTorch pickle (.ckpt); it is refused unless you allow it, because a "
        "pickle can name code to run. Convert it to .safetensors, or set "
        "--config.model.allow_pickle=True: the file is then read by a restricted unpickler "
        "that runs none of its code (only its tensors are read).")
  try:
    if suffix == ".safetensors":
      state = safetensors.numpy.load_file(str(path))
    else:
      state = _read_ckpt(path)
  except torch_pickle.NotATorchZip:
    raise ValueError(f"{path} is not a torch.save zip archive (a .ckpt of torch < 1.6, or not a "
                     "checkpoint); convert it to .safetensors with a tool you trust.") from None
  except Exception as e:  # pylint: disable=broad-except  # any reader's error: one message
    raise ValueError(f"{path} could not be read as {suffix[1:]} ({type(e).__name__}: "
                     f"{_one_line(e)}); is the file complete? Download or convert it "
                     "again.") from None
  if not state:
    raise ValueError(f"{path} holds no weights. {FIX_FILE}")
  return state


def _read_ckpt(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The weights of a torch.save file: its (nested) "state_dict", else its top-level tensors.
  The other objects in it (Lightning callbacks, numpy scalars, ...) are never run."""
  state, unknown = torch_pickle.load(path)
  while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints
    state = state["state_dict"]
  if unknown:
    logger.info("%s: %d Python object(s) besides the weights were skipped, not run: %s", path,
                len(set(unknown)), ", ".join(sorted(set(unknown))))
  return torch_pickle.arrays(state)


def _one_line(error: Exception) -> str:
  """The error's text on one line, without terminal colour codes (never cut: a cut message
  could end inside the name of the object or file it is about)."""
  return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())




def detect_family(state: dict, source: str) -> None:
  """Returns if ``state`` is an SD v1.x text-to-image checkpoint; else raises naming what it is.

  Decided from key names and shapes, with the markers of diffusers'
  ``infer_diffusers_model_type``. Raises ValueError naming ``source``, the family found and
  the fix.
  """
  def refuse(what: str):
    raise ValueError(
        f"{source} is {what}, not a Stable Diffusion v1.x text-to-image checkpoint; this loader "
        f"reads SD v1.x only (other families are not supported yet). {FIX_FILE}")

  conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
  if ldm_keys.has_prefix(state, "conditioner.embedders."):
    if "conditioner.embedders.0.model.text_projection" in state:
      refuse("an SDXL refiner checkpoint")
    refuse("an SDXL checkpoint")
  if (ldm_keys.has_prefix(state, "control_model.")
      or ldm_keys.has_prefix(state, "controlnet_cond_embedding.")):
    refuse("a ControlNet checkpoint")
  if conv_in is None:
    if ldm_keys.has_prefix(state, UNET_PREFIX):
      refuse("a checkpoint of another architecture (no UNet conv_in "
             "model.diffusion_model.input_blocks.0.0.weight: SD3, Flux or another transformer?)")
    if (ldm_keys.has_prefix(state, "down_blocks.") or "conv_in.weight" in state
        or ldm_keys.has_prefix(state, "text_model.")):
      refuse("a single component in diffusers/transformers layout (no "
             "model.diffusion_model.* keys); load the diffusers folder it came from instead")
    if ldm_keys.has_prefix(state, "encoder.down.") or ldm_keys.has_prefix(state, "decoder.up."):
      refuse("a VAE-only file")
    refuse("not a checkpoint in the CompVis/LDM layout (no model.diffusion_model.* keys)")
  if ldm_keys.has_prefix(state, "cond_stage_model.model."):
    refuse("an SD 2.x checkpoint (OpenCLIP text encoder)")
  if ldm_keys.has_prefix(state, UNET_PREFIX + "label_emb."):
    refuse("a class- or image-conditioned UNet (label_emb: an upscaler or unCLIP checkpoint)")
  ldm_keys.check_ndim(state, UNET_PREFIX + "input_blocks.0.0.weight", 4, source)
  in_channels = conv_in.shape[1]
  if in_channels == 9:
    refuse("an inpainting checkpoint (9 UNet input channels)")
  if in_channels == 8:
    refuse("an instruct-pix2pix checkpoint (8 UNet input channels)")
  if in_channels != 4:
    refuse(f"a checkpoint whose UNet takes {in_channels} input channels (SD v1.x takes 4)")
  proj_in = [v for k, v in state.items()
             if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
  if any(v.ndim == 2 for v in proj_in):
    refuse("an SD 2.x checkpoint (linear transformer projections)")
  to_k = [k for k in state if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight")]
  for key in to_k:
    ldm_keys.check_ndim(state, key, 2, source)
  if to_k and state[to_k[0]].shape[1] == 1024:
    refuse("an SD 2.x checkpoint (1024-wide cross-attention)")
  if not ldm_keys.has_prefix(state, VAE_PREFIX):
    refuse("a checkpoint without VAE weights (no first_stage_model.* keys)")
  if not ldm_keys.has_prefix(state, TEXT_PREFIX):
    refuse("a checkpoint without a CLIP text encoder (no cond_stage_model.transformer.* keys)")




def _check_sd_v1_shapes(configs: dict, source: str) -> None:
  """Without model.config_path, the fields read from the shapes must be SD v1.x's: the fields
  shapes cannot reveal (head counts, norm groups, ...) are then SD v1.x's too. A file of other
  widths would otherwise run with SD v1.x's head counts (a 48-wide text encoder with 12 heads
  instead of its own 4): refused, naming the fields."""
  differ = []
  for name in ("unet", "vae", "text_encoder"):
    standard = ldm_keys.SD_V1_CONFIGS[name]
    differ += [f"{name} {key}={value!r} (SD v1.x: {standard.get(key)!r})"
               for key, value in configs[name].items() if value != standard.get(key)]
  if differ:
    raise ValueError(
        f"{source} has other shapes than SD v1.x ({'; '.join(differ)}), so its head counts, "
        "norm groups and other fields that shapes do not reveal are unknown: set "
        "--config.model.config_path to a diffusers-layout folder whose unet/, vae/ and "
        "text_encoder/ config.json describe this model (its weights are not needed).")


def _base_configs(config: ModelConfig) -> dict:
  """The configs whose non-shape fields a single file uses (see single_file's docstring)."""
  if config.config_path is None:
    return ldm_keys.SD_V1_CONFIGS
  root = pathlib.Path(os.path.expanduser(config.config_path))
  if not root.is_dir():
    raise FileNotFoundError(f"model.config_path={config.config_path!r} is not a directory: give "
                            "a diffusers-layout folder (unet/, vae/, text_encoder/ config.json; "
                            "weights not needed), or unset it for SD v1's standard config.")
  base = {name: read_json(root / name / "config.json")
          for name in ("unet", "vae", "text_encoder")}
  if base["text_encoder"].get("model_type") == "clip" and "text_config" in base["text_encoder"]:
    base["text_encoder"] = base["text_encoder"]["text_config"]
  scheduler_file = root / "scheduler" / "scheduler_config.json"
  base["scheduler"] = (read_json(scheduler_file) if scheduler_file.is_file()
                       else ldm_keys.SD_V1_CONFIGS["scheduler"])
  return base


def load(config: ModelConfig) -> StableDiffusion:
  """The single file at ``config.path`` -> the same model as its diffusers folder."""
  path = pathlib.Path(os.path.expanduser(config.path))
  if config.tokenizer_path is None:  # checked first: before reading gigabytes
    raise ValueError(
        f"model.path={config.path!r} is a single-file checkpoint, which holds no tokenizer: set "
        "--config.model.tokenizer_path to a folder with vocab.json and merges.txt (SD v1.x uses "
        "CLIP ViT-L/14's tokenizer, e.g. the tokenizer/ folder of any SD v1.x diffusers "
        "checkpoint).")
  tokenizer_dir = pathlib.Path(os.path.expanduser(config.tokenizer_path))
  if not tokenizer_dir.is_dir():
    raise FileNotFoundError(f"model.tokenizer_path={config.tokenizer_path!r} is not a directory: "
                            "give a folder with vocab.json and merges.txt.")
  dtype = compute_dtype(config)
  base = _base_configs(config)
  state = read(path, config.allow_pickle)
  source = str(path)
  detect_family(state, source)
  cfgs = ldm_keys.infer_configs(state, base, source)
  if config.config_path is None:
    _check_sd_v1_shapes(cfgs, source)
  schedule = schedule_lib.ScheduleConfig.from_diffusers_config(cfgs["scheduler"])
  unet = build_unet(cfgs["unet"], config, source)
  vae = build_vae(cfgs["vae"], config)
  text_encoder = build_text_encoder(cfgs["text_encoder"], config)
  if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
    raise ValueError(f"{path}: the UNet's cross-attention width {unet.config.cross_attention_dim} "
                     f"differs from the text encoder's width {text_encoder.config.hidden_size}: "
                     "the file mixes components of different models.")
  tokenizer = load_tokenizer(tokenizer_dir, text_encoder.config.max_position_embeddings)
  if len(tokenizer) > text_encoder.config.vocab_size:
    raise ValueError(f"model.tokenizer_path={config.tokenizer_path!r} has {len(tokenizer)} "
                     f"tokens but {path} embeds {text_encoder.config.vocab_size}: it is not this "
                     "model's tokenizer.")
  origins = {}
  parts = ldm_keys.split(state, unet.config.layers_per_block,
                         len(vae.config.block_out_channels), source, origins)
  del state
  trees = shape_trees(unet, vae, text_encoder)
  fix = (f"the file does not fit the configs of model.config_path={config.config_path!r}."
         if config.config_path else "the file is damaged or is not SD v1.x.")
  params = {name: to_device(convert.torch_to_flax(parts.pop(name), trees[name], naming,
                                                   source, origins.get(name), fix), dtype)
            for name, naming in (("unet", "diffusers"), ("vae", "diffusers"),
                                 ("text_encoder", "transformers"))}
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
      schedule=schedule, latent_channels=int(vae.config.latent_channels),
      latent_size=int(unet.config.sample_size), vae_scale_factor=vae_scale_factor(vae.config),
      scaling_factor=float(cfgs["vae"].get("scaling_factor", SD_SCALING_FACTOR)), config=config)
