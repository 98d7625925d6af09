"""The differentiable text-to-image pipeline: mix embeddings -> sample latents -> decode.

``render`` is a pure function of arrays (jit it once; lambda, guidance, noise, x_T and the
weights are traced arguments). Model-specific pieces come in as static functions built by
``models.make_eps_fn`` / ``models.make_decode_fn``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from disentangle_jax import mixing, sampler, schedule


class PromptPair(NamedTuple):
  """Text embeddings of one edit: c0 (neutral), c1 (target), uncond (""), each [L, D]."""

  c0: jax.Array
  c1: jax.Array
  uncond: jax.Array


def render_latents(eps_fn: sampler.EpsFn, unet_params, x_T, noise, lam, prompts: PromptPair,
                   guidance, tables: schedule.StepTables,
                   config: sampler.SamplerConfig) -> jax.Array:
  """Final latents [B, H, W, C] for lambda [T] (shared) or [T, B] (one per batch element).

  A predictor with a ``sample`` method (models.predictor of SD 3.x / Flux.1: models/
  flow_bundle.py) runs its own sampler on the same arguments: the flow-matching Euler one."""
  cond = mixing.mix(lam, prompts.c0, prompts.c1)
  if hasattr(eps_fn, "sample"):
    return eps_fn.sample(unet_params, x_T, noise, cond, prompts.uncond, guidance, tables, config)
  return sampler.sample(eps_fn, unet_params, x_T, noise, cond, prompts.uncond, guidance, tables,
                        config)


def render(eps_fn: sampler.EpsFn, decode_fn: Callable, params: dict[str, Any], x_T, noise, lam,
           prompts: PromptPair, guidance, tables: schedule.StepTables,
           config: sampler.SamplerConfig) -> jax.Array:
  """Images [B, h, w, 3] in [0, 1]; ``params`` holds "unet" and "vae" entries."""
  latents = render_latents(eps_fn, params["unet"], x_T, noise, lam, prompts, guidance, tables,
                           config)
  return decode_fn(params["vae"], latents)


def make_render_fn(eps_fn: sampler.EpsFn, decode_fn: Callable,
                   config: sampler.SamplerConfig) -> Callable:
  """A jitted ``render(params, x_T, noise, lam, prompts, guidance, tables)``.

  Only functions and the static sampler config are bound: weights stay arguments, so the
  program is compiled once per shape and never embeds parameters as constants.
  """
  jitted = jax.jit(functools.partial(render, eps_fn, decode_fn, config=config))

  def render_fn(params, x_T, noise, lam, prompts, guidance, tables):
    # One dtype for guidance: a Python int, a float and a numpy scalar would otherwise each
    # compile their own program (weak int32 / weak float32 / float32).
    return jitted(params, x_T, noise, lam, prompts, jnp.asarray(guidance, jnp.float32), tables)

  render_fn._cache_size = jitted._cache_size  # pylint: disable=protected-access
  return render_fn


def latent_shape(model, image_size: int) -> tuple[int, int, int]:
  """(H, W, C) of the latents for a square ``image_size`` px image (0 = the model's default).

  The size must divide by the VAE factor times the UNet's downsampling (64 px for SD v1).
  """
  factor = model.vae_scale_factor
  # A transformer's latents are cut in patches (flow_bundle.FlowNet.downsampling).
  down = getattr(model.unet, "downsampling", None)
  multiple = factor * (down or 2 ** (len(model.unet.block_out_channels) - 1))
  if image_size == 0:
    size = model.latent_size
  elif not isinstance(image_size, int) or image_size < 0 or image_size % multiple:
    raise ValueError(
        f"image_size={image_size!r} must be a positive multiple of {multiple} px for this model "
        f"(VAE factor {factor} x UNet downsampling {multiple // factor}), e.g. "
        f"{max(multiple, round(image_size / multiple) * multiple) if isinstance(image_size, int) else 512}; "
        "0 = the model's native size.")
  else:
    size = image_size // factor
  return (size, size, model.latent_channels)
