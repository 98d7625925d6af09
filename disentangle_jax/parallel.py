"""One parallel vocabulary: a device Mesh with a 'seeds' axis, NamedSharding, jax.jit.

Batches of seeds (or images) are split over the 'seeds' axis; weights and lambda are
replicated. jit partitions the same single-device program (GSPMD), so batch-mean losses become
all-reduces without any per-device code. A batch that does not divide the device count is
padded (repeating the last item) and masked, never dropped.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SEEDS = "seeds"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (SEEDS,))


def padded_size(n: int, mesh: Mesh) -> int:
  k = mesh.shape[SEEDS]
  return -(-n // k) * k


def pad_batch(x, size: int, axis: int = 0):
  """Pads axis ``axis`` to ``size`` by repeating the last entry."""
  n = x.shape[axis]
  if n == size:
    return x
  idx = np.concatenate([np.arange(n), np.full(size - n, n - 1)])
  return jnp.take(x, idx, axis=axis)


def mask(n: int, size: int) -> np.ndarray:
  """float32 [size]: 1 for the n real items, 0 for padding."""
  return (np.arange(size) < n).astype(np.float32)


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Shards dimension ``axis`` of an ndim-array over the 'seeds' axis."""
  spec = [None] * ndim
  spec[axis] = SEEDS
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def shard(x, mesh: Mesh, axis: int = 0):
  return jax.device_put(x, batch_sharding(mesh, np.ndim(x), axis))
