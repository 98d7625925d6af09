"""The finding of docs/METHOD.md section 1 as a library function: a grid of hard switches.

For each seed (a row) render [pure c0 | switch to c1 after T* steps, for each T* | pure c1]
from the same x_T and noise. All columns of a seed are one batch of the compiled sampler.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors, mixing, noise, pipeline, schedule
from disentangle_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """What to render (validated on construction; every error names the config field)."""

  prompt: str
  attribute: str
  seeds: tuple[int, ...]
  t_stars: tuple[int, ...]
  sampling: SamplingConfig = SamplingConfig()
  lambda_late: float = 1.0
  batch_size: int = 8
  # Extra columns: (label, lambda [T]) pairs, e.g. weights learned by launch.disentangle.
  learned: tuple[tuple[str, tuple[float, ...]], ...] = ()

  def __post_init__(self):
    num_steps = self.sampling.num_steps
    noise.check_seeds(self.seeds)
    for t in self.t_stars:
      mixing.check_t_star(num_steps, t)
    errors.check_number("lambda_late", self.lambda_late, hint="1.0-1.2 in the paper.")
    for label, lam in self.learned:
      mixing.check_lambda(lam, num_steps, name=f"lambda of column {label!r}")
    names = [file_label(label) for label, _ in self.columns()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise errors.UserError(f"grid columns {dup} appear twice (t_stars repeated, or a lambda "
                             "file named like a built-in column): output names must be unique.")
    errors.check_number("batch_size", self.batch_size, low=1, integer=True)
    if not self.prompt.strip():
      raise ValueError("prompt is empty: give the neutral prompt c0, e.g. 'A photo of person'.")
    if not self.attribute.strip():
      raise ValueError("attribute is empty: give the text appended to the prompt to make c1, "
                       "e.g. ', smiling'.")

  @property
  def target_prompt(self) -> str:
    return self.prompt + self.attribute

  def columns(self) -> list[tuple[str, np.ndarray]]:
    """(label, lambda [T]) for each grid column."""
    num_steps = self.sampling.num_steps
    cols = [("c0", mixing.constant(num_steps, 0.0))]
    cols += [(f"T*={t}", mixing.hard_switch(num_steps, t, self.lambda_late))
             for t in self.t_stars]
    cols.append(("c1", mixing.constant(num_steps, 1.0)))
    cols += [(label, np.asarray(lam, np.float32)) for label, lam in self.learned]
    return cols


def load_columns(paths, num_steps: int, sampler_kind: str,
                 reserved: Sequence[str] = ()) -> tuple[tuple[str, tuple], ...]:
  """Grid columns from lambda files: exported weights files (checked against the run's step
  count and sampler) or plain lists (.json/.npy/.txt, length-checked). Labels are the file
  names, made distinct from each other and from ``reserved`` (weights_file.unique_labels)."""
  from disentangle_jax import weights_file  # noqa: PLC0415
  labels = weights_file.unique_labels(paths, reserved, key=file_label)
  cols = []
  for path, label in zip(paths, labels):
    try:
      weights = weights_file.read(path)
    except errors.NotAWeightsFile:
      lam = mixing.load(path, num_steps)
    else:
      lam = weights_file.check_compatible(weights, num_steps, sampler_kind,
                                          source=f"weights file {path!r}")
    cols.append((label, tuple(float(v) for v in lam)))
  return tuple(cols)


def builtin_labels(t_stars: Sequence[int]) -> tuple[str, ...]:
  """Labels of the built-in columns: pure c0, each hard switch, pure c1."""
  return ("c0",) + tuple(f"T*={t}" for t in t_stars) + ("c1",)


def file_label(label: str) -> str:
  """A column label as a file name part ("T*=10" -> "T10")."""
  return label.replace("*=", "")


def run(render_fn: Callable, params, prompts: pipeline.PromptPair, spec: GridSpec,
        latent_shape: tuple[int, int, int], schedule_cfg: schedule.ScheduleConfig,
        log: Callable[[str], None] = print) -> np.ndarray:
  """Renders the grid; returns float images [S, K, h, w, 3] (S seeds, K columns).

  ``render_fn`` is ``pipeline.make_render_fn(...)`` for the spec's sampler.
  """
  tables = spec.sampling.tables(schedule_cfg)
  run_noise = noise.draw(jax.random.key(spec.sampling.rng_seed), np.asarray(spec.seeds),
                         latent_shape, tables.sigma)
  cols = spec.columns()
  lam_cols = np.stack([lam for _, lam in cols], axis=1)  # [T, K]
  jobs = [(s, k) for s in range(len(spec.seeds)) for k in range(len(cols))]
  out = [None] * len(jobs)
  start = time.perf_counter()
  for b0 in range(0, len(jobs), spec.batch_size):
    chunk = jobs[b0:b0 + spec.batch_size]
    pad = spec.batch_size - len(chunk)  # pad the last batch so every call has one shape
    idx = chunk + [chunk[-1]] * pad
    seeds_idx = np.asarray([s for s, _ in idx])
    x_T = run_noise.x_T[seeds_idx]
    nz = run_noise.noise[:, seeds_idx]
    lam = jnp.asarray(lam_cols[:, [k for _, k in idx]])
    images = np.asarray(render_fn(params, x_T, nz, lam, prompts, spec.sampling.guidance,
                                  tables))
    for j, job in enumerate(chunk):
      out[b0 + j] = images[j]
    done = b0 + len(chunk)
    elapsed = time.perf_counter() - start
    log(f"rendered {done}/{len(jobs)} images, {elapsed:.1f}s elapsed, "
        f"ETA {elapsed / done * (len(jobs) - done):.1f}s")
  grid = np.stack(out).reshape((len(spec.seeds), len(cols)) + out[0].shape)
  return grid
