"""The only place random numbers are drawn: the initial latent x_T and the per-step noise,
the inversion's target noise and VAE posterior keys, and the tiny models' random weights.

"Fixing every random number of the run" means drawing them once, up front, and feeding them to
the sampler as data. Each seed gets its own key, ``fold_in(base_key, seed)``, and its numbers are
drawn without reference to the batch it is in, so seed 7 gives the same x_T and noise alone, in a
batch of 64, or sharded over a pod.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class RunNoise(NamedTuple):
  """Every random number of a batch of sampling runs.

  Attributes:
    x_T: initial latents [B, H, W, C].
    noise: additive per-step noise [T, B, H, W, C] (sigma_i * z_i; zero for eta = 0).
  """

  x_T: jax.Array
  noise: jax.Array


def check_seeds(seeds: Sequence[int]) -> np.ndarray:
  """Validates a seed list (non-empty, integers, no duplicates); returns int64 [B]."""
  seeds = list(seeds)
  if not seeds:
    raise ValueError("seeds is empty: give at least one seed, e.g. --config.seeds=42.")
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
      raise ValueError(f"seeds contains {s!r}: seeds must be integers.")
    if not 0 <= int(s) < 2**31:
      raise ValueError(f"seed {s} is out of range: seeds must be in [0, 2**31).")
  dup = sorted({s for s in seeds if seeds.count(s) > 1})
  if dup:
    raise ValueError(f"seeds contains duplicates {dup}: each seed may appear once.")
  return np.asarray(seeds, dtype=np.int64)


def seed_key(base_key: jax.Array, seed) -> jax.Array:
  """The key of one seed; independent of batch and device layout."""
  return jax.random.fold_in(base_key, seed)


# fold_in tags of the per-seed key (seed_key). Not 0 or 1: with JAX's partitionable
# threefry, split(key)[i] == fold_in(key, i), and ``draw`` splits the same per-seed key.
TARGET_NOISE_STREAM = 0x696E76  # "inv": eps of the inversion's forward-noised targets
ENCODE_STREAM = 0x656E63  # "enc": the VAE posterior sample (when not using the posterior mean)


def target_noise(base_key: jax.Array, seeds, num_steps: int, latent_shape,
                 dtype=jnp.float32) -> jax.Array:
  """eps of the inversion's forward-noised targets, one independent draw per step and seed.

  Keyed by ``fold_in(seed_key(base_key, seed), TARGET_NOISE_STREAM)``: independent of the
  batch, the device layout and of the x_T / noise that ``draw`` gives the same seed.

  Returns:
    [T, B, H, W, C].
  """
  def one(seed):
    key = jax.random.fold_in(seed_key(base_key, seed), TARGET_NOISE_STREAM)
    return jax.random.normal(key, (num_steps,) + tuple(latent_shape), dtype)

  eps = jax.vmap(one)(jnp.asarray(seeds))
  return jnp.moveaxis(eps, 0, 1)


def encode_key(base_key: jax.Array, seed) -> jax.Array:
  """The key of a VAE posterior sample for ``seed`` (independent of every other stream)."""
  return jax.random.fold_in(seed_key(base_key, seed), ENCODE_STREAM)


def _draw_one(key, sigma, latent_shape, dtype):
  k_init, k_steps = jax.random.split(key)
  x_T = jax.random.normal(k_init, latent_shape, dtype)
  z = jax.random.normal(k_steps, (sigma.shape[0],) + tuple(latent_shape), dtype)
  noise = sigma.astype(dtype).reshape((-1,) + (1,) * len(latent_shape)) * z
  return x_T, noise


def draw(base_key: jax.Array, seeds, latent_shape: tuple[int, int, int], sigma,
         dtype=jnp.float32) -> RunNoise:
  """Draws x_T and the per-step noise for each seed.

  Args:
    base_key: the run's base PRNG key (from the config's rng_seed).
    seeds: int [B] (validate user input with ``check_seeds`` first).
    latent_shape: (H, W, C) of one latent.
    sigma: [T] per-step DDIM noise scale (``StepTables.sigma``); its length sets T.
    dtype: float dtype of the outputs.

  Returns:
    RunNoise with x_T [B, H, W, C] and noise [T, B, H, W, C].
  """
  seeds = jnp.asarray(seeds)
  sigma = jnp.asarray(sigma)
  keys = jax.vmap(lambda s: seed_key(base_key, s))(seeds)
  x_T, noise = jax.vmap(lambda k: _draw_one(k, sigma, tuple(latent_shape), dtype))(keys)
  return RunNoise(x_T=x_T, noise=jnp.moveaxis(noise, 0, 1))


def random_params(shape_tree, seed: Sequence[int]) -> dict:
  """Deterministic random params for ``shape_tree`` (float32 numpy), drawn in sorted path order.

  Kernels ~ N(0, 1/fan_in) (LeCun, as Flax's default), embeddings ~ N(0, 0.02^2), biases
  ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2): random everywhere, so a test notices any
  misplaced parameter. Numpy instead of the modules' jitted init, whose compile takes ~10 s.
  """
  rng = np.random.default_rng(seed)
  flat = _flatten(shape_tree)
  out = {}
  for path in sorted(flat):
    shape, leaf = tuple(flat[path].shape), path[-1]
    z = rng.standard_normal(shape, dtype=np.float32)
    if leaf == "kernel":
      z /= np.sqrt(max(int(np.prod(shape[:-1])), 1))
    elif leaf == "embedding":
      z *= 0.02
    elif leaf == "scale":
      z = 1 + 0.1 * z
    else:
      z *= 0.1
    out[path] = z
  return _unflatten(out)


def normal_arrays(seed: Sequence[int], specs: Sequence[tuple[float, tuple[int, ...]]]
                  ) -> list[np.ndarray]:
  """float64 numpy arrays N(0, std^2), one per (std, shape) in ``specs``, drawn in order from one
  stream seeded by ``seed`` (the tiny loss networks' weights)."""
  rng = np.random.default_rng(list(seed))
  return [rng.normal(0.0, std, shape) for std, shape in specs]


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
  """{"a": {"b": leaf}} -> {("a", "b"): leaf} (flax.traverse_util.flatten_dict's keys)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
