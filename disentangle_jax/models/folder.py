"""Stable Diffusion folders in diffusers layout: reading (``load_folder``) and writing (``save``).

A folder has model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/; each
component is read, in this order of preference, from Flax msgpack, safetensors (converted in
numpy by ``convert``, no torch), or, only with ``allow_pickle=True``, a PyTorch pickle ``.bin``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import diffusers
import flax.serialization
import jax
import numpy as np
import safetensors.numpy
import transformers

from disentangle_jax import convert
from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models.build import (SD_SCALING_FACTOR, build_text_encoder, build_unet,
                                          build_vae, shape_trees, to_device, vae_scale_factor)
from disentangle_jax.models.bundle import StableDiffusion
from disentangle_jax.models.config import ModelConfig, compute_dtype

logger = logging.getLogger(__name__)

# Weight files of each component, in order of preference: (kind, file name).
_DIFFUSERS_WEIGHTS = (
    ("msgpack", "diffusion_flax_model.msgpack"),
    ("safetensors", "diffusion_pytorch_model.safetensors"),
    ("safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    ("pickle", "diffusion_pytorch_model.bin"),
    ("pickle", "diffusion_pytorch_model.fp16.bin"),
)
_TRANSFORMERS_WEIGHTS = (
    ("msgpack", "flax_model.msgpack"),
    ("safetensors", "model.safetensors"),
    ("safetensors", "model.fp16.safetensors"),
    ("pickle", "pytorch_model.bin"),
    ("pickle", "pytorch_model.fp16.bin"),
)
# Files that look like weights in a format this loader does not read.
_OTHER_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".onnx", ".pb", ".h5", ".gguf", ".msgpack",
                          ".safetensors", ".bin", ".index.json")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def read_json(path: pathlib.Path) -> dict:
  """A config file's JSON; one clear error if it is missing or not JSON."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: a Stable Diffusion folder in diffusers layout "
                            "has model_index.json and a config.json in unet/, vae/ and "
                            "text_encoder/.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from None


def _find_weights(component: pathlib.Path, candidates, allow_pickle: bool):
  """Returns (kind, path) of the preferred weight file of one component."""
  for kind, name in candidates:
    path = component / name
    if not path.is_file():
      continue
    if kind == "pickle" and not allow_pickle:  # only reached when nothing safer exists
      raise ValueError(
          f"{path} is a PyTorch pickle file; it is refused because unpickling can run arbitrary "
          "code. Convert it to safetensors, or, if you trust the file, set "
          "--config.model.allow_pickle=True (reading .bin needs torch).")
    return kind, path
  looked_for = [name for _, name in candidates]
  others = sorted(p.name for p in component.iterdir() if p.name.endswith(_OTHER_WEIGHT_SUFFIXES))
  if others:
    raise ValueError(f"{component}: unknown weight format {others}; this loader reads "
                     f"{looked_for} (Flax msgpack, safetensors, or PyTorch .bin with "
                     "allow_pickle). Convert the weights to safetensors.")
  raise FileNotFoundError(f"{component} has no weight file; looked for {looked_for}.")


def _import_torch_for(path: pathlib.Path):
  return convert.import_torch(f"reading the PyTorch .bin file {path}",
                              "or convert it to safetensors.")


def _read_pickle(path: pathlib.Path, torch) -> dict[str, np.ndarray]:
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items() if hasattr(v, "numpy")}


def _load_component(component: pathlib.Path, candidates, naming: str, shape_tree,
                    allow_pickle: bool) -> dict:
  """Reads one component's weights as a nested numpy dict matching ``shape_tree``."""
  kind, path = _find_weights(component, candidates, allow_pickle)
  logger.info("Reading %s", path)
  torch = _import_torch_for(path) if kind == "pickle" else None
  try:
    if kind == "msgpack":
      state = flax.serialization.msgpack_restore(path.read_bytes())
    elif kind == "safetensors":
      state = safetensors.numpy.load_file(str(path))
    else:
      state = _read_pickle(path, torch)
  except Exception as e:  # pylint: disable=broad-except  # any reader's error: one message
    raise ValueError(f"{path} could not be read as {kind} ({type(e).__name__}: {e}); is the "
                     "file complete? Download or convert it again.") from None
  if kind == "msgpack":
    return convert.check_tree(state, shape_tree, str(path))
  return convert.torch_to_flax(state, shape_tree, naming, str(path))


def load_tokenizer(directory: pathlib.Path, max_positions: int):
  """CLIPTokenizer from a folder with vocab.json and merges.txt, capped at ``max_positions``."""
  missing = [n for n in _TOKENIZER_FILES if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"{directory} lacks the tokenizer files {missing}: a Stable "
                            "Diffusion folder has tokenizer/vocab.json and tokenizer/merges.txt.")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
  if tokenizer.model_max_length > max_positions:  # no tokenizer_config.json: unbounded
    tokenizer.model_max_length = max_positions
  return tokenizer


def load_folder(config: ModelConfig) -> StableDiffusion:
  """The diffusers-layout folder at ``config.path`` as a StableDiffusion."""
  root = pathlib.Path(os.path.expanduser(config.path))
  if not root.is_dir():
    raise FileNotFoundError(
        f"model.path={config.path!r} is not a directory. Point --config.model.path at a local "
        "Stable Diffusion v1.x folder in diffusers layout (model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/), or leave it None for the tiny random model.")
  read_json(root / "model_index.json")
  unet_cfg = read_json(root / "unet" / "config.json")
  vae_cfg = read_json(root / "vae" / "config.json")
  text_cfg = read_json(root / "text_encoder" / "config.json")
  dtype = compute_dtype(config)
  unet = build_unet(unet_cfg, config, str(root / "unet" / "config.json"))
  vae = build_vae(vae_cfg, config)
  text_encoder = build_text_encoder(text_cfg, config)
  if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
    raise ValueError(f"{root}: unet cross_attention_dim={unet.config.cross_attention_dim} but "
                     f"the text encoder's hidden_size={text_encoder.config.hidden_size}.")
  if unet.config.in_channels != vae.config.latent_channels:
    raise ValueError(f"{root}: unet in_channels={unet.config.in_channels} but the VAE's "
                     f"latent_channels={vae.config.latent_channels}.")
  tokenizer = load_tokenizer(root / "tokenizer", text_encoder.config.max_position_embeddings)

  trees = shape_trees(unet, vae, text_encoder)
  params = {}
  for name, candidates, naming in (("unet", _DIFFUSERS_WEIGHTS, "diffusers"),
                                   ("vae", _DIFFUSERS_WEIGHTS, "diffusers"),
                                   ("text_encoder", _TRANSFORMERS_WEIGHTS, "transformers")):
    params[name] = to_device(
        _load_component(root / name, candidates, naming, trees[name], config.allow_pickle), dtype)

  scheduler_file = root / "scheduler" / "scheduler_config.json"
  if scheduler_file.is_file():
    schedule = schedule_lib.ScheduleConfig.from_diffusers_config(read_json(scheduler_file))
  else:
    logger.warning("%s is missing; using the SD v1 schedule.", scheduler_file)
    schedule = schedule_lib.ScheduleConfig()
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
      schedule=schedule, latent_channels=int(vae.config.latent_channels),
      latent_size=int(unet.config.sample_size), vae_scale_factor=vae_scale_factor(vae.config),
      scaling_factor=float(vae_cfg.get("scaling_factor", SD_SCALING_FACTOR)), config=config)


def save(model: StableDiffusion, directory) -> None:
  """Writes ``model`` as a diffusers-layout folder with Flax msgpack weights.

  ``load`` reads it back exactly (the fast way to reuse a converted safetensors checkpoint).
  Written to a temporary sibling folder and renamed; ``directory`` must not exist yet.
  """
  final = pathlib.Path(directory)
  if final.exists():
    raise FileExistsError(f"{final} exists; save writes a new folder: pick another path.")
  tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
  params = jax.device_get(model.params)
  model.unet.save_pretrained(tmp / "unet", params=params["unet"])
  model.vae.save_pretrained(tmp / "vae", params=params["vae"])
  model.text_encoder.save_pretrained(tmp / "text_encoder", params=params["text_encoder"])
  model.tokenizer.save_pretrained(tmp / "tokenizer")
  (tmp / "scheduler").mkdir()
  scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "clip_sample": False,
               "prediction_type": "epsilon", **dataclasses.asdict(model.schedule)}
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
  (tmp / "model_index.json").write_text(json.dumps({
      "_class_name": "FlaxStableDiffusionPipeline",
      "_diffusers_version": diffusers.__version__,
      "unet": ["diffusers", "FlaxUNet2DConditionModel"],
      "vae": ["diffusers", "FlaxAutoencoderKL"],
      "text_encoder": ["transformers", "FlaxCLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "FlaxPNDMScheduler"],
  }, indent=2))
  os.rename(tmp, final)
