"""diffusers' PyTorch UNet numerics for its Flax UNet (model.torch_numerics=True).

diffusers' Flax UNet differs from its PyTorch UNet, the original release's, in two places, for
every family: ``FlaxGEGLU`` uses the tanh approximation of GELU where PyTorch's GEGLU uses the
exact (erf) GELU, and ``FlaxTransformer2DModel`` normalises with GroupNorm epsilon 1e-5 where
PyTorch's Transformer2DModel uses 1e-6. Together about 5e-5 relative per UNet call, in float64
too. ``intercept`` computes both as PyTorch does, on the same parameters; with it, one UNet call
agrees with PyTorch to float re-association (tests/test_parity_models.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from diffusers.models import attention_flax

TORCH_TRANSFORMER_NORM_EPS = 1e-6  # diffusers' Transformer2DModel: GroupNorm(eps=1e-6)


def _geglu(module, hidden_states, deterministic=True):
  linear, gate = jnp.split(module.proj(hidden_states), 2, axis=2)
  return module.dropout_layer(linear * jax.nn.gelu(gate, approximate=False),
                              deterministic=deterministic)


def intercept(next_fun, args, kwargs, context):
  """Flax method interceptor: exact GELU in ``FlaxGEGLU``; GroupNorm eps 1e-6 in transformers."""
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if type(module) is attention_flax.FlaxGEGLU:  # pylint: disable=unidiomatic-typecheck
    return _geglu(module, *args, **kwargs)
  if (isinstance(module, nn.GroupNorm) and module.epsilon != TORCH_TRANSFORMER_NORM_EPS
      and type(module.parent) is attention_flax.FlaxTransformer2DModel):  # pylint: disable=unidiomatic-typecheck
    torch_norm = module.clone(parent=None, epsilon=TORCH_TRANSFORMER_NORM_EPS)
    return torch_norm.apply({"params": module.variables["params"]}, *args, **kwargs)
  return next_fun(*args, **kwargs)
