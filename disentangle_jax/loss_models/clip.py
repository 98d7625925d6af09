"""CLIP (image and text towers, the directional loss network): loading, a tiny one, pure apply fns.

Weights: a Hugging Face CLIP directory (config.json plus flax_model.msgpack or
model.safetensors). safetensors files are converted to Flax in numpy (torch is not needed, and
the model is never initialised eagerly).

Shapes: B batch, S CLIP image size, E CLIP embedding width, N texts, L tokens. Images NHWC.
"""
from __future__ import annotations

import os

import flax.core
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from flax import traverse_util
from transformers import modeling_flax_pytorch_utils
from transformers.models.clip import modeling_flax_clip

from disentangle_jax import convert, library_logs, losses, noise
from disentangle_jax.loss_models import vgg
from disentangle_jax.loss_models.config import ClipTextApplyFn, Params
from disentangle_jax.loss_models.config import (TINY_CLIP_HEADS, TINY_CLIP_HIDDEN,
                                                TINY_CLIP_IMAGE_SIZE, TINY_CLIP_INTERMEDIATE,
                                                TINY_CLIP_LAYERS, TINY_CLIP_MAX_TOKENS,
                                                TINY_CLIP_PATCH_SIZE, TINY_CLIP_PROJECTION)

# File names of a Hugging Face model directory.
_HF_CONFIG = "config.json"
_HF_FLAX_WEIGHTS = "flax_model.msgpack"
_HF_SAFE_WEIGHTS = "model.safetensors"
# Independent numpy random stream of the tiny CLIP (the tiny VGG uses stream 1).
_TINY_CLIP_STREAM = 0


def tiny_clip_config(tokenizer) -> transformers.CLIPConfig:
  """A tiny CLIPConfig whose text vocabulary and special ids match ``tokenizer``."""
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
  common = dict(hidden_size=TINY_CLIP_HIDDEN, intermediate_size=TINY_CLIP_INTERMEDIATE,
                num_hidden_layers=TINY_CLIP_LAYERS, num_attention_heads=TINY_CLIP_HEADS)
  text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=TINY_CLIP_MAX_TOKENS,
              eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)
  vision = dict(common, image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH_SIZE)
  return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=TINY_CLIP_PROJECTION)


@library_logs.quietly
def clip_shapes(config: transformers.CLIPConfig) -> tuple[nn.Module, dict]:
  """The Flax CLIP module and its flat {key tuple: ShapeDtypeStruct} (nothing is computed)."""
  module = modeling_flax_clip.FlaxCLIPModule(config)
  size = config.vision_config.image_size
  tokens = (1, config.text_config.max_position_embeddings)
  shapes = jax.eval_shape(
      module.init, jax.random.PRNGKey(0), jnp.zeros(tokens, jnp.int32),
      jnp.zeros((1, size, size, 3), jnp.float32), jnp.ones(tokens, jnp.int32),
      jnp.zeros(tokens, jnp.int32))["params"]
  return module, traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def init_tiny_clip(tokenizer, seed: int) -> tuple[nn.Module, transformers.CLIPConfig, Params]:
  """A tiny random Flax CLIP, deterministic in seed, built in numpy: (module, config, params).

  Kernels and embeddings ~ N(0, 0.02^2) (CLIP's initializer_range), LayerNorm scale 1 and
  biases 0, logit_scale at the config's initial value.
  """
  config = tiny_clip_config(tokenizer)
  module, shapes = clip_shapes(config)
  fixed = {"scale": 1.0, "bias": 0.0, "logit_scale": config.logit_scale_init_value}
  drawn = [key for key in shapes if key[-1] not in fixed]
  values = noise.normal_arrays([seed, _TINY_CLIP_STREAM],
                               [(config.text_config.initializer_range, shapes[key].shape)
                                for key in drawn])
  flat = dict(zip(drawn, values))
  flat.update({key: np.full(spec.shape, fixed[key[-1]]) for key, spec in shapes.items()
               if key[-1] in fixed})
  return module, config, _check_and_unflatten(flat, shapes, "the tiny CLIP")


def _check_and_unflatten(flat: dict, shapes: dict, source: str) -> Params:
  missing, bad = convert.mismatches(flat, shapes)
  if missing:
    raise ValueError(
        f"{source} lacks CLIP weights {vgg.show_keys('.'.join(k) for k in missing)}: is it a "
        "full CLIPModel checkpoint (vision and text towers) matching config.json?")
  if bad:
    key, found, expected = bad[0]
    raise ValueError(
        f"{source}: CLIP weight {'.'.join(key)} has shape {found}, expected {expected} from "
        "config.json.")
  # numpy: load_loss_models puts them on the devices (param_sharding.put, onto a mesh or not)
  return traverse_util.unflatten_dict(
      {k: np.asarray(flat[k]).astype(vgg.PARAM_DTYPE) for k in shapes})


def _clip_flat_from_safetensors(path: str, shapes: dict) -> dict:
  """A CLIP model.safetensors -> flat Flax names, in numpy.

  PyTorch-saved files (metadata format "pt", or none) are renamed and transposed with
  transformers' own rules; Flax-saved files (format "flax") already carry Flax names.
  """
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      saved_by = (f.metadata() or {}).get("format", "pt")
    state = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  if saved_by == "flax":
    return {tuple(name.split(".")): value for name, value in state.items()}
  flat = {}
  for name, value in state.items():
    key, value = modeling_flax_pytorch_utils.rename_key_and_reshape_tensor(
        tuple(name.split(".")), value, shapes, "")
    if key in shapes:  # buffers such as position_ids are not parameters
      flat[key] = value
  return flat


def _clip_flat_from_msgpack(path: str) -> dict:
  with open(path, "rb") as f:
    try:
      state = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input.
      raise ValueError(f"{path} is not a readable Flax msgpack file: {e}") from e
  return traverse_util.flatten_dict(state)


def load_clip(path: str) -> tuple[nn.Module, transformers.CLIPConfig, Params]:
  """Loads a Hugging Face CLIP directory: (module, config, params). Never downloads."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"CLIP directory {path} does not exist: give a local Hugging Face CLIP directory "
        f"(e.g. a download of openai/clip-vit-base-patch32) with {_HF_CONFIG} and "
        f"{_HF_SAFE_WEIGHTS} or {_HF_FLAX_WEIGHTS}.")
  config_file = os.path.join(path, _HF_CONFIG)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"CLIP directory {path} has no {_HF_CONFIG}.")
  config = transformers.CLIPConfig.from_pretrained(path, local_files_only=True)
  module, shapes = clip_shapes(config)
  flax_file = os.path.join(path, _HF_FLAX_WEIGHTS)
  safe_file = os.path.join(path, _HF_SAFE_WEIGHTS)
  if os.path.isfile(flax_file):
    flat, source = _clip_flat_from_msgpack(flax_file), flax_file
  elif os.path.isfile(safe_file):
    flat, source = _clip_flat_from_safetensors(safe_file, shapes), safe_file
  else:
    raise FileNotFoundError(
        f"CLIP directory {path} has neither {_HF_SAFE_WEIGHTS} nor {_HF_FLAX_WEIGHTS} "
        "(pickled pytorch_model.bin is not read: convert it with save_pretrained("
        "safe_serialization=True)).")
  return module, config, _check_and_unflatten(flat, shapes, source)


def _image_features(module, pixel_values):
  pooled = module.vision_model(pixel_values=pixel_values, deterministic=True)[1]
  return module.visual_projection(pooled)


def _text_features(module, input_ids, attention_mask):
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  pooled = module.text_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions, deterministic=True)[1]
  return module.text_projection(pooled)


def make_clip_image_fn(module: nn.Module) -> losses.ClipApplyFn:
  """(params, pixels [B, S, S, 3] NHWC, preprocessed) -> projected features [B, E]."""

  def apply(params, pixels):
    return module.apply({"params": params}, pixels, method=_image_features)

  return apply


def make_clip_text_fn(module: nn.Module) -> ClipTextApplyFn:
  """(params, input_ids [N, L], attention_mask [N, L]) -> projected features [N, E]."""

  def apply(params, input_ids, attention_mask):
    return module.apply({"params": params}, input_ids.astype(jnp.int32),
                        attention_mask.astype(jnp.int32), method=_text_features)

  return apply


def load_tokenizer(path: str):
  """The CLIPTokenizer stored in a CLIP directory."""
  try:
    return transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(
        f"CLIP directory {path} has no readable tokenizer (vocab.json, merges.txt): pass "
        "tokenizer=... to load_loss_models (Stable Diffusion's tokenizer is CLIP's).") from e
