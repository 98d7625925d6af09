"""Nearest-neighbour 2x upsampling without a gather: the same values, a lean backward.

diffusers' Flax upsamplers (the UNet's ``FlaxUpsample2D`` and the VAE's) call
``jax.image.resize(method="nearest")``, a gather per spatial axis. Its transpose is a
scatter-add per axis into a zero buffer of the input's size, and XLA schedules those zero
buffers (constants) at the start of the program and keeps them alive until the backward reaches
the upsampler: at SD size the VAE decoder's six cost 0.31 GiB of temporaries through the whole
gradient, besides scatter-adds being slow on CPU.

``nearest_2x`` repeats each pixel 2x2 by broadcasting and reshaping, axis H first, then W (the
order of ``jax.image.resize``'s gathers). Its values are copies, so the forward is bit for bit
the resize's; its transpose sums each pair of cotangents (W first, then H) exactly as the
scatter-adds do, so the gradient is bit for bit the same too (tests/test_models.py).
``intercept`` (a ``flax.linen.intercept_methods`` interceptor, always active in
``run_options``) routes both upsamplers' ``__call__`` through it; parameter trees are unchanged.
"""
from __future__ import annotations

from diffusers.models import resnet_flax
from diffusers.models import vae_flax
import jax
import jax.numpy as jnp

_UPSAMPLERS = (resnet_flax.FlaxUpsample2D, vae_flax.FlaxUpsample2D)


def nearest_2x(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, 2H, 2W, C], each pixel repeated 2x2 (``jax.image.resize`` "nearest")."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None], (n, h, 2, w, c)).reshape(n, 2 * h, w, c)
  return jnp.broadcast_to(x[:, :, :, None], (n, 2 * h, w, 2, c)).reshape(n, 2 * h, 2 * w, c)


def intercept(next_fun, args, kwargs, context):
  """Flax method interceptor: diffusers' ``FlaxUpsample2D.__call__`` -> conv(nearest_2x(x))."""
  module = context.module
  if type(module) not in _UPSAMPLERS or context.method_name != "__call__":  # noqa: E721
    return next_fun(*args, **kwargs)
  (hidden_states,) = tuple(args) + tuple(kwargs.values())
  return module.conv(nearest_2x(hidden_states))
