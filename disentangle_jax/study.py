"""The transfer study: how well does each lambda schedule edit many attributes and seeds?

Sources (learned weights files and baseline schedules) x attributes (prompt pairs) x seeds.
The unit of work is one (attribute, seed): its pure-c0 image is rendered once, beside one
edited image per source, from the same x_T and noise; each (source, attribute, seed) item
gets the metrics of ``metrics.py``.

This module is the evaluation: the spec, the shared inputs and the compiled evaluation of a
batch of units. Running chunks resumably, exactly once, is ``study_store``; the summary
statistics are ``stats``.

Shapes: U units per chunk (padded), K sources, T steps, L tokens, D embedding width,
E CLIP width, H W C latents, h w image size.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import inversion, losses, metrics, mixing, noise, param_sharding, parallel
from disentangle_jax import pipeline, sampler, schedule
from disentangle_jax.sampling import SamplingConfig


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
  sampling: SamplingConfig = SamplingConfig()
  batch_size: int = 4  # units (attribute, seed) per compiled call = per chunk
  preprocess: str = "standard"  # CLIP preprocessing of the metrics
  grid_seeds: int = 4  # sample images are kept for this many seeds (the first ones)
  # Real-image mode: the units' "seeds" are indices into these image files, each inverted
  # (DDIM, under the attribute's c0) instead of drawn from noise.
  images: tuple[str, ...] = ()
  inject_steps: int = 33  # inversion residuals injected in the first K steps
  pin: str = "next"  # inversion target: "next" (correct) | "current" (the release's)
  # Scores computed on the host from the rendered images besides METRIC_NAMES (e.g. the toy
  # world's judge: toy.evaluate.STUDY_SCORES); study_store.run needs their ``score_fn``.
  scores: tuple[str, ...] = ()

  def __post_init__(self):
    if self.images:
      if tuple(self.seeds) != tuple(range(len(self.images))):
        raise ValueError("with images, seeds must be their indices 0..N-1 (set by the launcher).")
      self.inversion_config  # noqa: B018 -- DDIM with eta = 0, inject_steps, pin
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
      mixing.check_lambda(s.lam, self.sampling.num_steps, name=f"lambda of source {s.label!r}")
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
  def inversion_config(self):
    """Real-image mode: how each image is inverted (inversion.InversionConfig)."""
    return inversion.InversionConfig(sampling=self.sampling, inject_steps=self.inject_steps,
                                     pin=self.pin)

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

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Every value of a row: metrics.METRIC_NAMES, then ``scores``."""
    return metrics.METRIC_NAMES + tuple(self.scores)

  def record(self) -> dict:
    """The spec as a dict (manifests, fingerprints); without ``scores`` when there are none,
    so studies started before that field existed still resume."""
    out = dataclasses.asdict(self)
    if not self.scores:
      del out["scores"]
    return out

  def fingerprint(self) -> str:
    """A hash of the spec: rows of a different study must never be mixed in."""
    blob = json.dumps(self.record(), sort_keys=True)
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
  """Encodes every attribute's prompts once and places all shared inputs on ``mesh``: the
  weights by param_sharding's rule (split over a model axis), the rest replicated."""
  from disentangle_jax import loss_models as loss_models_lib  # noqa: PLC0415
  from disentangle_jax import models  # noqa: PLC0415
  model, loss_models = (param_sharding.place_weights(m, mesh) for m in (model, loss_models))
  texts = [p for a in spec.attributes for p in (a.prompt, a.target_prompt)]
  emb, uncond = models.encode_with_negative(model, texts, spec.sampling.negative_prompt,
                                            pairs=True)
  feats = loss_models_lib.encode_texts(loss_models, texts)
  lam = np.stack([mixing.constant(spec.sampling.num_steps, 0.0)] +
                 [np.asarray(s.lam, np.float32) for s in spec.sources], axis=1)
  tables = spec.sampling.tables(model.schedule)
  params = {"sd": {"unet": model.params["unet"], "vae": model.params["vae"]},
            "clip": loss_models.params["clip"], "vgg": loss_models.params["vgg"]}
  shared = parallel.replicate(StudyInputs(
      params=None,
      c0=mixing.select(emb, slice(0, None, 2)), c1=mixing.select(emb, slice(1, None, 2)),
      uncond=uncond, text0=feats[0::2], text1=feats[1::2],
      lam=jnp.asarray(lam), guidance=jnp.asarray(spec.sampling.guidance, jnp.float32),
      tables=schedule.StepTables(*(jnp.asarray(t) for t in tables))), mesh)
  return shared._replace(params=param_sharding.place(params, mesh))


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
  prompts = pipeline.PromptPair(*(jax.tree.map(lambda c: rep(c[attr], 0), c)
                                  for c in (inputs.c0, inputs.c1)), inputs.uncond)
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


def file_label(label: str) -> str:
  """A source label as a file name part ("T*=10" -> "T10")."""
  return label.replace("*=", "")


def image_inputs(inverter, sd_params, pixels, inputs: StudyInputs, spec: StudySpec,
                 sched: schedule.ScheduleConfig) -> Callable:
  """Real-image mode's ``unit_inputs`` for ``run``: (attribute, image index) units ->
  RunNoise, each image inverted under its attribute's c0 (inversion.invert_images).

  pixels: [N, h, w, 3] in [0, 1], the study's images fitted to the model's size.
  """
  config = spec.inversion_config
  c0, uncond = jax.tree.map(parallel.to_host, (inputs.c0, inputs.uncond))

  def unit_inputs(units) -> noise.RunNoise:
    found = {}
    for a in sorted({a for a, _ in units}):
      idx = sorted({i for aa, i in units if aa == a})  # padding repeats units: invert once
      inv = inversion.invert_images(inverter, sd_params, pixels[idx], mixing.select(c0, a), uncond, idx,
                                    config, sched)
      for j, i in enumerate(idx):
        found[(a, i)] = (inv.run.x_T[j], inv.run.noise[:, j])
    return noise.RunNoise(x_T=jnp.stack([found[u][0] for u in units]),
                          noise=jnp.stack([found[u][1] for u in units], axis=1))

  return unit_inputs
