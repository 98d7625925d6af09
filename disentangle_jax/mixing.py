"""Per-step mixing weights (lambda) and the embedding mix of METHOD.md section 2.

lambda[i] weights the TARGET prompt c1 at sampling step i (i = 0 is the noisiest step):

    c_i = lambda[i] * c1 + (1 - lambda[i]) * c0

The reference release stores w = 1 - lambda; ``from_reference`` converts.

An embedding is an array [L, D] or a pytree of such arrays, mixed leaf by leaf with the same
lambda[i]: SDXL conditions on {"tokens": [77, 2048], "pooled": [1, 1280]} (both text encoders'
penultimate tokens, and the second one's pooled projection as a one-token leaf), so its
per-step mix applies to the token embeddings AND the pooled embedding alike. ``select`` indexes
a batch of embeddings whatever its structure.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors

WEIGHTS_FORMAT = "disentangle_jax.weights"


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


def check_lambda(lam, num_steps: int, name: str = "lambda") -> np.ndarray:
  """Validates a lambda vector against the step count; returns float32 [T]."""
  lam = np.asarray(lam, dtype=np.float32)
  if lam.ndim != 1 or lam.shape[0] != num_steps:
    raise errors.UserError(
        f"{name} has shape {lam.shape} but the sampler runs {num_steps} steps: it needs "
        f"shape ({num_steps},), one weight per step. Re-learn it for this step count or change "
        "num_steps.")
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


def mix(lam: jax.Array, c0, c1):
  """Per-step conditional embeddings.

  Args:
    lam: [T] (or [T, B] for one lambda per batch element).
    c0, c1: [L, D] (or [B, L, D]) neutral and target prompt embeddings, or two pytrees of the
      same structure with such leaves (every leaf mixed with the same lambda).

  Returns:
    [T, L, D] if lam is [T] and c0 is [L, D], else [T, B, L, D], in c0's dtype: c_i = lam[i] * c1
    + (1 - lam[i]) * c0 (leaf by leaf for pytrees).
  """
  if jax.tree.structure(c0) != jax.tree.structure(c1):
    raise errors.UserError(f"c0 is {jax.tree.structure(c0)} but c1 is "
                           f"{jax.tree.structure(c1)}: encode both with the same model.")
  return jax.tree.map(functools.partial(_mix_leaf, lam), c0, c1)


def _mix_leaf(lam, c0, c1):
  if c0.shape != c1.shape:
    raise errors.UserError(f"c0 has shape {c0.shape} but c1 has shape {c1.shape}: they must match.")
  # Mixed in at least float32 and cast once: a bfloat16 lambda would round 1.15 to 1.1484.
  dtype = jnp.promote_types(c0.dtype, jnp.float32)
  lam = jnp.asarray(lam).astype(dtype)[..., None, None]  # [T(, B), 1, 1] vs [(B,) L, D]
  # The convex form (not c0 + lam * (c1 - c0)) so lam = 0 / 1 give c0 / c1 exactly.
  return (lam * c1.astype(dtype) + (1 - lam) * c0.astype(dtype)).astype(c0.dtype)
