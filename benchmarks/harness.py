"""Measurement harness shared by the benchmark scripts: machine report, timing, tables.

Benchmarks run on shared, noisy machines, so every script measures the things it compares in
one process, interleaves their repeats (round-robin, so a burst of background load hits all of
them alike) and reports medians after a warm-up call plus ratios.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_repo_to_path() -> None:
  """Makes ``import disentangle_jax`` work when a script runs as ``python benchmarks/x.py``."""
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def quiet_libraries() -> None:
  """Silences diffusers' per-trace Flax deprecation logs (set before importing them)."""
  os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _version(module_name: str) -> str:
  try:
    module = __import__(module_name)
  except ImportError:
    return "not installed"
  return getattr(module, "__version__", "?")


def machine_report() -> str:
  """A markdown block naming the machine, the devices and the library versions."""
  import jax  # pylint: disable=g-import-not-at-top
  uname = platform.uname()
  cpu = platform.processor() or uname.machine
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
  versions = ", ".join(f"{m} {_version(m)}" for m in (
      "jax", "jaxlib", "flax", "diffusers", "transformers", "torch", "numpy"))
  lines = [
      f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- machine: {uname.system} {uname.release} {uname.machine}; cpu: {cpu}",
      f"- cpu count: {os.cpu_count()} (usable: {affinity}); load average: "
      f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}",
      f"- python {platform.python_version()}; {versions}",
      f"- jax devices: {jax.devices()} (backend {jax.default_backend()})",
      f"- command: {' '.join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])}",
  ]
  return "\n".join(lines)


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of ``fn`` (which must block until its result is ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
  """Times each function ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

  Returns {name: sorted list of seconds}; take ``statistics.median`` of it.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return {name: sorted(ts) for name, ts in times.items()}


def median(values: Sequence[float]) -> float:
  return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub markdown table; floats are printed with 3 significant digits."""
  def cell(v):
    if isinstance(v, float) and v != v:  # NaN: not measured
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
  out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(out)


def tree_nbytes(tree) -> int:
  """Bytes of an array tree's leaves (arrays or jax.ShapeDtypeStruct: nothing is allocated)."""
  import jax  # noqa: PLC0415 -- harness is imported before jax's flags are set
  import numpy as np  # noqa: PLC0415
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def with_shardings(tree, shardings):
  """The abstract arrays (jax.ShapeDtypeStruct) of ``tree`` placed with ``shardings`` (a tree of
  the same structure): what lower() compiles a sharded program for without allocating."""
  import jax  # noqa: PLC0415
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def compile_on_mesh(update, state, params, problem, mesh):
  """Compiles ``update(state, params, problem)`` for abstract arguments on ``mesh``: the weights
  split by param_sharding's rule, the optimiser state and the problem replicated. Returns the
  compiled memory analysis, wall seconds and CPU seconds of the compilation."""
  import jax  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415
  from disentangle_jax import param_sharding  # noqa: PLC0415
  replicated = NamedSharding(mesh, PartitionSpec())
  args = (with_shardings(state, jax.tree.map(lambda _: replicated, state)),
          with_shardings(params, param_sharding.shardings(params, mesh)),
          with_shardings(problem, jax.tree.map(lambda _: replicated, problem)))
  start, cpu_start = time.perf_counter(), time.process_time()
  compiled = update.lower(*args).compile()
  return (compiled.memory_analysis(), time.perf_counter() - start,
          time.process_time() - cpu_start)


def gib(num_bytes: float) -> float:
  return num_bytes / 2**30
