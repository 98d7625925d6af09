"""One parallel vocabulary: a device Mesh with axes 'seeds' x 'model', NamedSharding, jax.jit.

Batches of seeds (or images) are split over the 'seeds' axis. Large weights are split over the
'model' axis (FSDP-style, ``param_sharding.py``: the rule picks each kernel's largest divisible
axis), and jit inserts the gathers; lambda, the optimiser state and small leaves are
replicated. With a model axis of 1 (the default) every weight is replicated: plain data
parallelism. jit partitions the same single-device program (GSPMD), so batch-mean losses become
all-reduces without any per-device code. A batch that does not divide the seeds axis is padded
(repeating the last item) and masked, never dropped. Several processes (the hosts of a pod)
join with ``initialize_distributed``; the mesh then spans every process's devices (the model
axis may span processes too) and the same program runs unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from disentangle_jax import errors

SEEDS = "seeds"
MODEL = "model"


def make_mesh(devices: Sequence[jax.Device] | None = None, model: int = 1) -> Mesh:
  """A (seeds, model) mesh over ``devices`` (default: every device of every process).

  ``model`` devices hold the parts of one copy of the weights; the seeds axis gets the rest
  (len(devices) / model). Neighbouring devices of ``devices`` (the same process first, as
  ``jax.devices()`` lists them) share a model group, so the weight gathers stay within a host
  where they can. model = 1 is plain data parallelism.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(model, bool) or not isinstance(model, int) or model < 1:
    raise errors.UserError(f"mesh.model={model!r} must be an integer >= 1 (1 = every device "
                           "holds the whole model).")
  if len(devices) % model:
    raise errors.UserError(
        f"mesh.model={model} does not divide the {len(devices)} device(s): use a divisor of "
        f"{len(devices)} (devices per copy of the weights; 1 = no model sharding).")
  return Mesh(np.asarray(devices).reshape(len(devices) // model, model), (SEEDS, MODEL))


def model_size(mesh: Mesh) -> int:
  """Devices along the model axis (1 for a mesh without one)."""
  return dict(mesh.shape).get(MODEL, 1)


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


def _host_if_multiprocess(tree: Any) -> Any:
  # Several processes each place their part of a global array from identical host values.
  return jax.tree.map(np.asarray, tree) if jax.process_count() > 1 else tree


def replicate(tree: Any, mesh: Mesh) -> Any:
  return place(tree, replicated(mesh))


def place(tree: Any, shardings: Any) -> Any:
  """``tree`` put on the mesh with ``shardings`` (one NamedSharding, or a tree of them).

  Host values and arrays of this process are copied; a global array (several processes, e.g.
  computed with model-sharded weights) is resharded by a program, since its other parts live
  on other hosts."""
  leaves = jax.tree.leaves(tree)
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
    if isinstance(shardings, NamedSharding):
      shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)
  return jax.device_put(_host_if_multiprocess(tree), shardings)


def shard(x, mesh: Mesh, axis: int = 0):
  return jax.device_put(_host_if_multiprocess(x), batch_sharding(mesh, np.ndim(x), axis))


# ------------------------------------------------------------------------------------------
# Several processes (one per host of a pod, or several on one machine)

# Seconds between connection attempts while waiting for the coordinator.
_PROBE_INTERVAL_S = 0.5


def _split_address(coordinator: str) -> tuple[str, int]:
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator={coordinator!r} must be HOST:PORT (e.g. 10.0.0.2:8476, the "
                     "address of process 0), or 'auto' on a TPU pod.")
  return host, int(port)


_JOIN = b"disentangle-join "  # a peer's hello during the rendezvous: + its process id
_ACK = b"ok"


def wait_for_coordinator(coordinator: str, timeout_s: float, process_id: int = 1) -> None:
  """Waits until process 0 answers at HOST:PORT; a clear error after ``timeout_s`` seconds.

  jax.distributed aborts the whole process (no Python exception) when it cannot reach the
  coordinator, so processes other than 0 first join process 0's rendezvous (``gather_peers``).
  A server that answers anything else (JAX's coordination service, already running) counts
  as reached too.
  """
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415
  host, port = _split_address(coordinator)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=_PROBE_INTERVAL_S) as conn:
        conn.sendall(_JOIN + str(process_id).encode())
        conn.settimeout(max(1.0, _PROBE_INTERVAL_S))
        if conn.recv(16) is not None:  # "ok", another server's bytes, or closed: reached
          return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise errors.UserError(
            f"coordinator {coordinator} is unreachable after {timeout_s:g}s ({e}): start "
            "process 0 first on that host, check the address and port (and the firewall), or "
            "raise the timeout.") from None
      time.sleep(_PROBE_INTERVAL_S)


def gather_peers(coordinator: str, num_processes: int, timeout_s: float) -> None:
  """Process 0: waits on the coordinator's port until every other process has said hello
  (``wait_for_coordinator``), then frees the port for JAX's coordination service. A missing
  peer is a clear error after ``timeout_s`` seconds instead of JAX's abort."""
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415
  _, port = _split_address(coordinator)
  joined: set[int] = set()
  deadline = time.monotonic() + timeout_s
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      server.bind(("", port))
    except OSError as e:
      raise errors.UserError(f"coordinator port {port} cannot be opened on this host ({e}): "
                             "pick a free port in --coordinator.") from None
    server.listen(max(8, num_processes))
    while len(joined) < num_processes - 1:
      left = deadline - time.monotonic()
      if left <= 0:
        raise errors.UserError(
            f"only {len(joined)} of the {num_processes - 1} other processes joined within "
            f"{timeout_s:g}s (joined: {sorted(joined) or 'none'}): start every process with "
            "the same --coordinator and --num_processes and a distinct --process_id, or raise "
            "--init_timeout.")
      server.settimeout(min(left, _PROBE_INTERVAL_S))
      try:
        conn, _ = server.accept()
      except socket.timeout:
        continue
      with conn:
        conn.settimeout(_PROBE_INTERVAL_S)
        try:
          hello = conn.recv(64)
          if hello.startswith(_JOIN) and hello[len(_JOIN):].isdigit():
            joined.add(int(hello[len(_JOIN):]))
            conn.sendall(_ACK)
        except OSError:
          pass


def initialize_distributed(coordinator: str, num_processes: int, process_id: int,
                           timeout_s: float) -> None:
  """Joins a multi-process JAX run; afterwards ``jax.devices()`` lists every process's devices.

  Args:
    coordinator: HOST:PORT of process 0's coordination service; "auto" lets JAX detect it
      (TPU pods, SLURM); "" = a single process (nothing to do).
    num_processes: how many processes take part (ignored with "auto").
    process_id: this process's index in [0, num_processes) (ignored with "auto").
    timeout_s: seconds to wait for the coordinator and for every process to join.

  Call it before any other JAX work. Every process then runs the same program on the same
  inputs; arrays are global (``shard``/``replicate`` place each process's part) and only
  process 0 should write files.
  """
  if not coordinator:
    if num_processes not in (0, 1):
      raise ValueError(f"num_processes={num_processes} needs a coordinator: pass "
                       "--coordinator=HOST:PORT (process 0's address) or --coordinator=auto.")
    return
  if coordinator == "auto":
    jax.distributed.initialize(initialization_timeout=int(timeout_s))
    return
  _split_address(coordinator)
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"num_processes={num_processes!r} must be an integer >= 1.")
  if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id!r} must be in [0, {num_processes}) "
                     f"(num_processes={num_processes}).")
  if process_id != 0:
    wait_for_coordinator(coordinator, timeout_s, process_id)
  elif num_processes > 1:
    gather_peers(coordinator, num_processes, timeout_s)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=int(timeout_s))


def to_host(x) -> np.ndarray:
  """The whole global array ``x`` as numpy on every process (gathered across processes)."""
  if jax.process_count() == 1 or not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree(x: np.ndarray) -> np.ndarray:
  """Process 0's value of the host array ``x`` on every process (e.g. which files exist when
  the processes do not share a filesystem)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))
