"""Analytic noise predictors for testing sampler math without a network."""
import jax.numpy as jnp


def eps_fn(params, x, t, emb):
  """eps(x, t, c) = a * x * t / (t + 1) + b * mean(c): depends on all inputs, cheap, smooth.

  params: {"a": [], "b": []}; x [N,H,W,C]; t [] int; emb [N,L,D].
  """
  t = jnp.asarray(t, x.dtype)
  c = jnp.mean(emb, axis=(1, 2)).astype(x.dtype)[:, None, None, None]
  return params["a"] * x * t / (t + 1) + params["b"] * jnp.tanh(c + 0.1 * x)


def eps_np(params, x, t, emb):
  """The same predictor in numpy (for reference loops)."""
  import numpy as np
  c = np.mean(emb, axis=(1, 2))[:, None, None, None]
  return params["a"] * x * t / (t + 1) + params["b"] * np.tanh(c + 0.1 * x)
