"""Per-step mixing weights (lambda) and the embedding mix of docs/METHOD.md section 2.

lambda[i] weights the TARGET prompt c1 at sampling step i (i = 0 is the noisiest step):

    c_i = lambda[i] * c1 + (1 - lambda[i]) * c0

The reference release stores w = 1 - lambda; ``from_reference`` converts.

The shapes ``mix`` accepts (T steps, B batch items, L tokens):
  [T]        one schedule for every batch item (the paper's ~50 parameters);
  [T, B]     one schedule per batch item (seed);
  PerToken([T, L]) or PerToken([T, B, L])
             one weight per step AND token: token l of step i is
             lambda[i, l] * c1[l] + (1 - lambda[i, l]) * c0[l] (the rows of the token embeddings).
The wrapper, never the shape, says which: a plain [T, N] array is one schedule per batch item
even when N equals the token count L (with L = B the shape alone cannot tell them apart).
Any other shape is one ValueError naming lambda, its shape and these shapes.

An embedding is an array [L, D] or a pytree of such arrays, mixed leaf by leaf with the same
lambda[i]: SDXL conditions on {"tokens": [77, 2048], "pooled": [1, 1280]} (both text encoders'
penultimate tokens, and the second one's pooled projection as a one-token leaf), so its
per-step mix applies to the token embeddings AND the pooled embedding alike. With per-token
weights, a one-token leaf (the pooled vector, which summarises the whole prompt) mixes with the
step's mean over the tokens, mean_l lambda[i, l]. ``select`` indexes a batch of embeddings
whatever its structure.
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors

WEIGHTS_FORMAT = "disentangle_jax.weights"
# What one lambda entry weights (the weights file's "lambda_shape", configs' lambda_shape):
# "per_step" = lambda [T]; "per_token" = lambda [T, L], one weight per step and token.
LAMBDA_SHAPES = ("per_step", "per_token")


class PerToken(NamedTuple):
  """Per-token mixing weights: lam [T, L] (shared by the batch) or [T, B, L] (one per item).

  A pytree (jit, grad and scan see the array inside): wrap a lambda in it to mix token by
  token; a plain array is always per step (see the module docstring).
  """

  lam: jax.Array


def check_lambda_shape(lambda_shape: str) -> str:
  if lambda_shape not in LAMBDA_SHAPES:
    raise errors.UserError(f"lambda_shape={lambda_shape!r} is unknown; use one of "
                           f"{', '.join(repr(s) for s in LAMBDA_SHAPES)}.")
  return lambda_shape


def check_t_star(num_steps: int, t_star: int) -> None:
  if isinstance(t_star, bool) or not isinstance(t_star, (int, np.integer)) or not (
      0 <= t_star <= num_steps):
    raise errors.UserError(
        f"t_star={t_star!r} must be an integer in [0, {num_steps}] (the number of early steps "
        f"conditioned on the neutral prompt; {num_steps} = never switch).")


def hard_switch(num_steps: int, t_star: int, late: float = 1.0) -> np.ndarray:
  """The paper's initialisation: 0 for the first t_star steps, ``late`` afterwards. float32 [T]."""
  check_t_star(num_steps, t_star)
  lam = np.zeros((num_steps,), np.float32)
  lam[t_star:] = late
  return lam


def constant(num_steps: int, value: float) -> np.ndarray:
  """The same weight at every step (0 = pure c0, 1 = pure c1). float32 [T]."""
  if num_steps < 1:
    raise errors.UserError(f"num_steps={num_steps} must be >= 1.")
  return np.full((num_steps,), value, np.float32)


def from_reference(w) -> np.ndarray:
  """Converts the reference release's weights (on the neutral prompt) to lambda."""
  return (1.0 - np.asarray(w, np.float64)).astype(np.float32)


def check_lambda(lam, num_steps: int, name: str = "lambda",
                 lambda_shape: str = "per_step") -> np.ndarray:
  """Validates a lambda against the step count; returns float32 [T] (per_step) or [T, L]
  (per_token)."""
  per_token = check_lambda_shape(lambda_shape) == "per_token"
  try:
    lam = np.asarray(lam, dtype=np.float32)
  except ValueError:  # ragged nested lists
    raise errors.UserError(f"{name} is not a rectangular table of numbers.") from None
  if lam.ndim != 1 + per_token or lam.shape[0] != num_steps or 0 in lam.shape:
    want = f"({num_steps}, L), one weight per step and token" if per_token else (
        f"({num_steps},), one weight per step")
    raise errors.UserError(
        f"{name} has shape {lam.shape} but the sampler runs {num_steps} steps: it needs "
        f"shape {want}. Re-learn it for this step count or change num_steps.")
  if not np.all(np.isfinite(lam)):
    raise errors.UserError(f"{name} contains non-finite values: {lam.tolist()}")
  return lam


def load(path: str, num_steps: int | None = None) -> np.ndarray:
  """Loads lambda from a file: .json (a list, or a weights file with a "lambda" entry),
  .npy, or .txt/.csv (numbers separated by commas or whitespace).

  A JSON file with ``"convention": "reference"`` holds the release's w = 1 - lambda and is
  converted. If ``num_steps`` is given, the length is checked.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"lambda file {path!r} does not exist: pass an existing file.")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".json", ".npy", ".txt", ".csv"):
    raise errors.UserError(
        f"lambda file {path!r} has an unknown extension {ext!r}: use .json, .npy, .txt or .csv.")
  try:
    lam = _read_lambda(path, ext)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"lambda file {path!r} could not be parsed: {e}") from None
  except errors.UserError:
    raise
  except (ValueError, TypeError) as e:  # numpy/float() on entries that are not numbers
    raise errors.UserError(f"lambda file {path!r} could not be parsed as numbers: {e}") from None
  if num_steps is not None:
    lam = check_lambda(lam, num_steps, name=f"lambda from {path!r}")
  return lam


def _read_lambda(path: str, ext: str) -> np.ndarray:
  """The numbers of a lambda file of a known extension (float32 [T], unchecked)."""
  if ext == ".json":
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict):
      return np.asarray(data, np.float32)
    if "lambda" not in data:
      raise errors.UserError(f"lambda file {path!r} is a JSON object without a 'lambda' entry.")
    lam = np.asarray(data["lambda"], np.float32)
    return from_reference(lam) if data.get("convention") == "reference" else lam
  if ext == ".npy":
    return np.load(path, allow_pickle=False).astype(np.float32)
  with open(path) as f:
    text = f.read().replace(",", " ")
  return np.asarray([float(v) for v in text.split()], np.float32)


def select(emb, index):
  """Rows ``index`` of a batch of embeddings [N, L, D] (an array or a pytree of them)."""
  return jax.tree.map(lambda e: e[index], emb)


def num_tokens(emb) -> int:
  """L of an embedding [(B,) L, D] or pytree of them: the most tokens of any leaf (SDXL's
  pooled leaf has one)."""
  return max(leaf.shape[-2] for leaf in jax.tree.leaves(emb))


def mix(lam, c0, c1):
  """Per-step conditional embeddings.

  Args:
    lam: [T] or [T, B] (per step), or PerToken([T, L]) / PerToken([T, B, L]) (per step and
      token); see the module docstring. B must be c0's batch when c0 has one.
    c0, c1: [L, D] (or [B, L, D]) neutral and target prompt embeddings, or two pytrees of the
      same structure with such leaves (every leaf mixed with the same lambda; per token, a
      one-token leaf with the step's mean over tokens).

  Returns:
    [T, L, D] if lam is [T] (or PerToken [T, L]) and c0 is [L, D], else [T, B, L, D], in c0's
    dtype: c_i = lam[i] * c1 + (1 - lam[i]) * c0 (leaf by leaf for pytrees).
  """
  if jax.tree.structure(c0) != jax.tree.structure(c1):
    raise errors.UserError(f"c0 is {jax.tree.structure(c0)} but c1 is "
                           f"{jax.tree.structure(c1)}: encode both with the same model.")
  per_token = isinstance(lam, PerToken)
  lam = jnp.asarray(lam.lam if per_token else lam)
  _check_mix_shapes(lam, per_token, c0, c1)
  if per_token:
    return jax.tree.map(functools.partial(_mix_tokens, lam), c0, c1)
  return jax.tree.map(functools.partial(_mix_leaf, lam), c0, c1)


def _check_mix_shapes(lam, per_token: bool, c0, c1) -> None:
  """One error naming lambda, its shape and the shapes accepted for these embeddings."""
  leaves0, leaves1 = jax.tree.leaves(c0), jax.tree.leaves(c1)
  for a, b in zip(leaves0, leaves1):
    if a.shape != b.shape:
      raise errors.UserError(f"c0 has shape {a.shape} but c1 has shape {b.shape}: they must "
                             "match.")
    if a.ndim not in (2, 3):
      raise errors.UserError(f"c0 has shape {a.shape}: embeddings are [L, D] or [B, L, D].")
  batches = {a.shape[0] for a in leaves0 if a.ndim == 3}
  batch = batches.pop() if len(batches) == 1 else None
  tokens = num_tokens(c0)
  b = "B" if batch is None else str(batch)
  accepted = (f"[T] or [T, {b}] per step, or mixing.PerToken([T, {tokens}]) / "
              f"PerToken([T, {b}, {tokens}]) per token")
  ok = lam.ndim == (2 if per_token else 1)  # shared by the batch
  if lam.ndim == (3 if per_token else 2):  # one per batch item
    ok = batch is None or lam.shape[1] == batch
  if per_token and ok:  # the token rows; a one-token leaf (pooled) takes their mean
    ok = lam.shape[-1] == tokens and all(a.shape[-2] in (1, tokens) for a in leaves0)
  if not ok:
    given = f"PerToken({tuple(lam.shape)})" if per_token else str(tuple(lam.shape))
    raise errors.UserError(
        f"lambda has shape {given}, but these embeddings ({tokens} tokens"
        f"{'' if batch is None else f', batch {batch}'}) take {accepted}; a plain [T, N] "
        "array is per batch item: wrap per-token weights in mixing.PerToken.")


def _mix_leaf(lam, c0, c1):
  # Mixed in at least float32 and cast once: a bfloat16 lambda would round 1.15 to 1.1484.
  dtype = jnp.promote_types(c0.dtype, jnp.float32)
  lam = jnp.asarray(lam).astype(dtype)[..., None, None]  # [T(, B), 1, 1] vs [(B,) L, D]
  # The convex form (not c0 + lam * (c1 - c0)) so lam = 0 / 1 give c0 / c1 exactly.
  return (lam * c1.astype(dtype) + (1 - lam) * c0.astype(dtype)).astype(c0.dtype)


def _mix_tokens(lam, c0, c1):
  """Per-token lam [T(, B), L] on one leaf; a one-token leaf (the pooled vector) of a
  several-token embedding takes the per-step mean over tokens."""
  dtype = jnp.promote_types(c0.dtype, jnp.float32)
  lam = lam.astype(dtype)
  if c0.shape[-2] != lam.shape[-1]:  # checked: a one-token leaf
    return _mix_leaf(jnp.mean(lam, axis=-1), c0, c1)
  if lam.ndim == 2 and c0.ndim == 3:  # [T, L] over a batch [B, L, D]
    lam = lam[:, None, :, None]
  else:  # [T(, B), L, 1] vs [(B,) L, D]
    lam = lam[..., None]
  return (lam * c1.astype(dtype) + (1 - lam) * c0.astype(dtype)).astype(c0.dtype)
