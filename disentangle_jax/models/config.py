"""What model to load and how to run it: ``ModelConfig``, built from the config's ``model`` section."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from disentangle_jax import remat as remat_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
ATTENTIONS = ("standard", "chunked", "dot_product")
CONVS = ("fast", "fast_hoisted", "xla")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which Stable Diffusion to load and how to run it."""

  path: str | None = None  # SD v1.x folder (diffusers) or one .safetensors/.ckpt file; None = tiny
  allow_pickle: bool = False  # opt-in to read PyTorch .bin (pickle) weights (needs torch)
  dtype: str = "float32"  # networks' weights/activations: float32 | bfloat16 (mixed) | float64
  attention: str = "standard"  # "standard" | "chunked" (memory-efficient) | "dot_product" (jax.nn)
  conv: str = "fast"  # "fast" (fast_conv custom_vjp) | "fast_hoisted" (fast_conv.prepare) | "xla"
  block_remat: str = "none"  # remat inside UNet / VAE: a key of remat.LEVELS
  tiny_seed: int = 0  # seed of the tiny random model's weights
  tiny_latent_size: int = 8  # default latent H = W of the tiny model (images 8x larger)
  torch_numerics: bool = False  # UNet as diffusers' PyTorch computes it (exact GELU, eps 1e-6)
  tiny_family: str = ""  # family of the tiny model: "" (SD 1.x layout) | sd2 | sdxl | sd3 | flux
  tokenizer_path: str | None = None  # tokenizer folder (vocab.json, merges.txt) for a single file
  config_path: str | None = None  # single file: diffusers-layout config folder; None = SD v1's

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is unknown; use one of {tuple(DTYPES)}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(
          f"model.attention={self.attention!r} is unknown; use one of {ATTENTIONS}.")
    if self.conv not in CONVS:
      raise ValueError(f"model.conv={self.conv!r} is unknown; use one of {CONVS}.")
    if self.block_remat not in remat_lib.LEVELS:
      raise ValueError(f"model.block_remat={self.block_remat!r} is unknown; use one of "
                       f"{remat_lib.LEVELS}.")
    if self.tiny_family not in ("", "sd1", "sd2", "sdxl", "sd3", "flux"):
      raise ValueError(f"model.tiny_family={self.tiny_family!r} is unknown; use '' (SD 1.x), "
                       "'sd2', 'sdxl', 'sd3' (SD 3.5 MMDiT) or 'flux' (Flux.1).")
    if self.tiny_latent_size < 1:
      raise ValueError(f"model.tiny_latent_size={self.tiny_latent_size} must be >= 1.")


def compute_dtype(config: ModelConfig):
  """The networks' compute dtype; float64 needs 64-bit JAX."""
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                     "jax.config.update('jax_enable_x64', True) in the entry point).")
  return DTYPES[config.dtype]
