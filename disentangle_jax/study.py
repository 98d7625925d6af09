"""The transfer study: how well does each lambda schedule edit many attributes and seeds?

Sources (learned weights files and baseline schedules) x attributes (prompt pairs) x seeds.
The unit of work is one (attribute, seed): its pure-c0 image is rendered once, beside one
edited image per source, from the same x_T and noise; each (source, attribute, seed) item
gets the metrics of ``metrics.py``.

Exactly once and resumable: units are processed in fixed chunks of ``batch_size`` units, one
compiled call each (padded to the device count and masked). A finished chunk's rows are
written atomically as rows/chunk_NNNNN.jsonl (the chunk's commit marker; its sample images are
written before it), and a restart skips every chunk whose file exists. ``merge_rows`` then
gathers the final table in a fixed order, so a killed-and-restarted study ends with the same
rows, each exactly once, as an uninterrupted one.

Shapes: U units per chunk (padded), K sources, T steps, L tokens, D embedding width,
E CLIP width, H W C latents, h w image size.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import images, losses, metrics, mixing, noise, parallel, pipeline, sampler
from disentangle_jax import errors, run_identity, schedule, workdir

ROWS_DIR = "rows"
SAMPLES_DIR = "samples"
MANIFEST = "study.json"
# Two-sided 95% normal quantile, for the interval mean +- Z_95 * std / sqrt(n).
Z_95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class Source:
  """One lambda schedule under study: a label and lambda [T] (weight on the target)."""

  label: str
  lam: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Attribute:
  """One edit: c0 = prompt, c1 = prompt + attribute; ``name`` labels rows and files."""

  name: str
  prompt: str
  attribute: str

  @property
  def target_prompt(self) -> str:
    return self.prompt + self.attribute


@dataclasses.dataclass(frozen=True)
class StudySpec:
  """Everything that determines a study's rows (validated; errors name the config field)."""

  sources: tuple[Source, ...]
  attributes: tuple[Attribute, ...]
  seeds: tuple[int, ...]
  num_steps: int = 50
  sampler: str = "ddim"
  eta: float = 0.0
  guidance: float = 7.5
  rng_seed: int = 0
  batch_size: int = 4  # units (attribute, seed) per compiled call = per chunk
  preprocess: str = "standard"  # CLIP preprocessing of the metrics
  grid_seeds: int = 4  # sample images are kept for this many seeds (the first ones)
  # Real-image mode: the units' "seeds" are indices into these image files, each inverted
  # (DDIM, under the attribute's c0) instead of drawn from noise.
  images: tuple[str, ...] = ()
  inject_steps: int = 33  # inversion residuals injected in the first K steps
  pin: str = "next"  # inversion target: "next" (correct) | "current" (the release's)

  def __post_init__(self):
    if self.images:
      if tuple(self.seeds) != tuple(range(len(self.images))):
        raise ValueError("with images, seeds must be their indices 0..N-1 (set by the launcher).")
      if self.sampler != "ddim" or self.eta != 0:
        raise ValueError(f"sampler={self.sampler!r}, eta={self.eta}: real images are inverted "
                         "with DDIM (eta = 0); set sampler='ddim' and eta=0.")
    sampler.check_settings(self.num_steps, self.sampler, self.eta, self.guidance)
    noise.check_seeds(self.seeds)
    if not self.sources:
      raise ValueError("the study has no sources: give weights_files and/or t_stars "
                       "(or include_c1=True).")
    labels = [file_label(s.label) for s in self.sources] + ["c0"]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
      raise ValueError(f"source labels {dup} appear twice: weights files need distinct file "
                       "names.")
    for s in self.sources:
      mixing.check_lambda(s.lam, self.num_steps, name=f"lambda of source {s.label!r}")
    if not self.attributes:
      raise ValueError("attributes is empty: name at least one preset, e.g. "
                       "--config.attributes=smile.")
    names = [a.name for a in self.attributes]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
      raise ValueError(f"attributes {dup} appear twice: list each attribute once.")
    for a in self.attributes:
      if not a.prompt.strip() or not a.attribute.strip():
        raise ValueError(f"attribute {a.name!r} needs a non-empty prompt and attribute.")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1.")
    if self.grid_seeds < 0:
      raise ValueError(f"grid_seeds={self.grid_seeds} must be >= 0.")
    if self.preprocess not in losses.PREPROCESS_MODES:
      raise ValueError(f"preprocess={self.preprocess!r} is unknown; use one of "
                       f"{losses.PREPROCESS_MODES}.")

  @property
  def units(self) -> list[tuple[int, int]]:
    """(attribute index, seed) of every unit, attribute-major: the fixed processing order."""
    return [(a, int(s)) for a in range(len(self.attributes)) for s in self.seeds]

  @property
  def num_chunks(self) -> int:
    return -(-len(self.units) // self.batch_size)

  def chunk(self, index: int) -> list[tuple[int, int]]:
    return self.units[index * self.batch_size:(index + 1) * self.batch_size]

  @property
  def num_items(self) -> int:
    return len(self.units) * len(self.sources)

  def fingerprint(self) -> str:
    """A hash of the spec: rows of a different study must never be mixed in."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def baseline_sources(num_steps: int, t_stars: Sequence[int], lambda_late: float = 1.0,
                     include_c1: bool = True) -> tuple[Source, ...]:
  """Hard switches after each T* ("T*=k") and, optionally, pure c1 ("c1")."""
  out = [Source(f"T*={t}", tuple(float(v) for v in mixing.hard_switch(num_steps, t, lambda_late)))
         for t in t_stars]
  if include_c1:
    out.append(Source("c1", tuple(float(v) for v in mixing.constant(num_steps, 1.0))))
  return tuple(out)


def load_sources(paths: Sequence[str], num_steps: int, sampler_kind: str,
                 reserved: Sequence[str] = ()) -> tuple[Source, ...]:
  """Sources from exported weights files, each checked against the step count and sampler;
  labels are the file names, made distinct from each other and from ``reserved`` (the
  baselines' labels) by weights_file.unique_labels."""
  from disentangle_jax import weights_file  # noqa: PLC0415
  labels = weights_file.unique_labels(paths, reserved, key=file_label)
  out = []
  for path, label in zip(paths, labels):
    lam = weights_file.check_compatible(weights_file.read(path), num_steps, sampler_kind,
                                        source=f"weights file {path!r}")
    out.append(Source(label, tuple(float(v) for v in lam)))
  return tuple(out)


class StudyInputs(NamedTuple):
  """The traced inputs shared by every chunk (replicated over the mesh).

  Attributes:
    params: {"sd": {"unet", "vae"}, "clip", "vgg"}.
    c0, c1: [A, L, D] SD text embeddings of each attribute's prompts; uncond: [L, D].
    text0, text1: [A, E] CLIP text features of each attribute's prompts.
    lam: [T, 1 + K] column 0 = pure c0 (the original), then one column per source.
    guidance: [] CFG scale.
    tables: schedule.StepTables of T steps.
  """

  params: dict
  c0: jax.Array
  c1: jax.Array
  uncond: jax.Array
  text0: jax.Array
  text1: jax.Array
  lam: jax.Array
  guidance: jax.Array
  tables: schedule.StepTables


def prepare(model, loss_models, spec: StudySpec, mesh) -> StudyInputs:
  """Encodes every attribute's prompts once and replicates all shared inputs over ``mesh``."""
  from disentangle_jax import loss_models as loss_models_lib  # noqa: PLC0415
  from disentangle_jax import models  # noqa: PLC0415
  texts = [p for a in spec.attributes for p in (a.prompt, a.target_prompt)]
  emb = models.encode_prompts(model, texts + [""])
  feats = loss_models_lib.encode_texts(loss_models, texts)
  lam = np.stack([mixing.constant(spec.num_steps, 0.0)] +
                 [np.asarray(s.lam, np.float32) for s in spec.sources], axis=1)
  tables = schedule.step_tables(model.schedule, spec.num_steps, spec.eta)
  return parallel.replicate(StudyInputs(
      params={"sd": {"unet": model.params["unet"], "vae": model.params["vae"]},
              "clip": loss_models.params["clip"], "vgg": loss_models.params["vgg"]},
      c0=emb[0:-1:2], c1=emb[1:-1:2], uncond=emb[-1], text0=feats[0::2], text1=feats[1::2],
      lam=jnp.asarray(lam), guidance=jnp.asarray(spec.guidance, jnp.float32),
      tables=schedule.StepTables(*(jnp.asarray(t) for t in tables))), mesh)


def _repeat_units(a: jax.Array, axis: int, times: int) -> jax.Array:
  """Repeats each entry of axis ``axis`` ``times`` times, unit-major ([.., U, ..] ->
  [.., U * times, ..]): each device keeps whole units, so no data crosses devices."""
  shape = a.shape[:axis + 1] + (times,) + a.shape[axis + 1:]
  return jnp.broadcast_to(jnp.expand_dims(a, axis + 1), shape).reshape(
      a.shape[:axis] + (a.shape[axis] * times,) + a.shape[axis + 1:])


def evaluate_units(inputs: StudyInputs, attr: jax.Array, x_T: jax.Array, run_noise: jax.Array, *,
                   eps_fn: Callable, decode_fn: Callable, sampler_cfg: sampler.SamplerConfig,
                   nets: metrics.MetricNets) -> tuple[dict[str, jax.Array], jax.Array]:
  """Renders and scores a batch of units.

  Args:
    inputs: the shared inputs (``prepare``).
    attr: int [U] attribute index of each unit.
    x_T: [U, H, W, C]; run_noise: [T, U, H, W, C] (noise.draw for each unit's seed).

  Returns:
    ({metric: [U, K]}, images [U, 1 + K, h, w, 3]) with column 0 the original.
  """
  u, cols = x_T.shape[0], inputs.lam.shape[1]
  if attr.shape != (u,) or run_noise.shape[1] != u:
    raise ValueError(f"attr {tuple(attr.shape)}, x_T {tuple(x_T.shape)} and run_noise "
                     f"{tuple(run_noise.shape)} must share the unit count U = {u}.")
  k = cols - 1
  rep = functools.partial(_repeat_units, times=cols)
  lam = jnp.tile(inputs.lam, (1, u))  # [T, U * (1 + K)], unit-major
  prompts = pipeline.PromptPair(rep(inputs.c0[attr], 0), rep(inputs.c1[attr], 0), inputs.uncond)
  images = pipeline.render(eps_fn, decode_fn, inputs.params["sd"], rep(x_T, 0),
                           rep(run_noise, 1), lam, prompts, inputs.guidance, inputs.tables,
                           sampler_cfg)
  images = images.reshape((u, cols) + images.shape[1:])
  flat = lambda a: a.reshape((u * k,) + a.shape[2:])  # noqa: E731
  original = jnp.broadcast_to(images[:, :1], (u, k) + images.shape[2:])
  text0 = jnp.broadcast_to(inputs.text0[attr][:, None], (u, k, inputs.text0.shape[-1]))
  text1 = jnp.broadcast_to(inputs.text1[attr][:, None], (u, k, inputs.text1.shape[-1]))
  values = metrics.item_metrics(nets, {"clip": inputs.params["clip"], "vgg": inputs.params["vgg"]},
                                flat(original), flat(images[:, 1:]), flat(text0), flat(text1))
  return {name: v.reshape((u, k)) for name, v in values.items()}, images


def make_evaluate_fn(eps_fn: Callable, decode_fn: Callable, sampler_cfg: sampler.SamplerConfig,
                     nets: metrics.MetricNets) -> Callable:
  """The jitted ``evaluate(inputs, attr, x_T, run_noise)``: only static functions are bound."""
  return jax.jit(functools.partial(evaluate_units, eps_fn=eps_fn, decode_fn=decode_fn,
                                   sampler_cfg=sampler_cfg, nets=nets))


# ------------------------------------------------------------------------------------------
# Running chunks, resumably


def chunk_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, ROWS_DIR, f"chunk_{index:05d}.jsonl")


def file_label(label: str) -> str:
  """A source label as a file name part ("T*=10" -> "T10")."""
  return label.replace("*=", "")


def sample_path(out_dir: str, attribute: str, seed: int, label: str) -> str:
  return os.path.join(out_dir, SAMPLES_DIR, attribute, f"seed{seed}_{file_label(label)}.png")


def check_manifest(out_dir: str, spec: StudySpec, identity: dict | None = None) -> None:
  """Refuses a workdir holding rows of a different study; records this study's identity.

  ``identity`` (run_identity.of_config) adds what the spec does not hold: the model and loss
  models (and their files' contents), image size, dtype. The spec's own fields are part of it.
  """
  path = os.path.join(out_dir, ROWS_DIR, MANIFEST)
  current = run_identity.flatten({"spec": dataclasses.asdict(spec)}) | dict(identity or {})
  fix = (f"use a new --workdir (or delete {os.path.join(out_dir, ROWS_DIR)!r} to start the "
         "study over)")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f)
      saved["fingerprint"]  # noqa: B018 -- a manifest without it is damaged
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.UserError(f"the study manifest {path!r} is damaged ({e}): {fix}.") from None
    if "identity" in saved:
      run_identity.check(saved["identity"], current,
                         f"workdir {out_dir!r} holds rows of a different study; its manifest", fix)
    elif saved["fingerprint"] != spec.fingerprint():
      raise errors.RunMismatch(f"workdir {out_dir!r} holds rows of a different study: {fix}.")
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir.write_atomic(path, json.dumps({"fingerprint": spec.fingerprint(),
                                         "spec": dataclasses.asdict(spec),
                                         "identity": current}, indent=2))


def read_chunk(path: str, spec: StudySpec, index: int) -> list[dict[str, Any]] | None:
  """The rows of a finished chunk, or None when its file is missing or damaged (edited,
  truncated, rows of other units): such a chunk is computed again."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    keys = [(r["source"], r["attribute"], r["seed"]) for r in rows]
    values_ok = all(isinstance(r[m], float) for r in rows for m in metrics.METRIC_NAMES)
  except (OSError, ValueError, KeyError, TypeError):
    return None
  expected = [(src.label, spec.attributes[a].name, seed) for a, seed in spec.chunk(index)
              for src in spec.sources]
  return rows if keys == expected and values_ok else None


def _png(array: np.ndarray) -> bytes:
  import io  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def chunk_rows(spec: StudySpec, units: Sequence[tuple[int, int]],
               values: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """The rows of one chunk's real units; ``values`` are [U_padded, K]: padding is masked out."""
  rows = []
  for j, (a, seed) in enumerate(units):
    for k, src in enumerate(spec.sources):
      row = {"source": src.label, "attribute": spec.attributes[a].name, "seed": seed}
      if spec.images:
        row["image"] = os.path.basename(spec.images[seed])
      row.update({name: float(values[name][j, k]) for name in metrics.METRIC_NAMES})
      rows.append(row)
  return rows


def image_inputs(inverter, sd_params, pixels, inputs: StudyInputs, spec: StudySpec,
                 sched: schedule.ScheduleConfig) -> Callable:
  """Real-image mode's ``unit_inputs`` for ``run``: (attribute, image index) units ->
  RunNoise, each image inverted under its attribute's c0 (inversion.invert_images).

  pixels: [N, h, w, 3] in [0, 1], the study's images fitted to the model's size.
  """
  from disentangle_jax import inversion  # noqa: PLC0415
  config = inversion.InversionConfig(num_steps=spec.num_steps, inject_steps=spec.inject_steps,
                                     pin=spec.pin, guidance=spec.guidance)
  c0, uncond = parallel.to_host(inputs.c0), parallel.to_host(inputs.uncond)

  def unit_inputs(units) -> noise.RunNoise:
    found = {}
    for a in sorted({a for a, _ in units}):
      idx = sorted({i for aa, i in units if aa == a})  # padding repeats units: invert once
      inv = inversion.invert_images(inverter, sd_params, pixels[idx], c0[a], uncond, idx,
                                    config, sched, spec.rng_seed)
      for j, i in enumerate(idx):
        found[(a, i)] = (inv.run.x_T[j], inv.run.noise[:, j])
    return noise.RunNoise(x_T=jnp.stack([found[u][0] for u in units]),
                          noise=jnp.stack([found[u][1] for u in units], axis=1))

  return unit_inputs


def run(evaluate: Callable, inputs: StudyInputs, spec: StudySpec, latent_shape, mesh,
        out_dir: str, log: Callable[[str], None] = print, write: bool = True,
        unit_inputs: Callable | None = None) -> int:
  """Processes every chunk without a rows file; returns the number of chunks computed.

  ``write``: whether this process writes files (process 0 of a multi-host run); every process
  must still call ``evaluate`` on every chunk, since the computation is global.
  ``unit_inputs(units) -> RunNoise``: x_T and noise of (attribute, seed) units; default: drawn
  from the seeds (noise.draw); real images: ``image_inputs``.
  """
  size = parallel.padded_size(spec.batch_size, mesh)
  labels = ["c0"] + [s.label for s in spec.sources]
  sigma = parallel.to_host(inputs.tables.sigma)
  grid_seeds = set(spec.seeds[:spec.grid_seeds])
  # Process 0's files decide (hosts of a pod need not share a filesystem).
  present = [os.path.isfile(chunk_path(out_dir, i)) for i in range(spec.num_chunks)]
  valid = [read_chunk(chunk_path(out_dir, i), spec, i) is not None for i in range(spec.num_chunks)]
  for i in range(spec.num_chunks):
    if present[i] and not valid[i] and write:
      log(f"{chunk_path(out_dir, i)} is damaged (not the rows this study writes): computing "
          "that chunk again")
  finished = parallel.agree(np.asarray(valid))
  todo = [i for i in range(spec.num_chunks) if not finished[i]]
  if write:
    os.makedirs(os.path.join(out_dir, ROWS_DIR), exist_ok=True)
  done_items = len(spec.sources) * sum(
      len(spec.chunk(i)) for i in range(spec.num_chunks) if i not in todo)
  log(f"{spec.num_items} items ({len(spec.sources)} sources x {len(spec.attributes)} attributes "
      f"x {len(spec.seeds)} seeds) in {spec.num_chunks} chunks; {len(todo)} to do, "
      f"{mesh.size} device(s), batch {spec.batch_size} padded to {size}")
  # The rate counts from the end of the first computed chunk, so it excludes compilation.
  start, computed, first_done = time.perf_counter(), 0, done_items
  for index in todo:
    units = spec.chunk(index)
    padded = units + [units[-1]] * (size - len(units))
    if unit_inputs is None:
      drawn = noise.draw(jax.random.key(spec.rng_seed), np.asarray([s for _, s in padded]),
                         latent_shape, sigma)
    else:
      drawn = unit_inputs(padded)
    values, rendered = evaluate(inputs, parallel.shard(np.asarray([a for a, _ in padded]), mesh),
                                parallel.shard(np.asarray(drawn.x_T), mesh),
                                parallel.shard(np.asarray(drawn.noise), mesh, axis=1))
    keep = parallel.mask(len(units), size) > 0  # padding is computed, never reported
    values = {k: parallel.to_host(v)[keep] for k, v in values.items()}
    samples = [j for j, (_, seed) in enumerate(units) if seed in grid_seeds]
    pixels = images.to_uint8(parallel.to_host(rendered)) if samples else None
    if write:
      for j in samples:
        a, seed = units[j]
        for c, label in enumerate(labels):
          path = sample_path(out_dir, spec.attributes[a].name, seed, label)
          os.makedirs(os.path.dirname(path), exist_ok=True)
          workdir.write_atomic(path, _png(pixels[j, c]))
      rows = chunk_rows(spec, units, values)
      workdir.write_atomic(chunk_path(out_dir, index),
                    "".join(json.dumps(r) + "\n" for r in rows).encode())
    computed += 1
    done_items += len(units) * len(spec.sources)
    now = time.perf_counter()
    if computed == 1:  # includes compilation; later chunks are timed from here
      rate = (done_items - first_done) / (now - start)
      start, first_done = now, done_items
    else:
      rate = (done_items - first_done) / (now - start)
    log(f"chunk {index + 1}/{spec.num_chunks} done: {done_items}/{spec.num_items} items, "
        f"{rate:.2f} items/s, ETA {(spec.num_items - done_items) / rate:.1f}s")
  return computed


def merge_rows(out_dir: str, spec: StudySpec) -> list[dict[str, Any]]:
  """Every row in the fixed order (chunk by chunk); checks that each item is there once."""
  rows = []
  for i in range(spec.num_chunks):
    chunk = read_chunk(chunk_path(out_dir, i), spec, i)
    if chunk is None:
      raise errors.UserError(
          f"{chunk_path(out_dir, i)} is missing or damaged: rerun the same command to compute "
          "it again.")
    rows += chunk
  return rows


# ------------------------------------------------------------------------------------------
# Summaries


def interval(values: Sequence[float]) -> dict[str, float]:
  """n, mean, std (ddof 1; 0 for one value) and the 95% normal interval of the mean."""
  x = np.asarray(values, np.float64)
  n = len(x)
  mean = float(np.mean(x))
  std = float(np.std(x, ddof=1)) if n > 1 else 0.0
  half = Z_95 * std / math.sqrt(n)
  return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def summarise(rows: Sequence[dict], spec: StudySpec) -> list[dict[str, Any]]:
  """One record per (source, attribute or "all", metric), sources in spec order."""
  out = []
  for src in spec.sources:
    mine = [r for r in rows if r["source"] == src.label]
    for group in ["all"] + [a.name for a in spec.attributes]:
      sel = mine if group == "all" else [r for r in mine if r["attribute"] == group]
      for name in metrics.METRIC_NAMES:
        out.append({"source": src.label, "attribute": group, "metric": name,
                    **interval([r[name] for r in sel])})
  return out


SUMMARY_COLUMNS = ("source", "attribute", "metric", "n", "mean", "std", "ci95_low", "ci95_high")


def summary_csv(summary: Sequence[dict]) -> str:
  """CSV text of ``summarise`` records (floats written in full precision)."""
  import csv  # noqa: PLC0415
  import io  # noqa: PLC0415
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(SUMMARY_COLUMNS)
  for rec in summary:
    writer.writerow([repr(rec[c]) if isinstance(rec[c], float) else rec[c]
                     for c in SUMMARY_COLUMNS])
  return buf.getvalue()
