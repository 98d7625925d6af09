"""UNet attention through ``jax.nn.dot_product_attention`` (model.attention="dot_product").

``intercept`` replaces diffusers' ``FlaxAttention.__call__`` (einsum, softmax, einsum) by one
``jax.nn.dot_product_attention`` call on the module's own projections (``to_q``, ``to_k``,
``to_v``, ``to_out_0``): same parameters, same result up to float32 re-association. On GPUs
JAX may then pick a fused kernel (cuDNN flash attention, for bf16/fp16 inputs) that never
materialises the [L_q, L_k] score matrix; on CPU it is XLA's own implementation.

Shapes: B batch, L_q query tokens, L_k key tokens, N heads, K head width.
"""
from __future__ import annotations

from diffusers.models import attention_flax
import jax


def _heads(x, num_heads: int):
  b, length, width = x.shape
  return x.reshape(b, length, num_heads, width // num_heads)  # [B, L, N, K]


def intercept(next_fun, args, kwargs, context):
  """Flax method interceptor: ``FlaxAttention.__call__`` -> ``jax.nn.dot_product_attention``."""
  module = context.module
  if (type(module) is not attention_flax.FlaxAttention  # pylint: disable=unidiomatic-typecheck
      or context.method_name != "__call__" or module.dropout):
    return next_fun(*args, **kwargs)
  call = dict(zip(("hidden_states", "context", "deterministic"), args), **kwargs)
  hidden_states = call["hidden_states"]
  context_states = call.get("context")
  context_states = hidden_states if context_states is None else context_states
  q = _heads(module.query(hidden_states), module.heads)
  k = _heads(module.key(context_states), module.heads)
  v = _heads(module.value(context_states), module.heads)
  out = jax.nn.dot_product_attention(q, k, v, scale=module.dim_head**-0.5)
  return module.proj_attn(out.reshape(out.shape[:2] + (-1,)))
