"""Flax modules built from diffusers / transformers config dicts, and their parameter shapes."""
from __future__ import annotations

import contextlib
import contextvars

import diffusers
import jax
import jax.numpy as jnp
import transformers

from disentangle_jax import convert, param_sharding
from disentangle_jax.models.config import ModelConfig, compute_dtype

# SD v1 constants used when a config does not name them.
SD_SCALING_FACTOR = 0.18215
SD_MAX_LENGTH = 77
# The Flax UNet of diffusers hard-codes GroupNorm(32).
FLAX_UNET_GROUPS = 32


def vae_scale_factor(vae_config) -> int:
  """Image pixels per latent pixel: 2 ** (number of VAE blocks - 1) (8 for SD)."""
  channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else (
      vae_config.block_out_channels)
  return 2 ** (len(channels) - 1)


def build_unet(cfg: dict, config: ModelConfig, source: str):
  """diffusers' FlaxUNet2DConditionModel from its config dict (``source`` names it in errors)."""
  groups = cfg.get("norm_num_groups", FLAX_UNET_GROUPS)
  if groups != FLAX_UNET_GROUPS:
    raise ValueError(f"{source}: norm_num_groups={groups}, but diffusers' Flax UNet only "
                     f"supports {FLAX_UNET_GROUPS} (Stable Diffusion v1.x uses 32).")
  return diffusers.FlaxUNet2DConditionModel.from_config(
      _drop_private(cfg), dtype=compute_dtype(config),
      use_memory_efficient_attention=config.attention == "chunked")  # "dot_product": run_options


def build_vae(cfg: dict, config: ModelConfig, upcast: bool = False):
  """diffusers' FlaxAutoencoderKL from its config dict; ``upcast``: at least float32 (SDXL's
  VAE overflows in half precision; its weights are then kept in that dtype too)."""
  dtype = compute_dtype(config)
  if upcast:
    dtype = jnp.promote_types(dtype, jnp.float32)
  return diffusers.FlaxAutoencoderKL.from_config(_drop_private(cfg), dtype=dtype)


def build_text_encoder(cfg: dict, config: ModelConfig, projection: bool = False):
  """transformers' FlaxCLIPTextModel (no weights held) from a CLIPTextConfig or CLIPConfig dict;
  ``projection``: FlaxCLIPTextModelWithProjection (SDXL's second encoder, pooled projection)."""
  if cfg.get("model_type") == "clip" and "text_config" in cfg:  # a full CLIPConfig
    cfg = cfg["text_config"]
  text_config = transformers.CLIPTextConfig.from_dict(cfg)
  cls = (transformers.FlaxCLIPTextModelWithProjection if projection
         else transformers.FlaxCLIPTextModel)
  return cls(text_config, input_shape=(1, 1), dtype=compute_dtype(config), _do_init=False)


def _drop_private(cfg: dict) -> dict:
  return {k: v for k, v in cfg.items() if not k.startswith("_")}


def shape_trees(unet, vae, text_encoder, text_encoder_2=None) -> dict:
  """{"unet", "vae", "text_encoder"(, "text_encoder_2"): ShapeDtypeStruct tree} of the
  modules' weights."""
  trees = {
      "unet": init_shapes(unet),
      "vae": init_shapes(vae),
      "text_encoder": text_encoder.params_shape_tree,
  }
  if text_encoder_2 is not None:
    trees["text_encoder_2"] = text_encoder_2.params_shape_tree
  return trees


# {module type and repr: its weights' ShapeDtypeStruct tree}. Tracing init_weights costs ~0.5-2 s
# (the tiny models) and a process builds the same modules again and again (tests, studies).
_INIT_SHAPES: dict[str, object] = {}


def init_shapes(module):
  """The ShapeDtypeStruct tree of a diffusers Flax module's ``init_weights``, traced once per
  module configuration (its repr names every field, the dtype included); fresh containers on
  every call, so a caller may change them. Abstract all through: no PRNG key is made, and no
  JAX backend is needed."""
  key = f"{type(module).__module__}.{type(module).__qualname__}: {module!r}"
  if key not in _INIT_SHAPES:
    _INIT_SHAPES[key] = jax.eval_shape(module.init_weights,
                                       jax.ShapeDtypeStruct((2,), jnp.uint32))  # a raw key
  return jax.tree.map(lambda leaf: leaf, _INIT_SHAPES[key])


# The mesh the weights being loaded go to (``models.load``'s ``mesh``, set by ``onto``). Every
# loader (folder, single file, tiny, flow_bundle's) ends in ``to_device``, so the mesh reaches
# them all without a parameter threaded through each loader's helpers.
_MESH: contextvars.ContextVar = contextvars.ContextVar("disentangle_load_mesh", default=None)


@contextlib.contextmanager
def onto(mesh):
  """Within it, ``to_device`` puts weights onto ``mesh`` (param_sharding.put); None: as without."""
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


def to_device(params, dtype) -> dict:
  """Numpy weights -> jax arrays, floating leaves cast to ``dtype`` (on the host).

  Whole on the default device, or, inside ``onto(mesh)`` with a model axis, each leaf's slices
  straight onto the devices of its param_sharding rule. ``jax.device_put`` copies;
  ``jnp.asarray`` would compile a small program per leaf shape."""
  return param_sharding.put(convert.cast_floating(params, dtype), _MESH.get())
