"""Stable Diffusion folders in diffusers layout: reading (``load_folder``) and writing (``save``).

A folder has model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (SDXL
also text_encoder_2/ and tokenizer_2/; the family is detected by ``family.detect``); each
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
from disentangle_jax.models import family as family_lib
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
  """The diffusers-layout folder at ``config.path`` as a StableDiffusion of its family.

  Every config is read and checked (family, UNet / VAE options, scheduler) before any weight.
  """
  root = pathlib.Path(os.path.expanduser(config.path))
  if not root.is_dir():
    raise FileNotFoundError(
        f"model.path={config.path!r} is not a directory. Point --config.model.path at a local "
        "Stable Diffusion 1.x / 2.x / SDXL folder in diffusers layout (model_index.json, unet/, "
        "vae/, text_encoder/, tokenizer/, scheduler/), or leave it None for the tiny random "
        "model.")
  index = read_json(root / "model_index.json")
  # Other model kinds are named before unet/config.json is looked for (SD3 / Flux have none).
  family_lib.check_pipeline(index, str(root), (root / "unet").is_dir(),
                            (root / "transformer").is_dir())
  unet_cfg = read_json(root / "unet" / "config.json")
  fam = family_lib.detect(index, unet_cfg, str(root))
  if fam.zero_empty_negative:
    fam = dataclasses.replace(
        fam, zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", True)))
  vae_cfg = read_json(root / "vae" / "config.json")
  family_lib.check_vae_config(vae_cfg, str(root / "vae" / "config.json"))
  scheduler_file = root / "scheduler" / "scheduler_config.json"
  if scheduler_file.is_file():
    schedule = schedule_lib.ScheduleConfig.from_diffusers_config(read_json(scheduler_file))
  else:
    logger.warning("%s is missing; using the SD v1 schedule.", scheduler_file)
    schedule = schedule_lib.ScheduleConfig()
  text_cfgs = [read_json(root / name / "config.json") for name in fam.text_encoders]
  dtype = compute_dtype(config)
  unet = build_unet(unet_cfg, config, str(root / "unet" / "config.json"))
  vae = build_vae(vae_cfg, config, upcast=fam.vae_float32)
  encoders = [build_text_encoder(cfg, config, projection=fam.pooled and i == len(text_cfgs) - 1)
              for i, cfg in enumerate(text_cfgs)]
  width = sum(e.config.hidden_size for e in encoders)
  if unet.config.cross_attention_dim != width:
    raise ValueError(f"{root}: unet cross_attention_dim={unet.config.cross_attention_dim} but "
                     f"the text encoders' hidden_size adds up to {width}.")
  if fam.pooled:
    want = (family_lib.NUM_TIME_IDS * unet.config.addition_time_embed_dim
            + encoders[-1].config.projection_dim)
    if unet.config.projection_class_embeddings_input_dim != want:
      raise ValueError(f"{root}/unet/config.json: projection_class_embeddings_input_dim="
                       f"{unet.config.projection_class_embeddings_input_dim} but "
                       f"{family_lib.NUM_TIME_IDS} time ids x addition_time_embed_dim + the "
                       f"pooled projection_dim of text_encoder_2 make {want}.")
  if unet.config.in_channels != vae.config.latent_channels:
    raise ValueError(f"{root}: unet in_channels={unet.config.in_channels} but the VAE's "
                     f"latent_channels={vae.config.latent_channels}.")
  tokenizers = [load_tokenizer(root / name, e.config.max_position_embeddings)
                for name, e in zip(fam.tokenizers, encoders)]

  trees = shape_trees(unet, vae, *encoders)
  components = [("unet", _DIFFUSERS_WEIGHTS, "diffusers", dtype),
                ("vae", _DIFFUSERS_WEIGHTS, "diffusers", vae.dtype)]
  components += [(name, _TRANSFORMERS_WEIGHTS, "transformers", dtype)
                 for name in fam.text_encoders]
  params = {}
  for name, candidates, naming, param_dtype in components:
    params[name] = to_device(
        _load_component(root / name, candidates, naming, trees[name], config.allow_pickle),
        param_dtype)
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], params=params,
      schedule=schedule, latent_channels=int(vae.config.latent_channels),
      latent_size=int(unet.config.sample_size), vae_scale_factor=vae_scale_factor(vae.config),
      scaling_factor=float(vae_cfg.get("scaling_factor", SD_SCALING_FACTOR)), config=config,
      family=fam, text_encoder_2=encoders[1] if fam.pooled else None,
      tokenizer_2=tokenizers[1] if fam.pooled else None)


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
  for encoder, tokenizer in zip(model.family.text_encoders, model.family.tokenizers):
    getattr(model, encoder).save_pretrained(tmp / encoder, params=params[encoder])
    getattr(model, tokenizer).save_pretrained(tmp / tokenizer)
  (tmp / "scheduler").mkdir()
  scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "clip_sample": False,
               **dataclasses.asdict(model.schedule)}
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
  index = {
      "_class_name": "FlaxStableDiffusionPipeline",
      "_diffusers_version": diffusers.__version__,
      "unet": ["diffusers", "FlaxUNet2DConditionModel"],
      "vae": ["diffusers", "FlaxAutoencoderKL"],
      "text_encoder": ["transformers", "FlaxCLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "FlaxPNDMScheduler"],
  }
  if model.family.pooled:
    index.update(_class_name="FlaxStableDiffusionXLPipeline",
                 text_encoder_2=["transformers", "FlaxCLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"],
                 force_zeros_for_empty_prompt=model.family.zero_empty_negative)
  (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
  os.rename(tmp, final)
