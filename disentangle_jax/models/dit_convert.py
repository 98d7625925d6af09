"""diffusers PyTorch checkpoints of SD3Transformer2DModel / FluxTransformer2DModel -> the
parameter trees of mmdit.MMDiT / flux.Flux, in numpy, without torch.

Reading: a ``.safetensors`` file, or a component folder holding
``diffusion_pytorch_model.safetensors`` or a sharded ``diffusion_pytorch_model.safetensors.
index.json`` (its ``weight_map`` names the shard of every key). The safetensors format is read
here (an 8-byte header length, a JSON header, raw little-endian arrays) because
``safetensors.numpy`` cannot return bfloat16, the dtype the released SD 3.5 and Flux.1 weights
are stored in; every floating array comes back float32 (or the requested dtype).

Naming (dit_layers.py names every Flax module after its diffusers attribute):
  ``name.0`` joins into ``name_0`` (``transformer_blocks.3.ff.net.0.proj`` ->
  ``transformer_blocks_3/ff/net_0/proj``); a linear ``weight`` [O, I] becomes ``kernel`` [I, O],
  a convolution's [O, I, kh, kw] becomes ``kernel`` [kh, kw, I, O], a 1-D ``weight`` (RMS norm)
  becomes ``scale``; SD3's position table ``pos_embed.pos_embed`` stays as it is.
Every converted tree is checked against the module's parameter shapes (``jax.eval_shape`` of its
init: nothing allocated); a missing, extra or misshapen entry is an error naming the entries.
"""
from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_MAX_LISTED = 5

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """{key: array} of one .safetensors file; floating arrays cast to ``dtype`` (bf16 included)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than its header).")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not a safetensors file (unreadable header: {e}).") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which this reader "
                       f"does not know ({sorted(_DTYPES)}).")
    start, end = info["data_offsets"]
    array = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
    out[key] = np.array(array, dtype=dtype if floating else array.dtype)
  return out


def read_state_dict(path: str, dtype=np.float32,
                    weights_name: str = WEIGHTS_NAME) -> dict[str, np.ndarray]:
  """The state dict of a .safetensors file or a component folder (single or sharded).

  ``weights_name``: diffusers' ``diffusion_pytorch_model.safetensors`` or transformers'
  ``model.safetensors`` (the index is ``<weights_name>.index.json``).
  """
  if os.path.isfile(path):
    return read_safetensors(path, dtype)
  index = os.path.join(path, weights_name + ".index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no 'weight_map': it is not a sharded-weights index.")
    state = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.isfile(shard_path):
        raise ValueError(f"{index} names the shard {shard!r}, which is not in {path}.")
      state.update(read_safetensors(shard_path, dtype))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"{index} lists keys that no shard holds, e.g. {missing[:_MAX_LISTED]}.")
    return state
  single = os.path.join(path, weights_name)
  if os.path.isfile(single):
    return read_safetensors(single, dtype)
  raise ValueError(f"{path} holds neither {weights_name} nor {weights_name}.index.json: save "
                   "the component with safe_serialization (the libraries' default) or convert "
                   "its .bin files.")


def flax_key(torch_key: str, ndim: int) -> tuple[tuple[str, ...], str]:
  """(Flax path, transform) of a diffusers key: transform is "linear", "conv" or "copy"."""
  parts = []
  for token in torch_key.split("."):
    if token.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{token}"
    else:
      parts.append(token)
  if parts[-1] == "weight":
    if ndim == 2:
      return tuple(parts[:-1]) + ("kernel",), "linear"
    if ndim == 4:
      return tuple(parts[:-1]) + ("kernel",), "conv"
    return tuple(parts[:-1]) + ("scale",), "copy"
  return tuple(parts), "copy"


def to_flax(state_dict: dict[str, np.ndarray]) -> dict:
  """The nested Flax tree of a state dict (naming rules in the module docstring)."""
  flat = {}
  for key, value in state_dict.items():
    path, how = flax_key(key, np.ndim(value))
    if how == "linear":
      value = np.ascontiguousarray(value.T)
    elif how == "conv":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def check_tree(params: dict, shapes, source: str) -> dict:
  """``params`` if its entries and shapes are exactly those of ``shapes`` (an eval_shape tree);
  else ValueError naming the missing, extra and misshapen entries and ``source``."""
  target = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  flat = traverse_util.flatten_dict(params)
  name = "/".join
  missing = sorted(name(k) for k in target if k not in flat)
  extra = sorted(name(k) for k in flat if k not in target)
  if missing or extra:
    raise ValueError(
        f"{source}: {len(missing)} parameter(s) of the model are missing (e.g. "
        f"{missing[:_MAX_LISTED]}) and {len(extra)} entrie(s) have no place in it (e.g. "
        f"{extra[:_MAX_LISTED]}): the weights and the config.json beside them do not belong "
        "together, or the checkpoint carries a part this port does not implement.")
  bad = [(name(k), tuple(np.shape(v)), target[k]) for k, v in flat.items()
         if tuple(np.shape(v)) != target[k]]
  if bad:
    raise ValueError(f"{source}: parameters with the wrong shape (name, found, expected): "
                     f"{bad[:_MAX_LISTED]}; the weights do not match their config.json.")
  return params


def sd3_shapes(config: mmdit.MMDiTConfig, text_len: int = 4):
  """The abstract parameter tree of MMDiT(config) (shapes do not depend on the input sizes)."""
  module = mmdit.MMDiT(config)
  p = config.patch_size
  x = jax.ShapeDtypeStruct((1, p, p, config.in_channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, text_len, config.joint_attention_dim), jnp.float32)
  pooled = jax.ShapeDtypeStruct((1, config.pooled_projection_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), x, tokens, pooled,
                        t)["params"]


def flux_shapes(config: flux_lib.FluxConfig, text_len: int = 4):
  """The abstract parameter tree of Flux(config)."""
  module = flux_lib.Flux(config)
  x = jax.ShapeDtypeStruct((1, 4, config.in_channels), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, text_len, config.joint_attention_dim), jnp.float32)
  pooled = jax.ShapeDtypeStruct((1, config.pooled_projection_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  rope = flux_lib.rope_for(config, text_len, 4, 4)

  def init(x, tokens, pooled, t):
    guidance = t if config.guidance_embeds else None
    return module.init(jax.random.key(0), x, tokens, pooled, t, guidance, rope)

  return jax.eval_shape(init, x, tokens, pooled, t)["params"]


def sd3_params(state_dict: dict[str, np.ndarray], config: mmdit.MMDiTConfig,
               source: str = "transformer") -> dict:
  """The MMDiT parameter tree of an SD3Transformer2DModel state dict, checked."""
  return check_tree(to_flax(state_dict), sd3_shapes(config), source)


def flux_params(state_dict: dict[str, np.ndarray], config: flux_lib.FluxConfig,
                source: str = "transformer") -> dict:
  """The Flux parameter tree of a FluxTransformer2DModel state dict, checked."""
  return check_tree(to_flax(state_dict), flux_shapes(config), source)


def read_config(folder: str) -> dict:
  """A component folder's config.json as a dict."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{folder} has no config.json: is it a diffusers component folder?")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_transformer(folder: str, dtype=np.float32):
  """(config, params) of a diffusers transformer folder, whichever of the two classes it is."""
  config = read_config(folder)
  cls = config.get("_class_name")
  if cls == "SD3Transformer2DModel":
    cfg = mmdit.MMDiTConfig.from_diffusers_config(config)
    return cfg, sd3_params(read_state_dict(folder, dtype), cfg, folder)
  if cls == "FluxTransformer2DModel":
    cfg = flux_lib.FluxConfig.from_diffusers_config(config)
    return cfg, flux_params(read_state_dict(folder, dtype), cfg, folder)
  raise ValueError(f"{folder}/config.json has _class_name={cls!r}; this port reads "
                   "'SD3Transformer2DModel' and 'FluxTransformer2DModel'.")
