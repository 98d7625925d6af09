"""Which part of each weight a device holds: FSDP-style sharding over the mesh's 'model' axis.

The rule, per leaf of a weight tree (UNet, VAE, text encoders, CLIP, VGG, any params tree):

  - fewer than ``MIN_SHARDED_SIZE`` elements (biases, norm scales, small projections):
    replicated, P();
  - otherwise its largest axis that the model axis divides is split over 'model'
    (the last such axis on a tie: a kernel's output features), e.g. a conv kernel
    [3, 3, 320, 640] -> P(None, None, None, 'model');
  - no divisible axis: replicated.

Each device then holds 1/model of every large weight; jax.jit (GSPMD) inserts the all-gathers
where a layer needs the whole weight, and the program's own code is unchanged. Activations are
not constrained: the batch stays split over 'seeds' and XLA's sharding propagation decides the
rest (benchmarks/memory_sharded.py shows the per-device result). A mesh whose model axis is 1
replicates every leaf: exactly plain data parallelism.

Nothing here depends on the model family: the rule reads only shapes, so new weight trees
(flow transformers, other loss networks) need no table.

Loading with a model axis (``models.load(config, mesh)``, ``load_loss_models(..., mesh=mesh)``)
puts each leaf straight from host memory onto its sharding (``put``): a device receives only
its own slices, so no device ever holds a whole model, and with several processes each fills
only the devices it addresses.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from disentangle_jax import parallel

# Leaves below this many elements stay replicated: their gather would cost a collective's
# latency for a few KiB. In SD 1.5's UNet that keeps 1.4 MiB of 3.2 GiB replicated (norm scales,
# most biases), in SDXL's 3.5 MiB of 9.6 GiB; every kernel (>= 11,520 elements) is split. The
# tiny test models' kernels are above it too, so the tests exercise the split.
MIN_SHARDED_SIZE = 4096


def leaf_spec(shape: tuple[int, ...], model: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """The PartitionSpec of one weight of ``shape`` on a model axis of ``model`` devices."""
  if model == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  divisible = [i for i, n in enumerate(shape) if n % model == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: (shape[i], i))  # the largest; the last on a tie
  spec = [None] * len(shape)
  spec[axis] = parallel.MODEL
  return P(*spec)


def specs(tree: Any, model: int, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """A PartitionSpec per leaf of ``tree`` (arrays or jax.ShapeDtypeStruct)."""
  return jax.tree.map(lambda x: leaf_spec(tuple(np.shape(x)), model, min_size), tree)


def shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """A NamedSharding per leaf of ``tree`` on ``mesh`` (replicated over 'seeds')."""
  model = parallel.model_size(mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs(tree, model, min_size),
                      is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """``tree`` (weights) on ``mesh``, each large leaf split over 'model' by the rule; the tree
  itself when every leaf is already placed so (loaded onto the mesh: ``put``), with no copy
  and no resharding program."""
  targets = shardings(tree, mesh, min_size)
  if all(_placed(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(targets))):
    return tree
  return parallel.place(tree, targets)


def _placed(x, sharding: NamedSharding) -> bool:
  return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)


def put(tree: Any, mesh: Mesh | None = None, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """Host (numpy) weights onto devices. Without a model axis (``mesh`` None or its model axis
  1): jax.device_put, whole on the default device, as the loaders always did (the programs
  replicate what they use). With one: each leaf straight onto its NamedSharding of the rule
  (``shardings``), built from the slices each device holds (jax.make_array_from_callback asks
  for one index per addressable device), so no device receives a whole split leaf, and each
  process of a multi-process mesh transfers only its own devices' slices."""
  if mesh is None or parallel.model_size(mesh) == 1:
    return jax.device_put(tree)

  def leaf(host, sharding):
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(leaf, tree, shardings(tree, mesh, min_size))


def bytes_per_device(tree: Any, model: int, min_size: int = MIN_SHARDED_SIZE) -> tuple[int, int]:
  """(replicated bytes, split bytes / model): what one device holds of ``tree`` under the rule
  (arrays or jax.ShapeDtypeStruct)."""
  replicated, split = 0, 0
  for leaf in jax.tree.leaves(tree):
    nbytes = int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    if leaf_spec(tuple(np.shape(leaf)), model, min_size) == P():
      replicated += nbytes
    else:
      split += nbytes // model
  return replicated, split


def place_weights(bundle, mesh: Mesh):
  """A loaded model or loss-network bundle (a NamedTuple with ``params``: models.
  StableDiffusion, loss_models.LossModels) with every weight placed by the rule, the text
  encoders included; unchanged when the model axis is 1 (the weights stay where they were
  loaded, and the programs replicate the ones they use, as without a model axis), and when
  the bundle was loaded onto this mesh (``put``: the programs load so).

  A bundle loaded without the mesh holds every weight whole on the first device, and this
  then splits it: that device holds the whole model once (tests, notebooks)."""
  if parallel.model_size(mesh) == 1:
    return bundle
  return bundle._replace(params=place(bundle.params, mesh))
