"""The disentangle program as a library: set up one edit, optimise lambda resumably, render.

``launch/disentangle.py`` only parses flags, calls ``prepare`` / ``optimise`` / ``final_images``
and writes files; everything here is importable and tested.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import edit_problem, errors, images, mixing, noise, optimize
from disentangle_jax import param_sharding, parallel, run_identity, sampler, workdir
from disentangle_jax.sampling import SamplingConfig

# |lambda_late| bound: lambda weights the target prompt; values far past 1 only extrapolate
# the embedding into noise.
MAX_LAMBDA = 10.0


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """One attribute edit to learn (validated on construction; errors name the config field)."""

  prompt: str
  attribute: str
  seeds: tuple[int, ...]
  t_star: int
  lambda_late: float = 1.0
  sampling: SamplingConfig = SamplingConfig()
  remat: str = "full"
  faithful: bool = False  # the release's quirks: uint8 reference, its CLIP preprocessing,
  #                         final image = the one before the last update
  loss: optimize.LossConfig = optimize.LossConfig()
  optimizer: optimize.OptimizerConfig = optimize.OptimizerConfig()
  lambda_shape: str = "per_step"  # "per_step" (lambda [T]) | "per_token" ([T, L], mixing.py)

  def __post_init__(self):
    noise.check_seeds(self.seeds)
    mixing.check_lambda_shape(self.lambda_shape)
    mixing.check_t_star(self.sampling.num_steps, self.t_star)
    self.sampler_config  # noqa: B018 -- validates remat
    errors.check_number("lambda_late", self.lambda_late, low=-MAX_LAMBDA, high=MAX_LAMBDA,
                        hint="1.0-1.2 in the paper.")
    if not self.prompt.strip() or not self.attribute.strip():
      raise ValueError("prompt and attribute must be non-empty (c1 = prompt + attribute).")

  @property
  def target_prompt(self) -> str:
    return self.prompt + self.attribute

  @property
  def sampler_config(self) -> sampler.SamplerConfig:
    return self.sampling.sampler_config(self.remat)

  def init_lambda(self, num_tokens: int | None = None) -> np.ndarray:
    """The hard switch [T]. Given the model's token count, the lambda to learn: per token,
    every token of a step starts at the step's value ([T, num_tokens])."""
    lam = mixing.hard_switch(self.sampling.num_steps, self.t_star, self.lambda_late)
    if self.lambda_shape == "per_token" and num_tokens is not None:
      lam = np.repeat(lam[:, None], num_tokens, axis=1)
    return lam

  def fingerprint(self) -> str:
    """A hash of everything that determines the result: a checkpoint from a different spec
    must not be resumed."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shared(spec: EditSpec) -> dict:
  """The settings every edit of an EditSet must share (one compiled program, one optimiser);
  the sampling settings by their own names."""
  return dataclasses.asdict(spec.sampling) | {
      "remat": spec.remat, "faithful": spec.faithful, "loss": spec.loss,
      "optimizer": spec.optimizer, "lambda_shape": spec.lambda_shape}


@dataclasses.dataclass(frozen=True)
class EditSet:
  """K edits (attributes) learned together: one lambda [K, T], each on its own seeds, in one
  sharded, compiled program. Equivalent to K separate runs (no shared loss term; Adam is
  elementwise). A single edit is the set of one (``as_edit_set``): every function here runs
  the K-edit path.
  """

  specs: tuple[EditSpec, ...]

  def __post_init__(self):
    if not self.specs:
      raise ValueError("an EditSet needs at least one edit (attributes is empty).")
    first = _shared(self.specs[0])
    for spec in self.specs[1:]:
      for name, value in _shared(spec).items():
        if value != first[name]:
          raise ValueError(f"all edits learned together must share {name}: "
                           f"{first[name]!r} vs {value!r}.")

  @property
  def shared(self) -> EditSpec:
    """The edit whose shared settings (sampling, remat, faithful, loss, optimizer) stand for
    all of them (checked equal on construction)."""
    return self.specs[0]

  def init_lambda(self, num_tokens: int | None = None) -> np.ndarray:
    """[K, T], or (given num_tokens) per token [K, T, num_tokens]."""
    return np.stack([spec.init_lambda(num_tokens) for spec in self.specs])

  def fingerprint(self) -> str:
    blob = "".join(spec.fingerprint() for spec in self.specs)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def as_edit_set(spec: EditSpec | EditSet) -> EditSet:
  """A single edit is the set of one."""
  return spec if isinstance(spec, EditSet) else EditSet((spec,))


class Prepared(NamedTuple):
  nets: optimize.Networks
  render: Callable  # jitted (sd_params, problem, lam) -> images, shared by reference and final
  params: dict  # {"sd": {"unet", "vae"}, "clip", "vgg"}, on the mesh (param_sharding)
  problem: optimize.EditProblem  # batch padded to the mesh and sharded
  num_items: int  # real (unpadded) batch size


def prepare(model, loss_models, spec: EditSpec | EditSet, latent_shape, mesh,
            x_T=None, run_noise=None) -> Prepared:
  """Encodes the edits, draws (or takes) x_T and noise, places the problem on the mesh and
  renders the reference.

  Items are the seeds of each edit in order (edit 0's seeds, then edit 1's, ...).
  ``x_T`` [B,H,W,C] / ``run_noise`` [T,B,H,W,C] may be given for a single edit (real-image
  editing: the inversion's outputs); by default they are drawn from the seeds.
  """
  edits = as_edit_set(spec)
  sampling = edits.shared.sampling
  tables = sampling.tables(model.schedule)
  if x_T is None:
    seeds = np.concatenate([np.asarray(e.seeds) for e in edits.specs])
    run = noise.draw(jax.random.key(sampling.rng_seed), seeds, latent_shape, tables.sigma)
    group = np.concatenate([np.full(len(e.seeds), k, np.int32)
                            for k, e in enumerate(edits.specs)])
  elif len(edits.specs) != 1:
    raise ValueError("x_T/run_noise can only be given for a single edit.")
  else:
    run = noise.RunNoise(x_T=x_T, noise=run_noise)
    group = np.zeros((x_T.shape[0],), np.int32)
  # With a model axis, every weight (text encoders too) is split over it before first use.
  model, loss_models = (param_sharding.place_weights(m, mesh) for m in (model, loss_models))
  nets, params = edit_problem.frozen_networks(model, loss_models)
  encoded = edit_problem.encode_edits(model, loss_models, edits.specs, sampling.negative_prompt)
  params, problem = edit_problem.on_mesh(
      params, edit_problem.problem(encoded, run, group, sampling.guidance, tables),
      run.x_T.shape[0], mesh)
  render = optimize.make_problem_render_fn(nets, edits.shared.sampler_config)
  # lambda = 0, pure c0, in the shape of the lambda learned (one render program for both)
  zeros = edits.init_lambda(mixing.num_tokens(problem.prompts.c0))
  reference = render(params["sd"], problem, jnp.zeros(zeros.shape, jnp.float32))
  if _effective_loss(edits).round_reference:  # the release saves the reference as 8-bit
    reference = optimize.round_to_uint8_levels(reference)
  return Prepared(nets, render, params, problem._replace(reference=reference), run.x_T.shape[0])


def _effective_loss(edits: EditSet) -> optimize.LossConfig:
  spec = edits.shared
  if spec.faithful:
    return dataclasses.replace(spec.loss, preprocess="release", round_reference=True)
  return spec.loss


def compiled_update(prep: Prepared, spec: EditSpec | EditSet):
  """(jitted update, optax transformation) for this problem's networks and the spec's static
  choices; cached, so resuming or re-running in one process reuses the compiled program."""
  edits = as_edit_set(spec)
  return _cached_update(prep.nets, _effective_loss(edits), edits.shared.sampler_config,
                        edits.shared.optimizer)


@functools.lru_cache(maxsize=8)
def _cached_update(nets, loss_cfg, sampler_cfg, optimizer_cfg):
  tx = optimize.make_optimizer(optimizer_cfg)
  return optimize.make_update_fn(nets, loss_cfg, sampler_cfg, tx), tx


def initial_state(prep: Prepared, spec: EditSpec | EditSet, tx) -> optimize.TrainState:
  """The hard-switch initialisation (lambda [K, T], per token [K, T, L]), replicated over the
  mesh like the states update returns (so the first call and the later ones share one compiled
  program)."""
  lam = as_edit_set(spec).init_lambda(mixing.num_tokens(prep.problem.prompts.c0))
  return jax.device_put(optimize.init_state(lam, tx), _replicated(prep))


def _replicated(prep: Prepared):
  return parallel.replicated(prep.problem.mask.sharding.mesh)


def run_identity_of(spec: EditSpec | EditSet, identity: dict | None = None) -> dict:
  """The identity a checkpoint of this optimisation records: every spec field, plus what the
  caller adds (the program's config: model, loss models, image size; run_identity.of_config)."""
  return run_identity.flatten({"spec": dataclasses.asdict(spec)}) | dict(identity or {})


def _check_meta(meta: dict, spec, current: dict, directory: str) -> None:
  fix = f"use a new --workdir (or delete {directory} to start over)"
  if "identity" in meta:
    run_identity.check(meta["identity"], current, f"the checkpoints in {directory}", fix)
  elif meta.get("fingerprint") != spec.fingerprint():
    raise errors.RunMismatch(f"the checkpoints in {directory} belong to a run with other "
                             f"settings: {fix}.")


def check_resumable(checkpointer, spec: EditSpec | EditSet, identity: dict | None = None) -> None:
  """Refuses, before any compilation, to resume checkpoints of a run with other settings
  (errors.RunMismatch listing the fields). Unreadable checkpoints are left to ``optimise``."""
  current = run_identity_of(spec, identity)
  for step in reversed(checkpointer.steps()):
    try:
      meta = checkpointer.read_meta(step)
    except Exception:  # noqa: BLE001 -- damaged: optimise reports and skips it
      continue
    _check_meta(meta, spec, current, checkpointer.directory)
    return


def optimise(prep: Prepared, spec: EditSpec | EditSet, checkpointer=None,
             on_iteration: Callable[[int, dict, np.ndarray], None] | None = None,
             log: Callable[[str], None] = print, identity: dict | None = None):
  """Runs (or resumes) the optimisation. Returns (lambda [K, T], history, lambda before the
  last update); for a single EditSpec, its lambda [T] and its own history (``edit_history``).

  ``checkpointer`` (checkpoint.Checkpointer) saves after every iteration; a run restarted with
  the same spec and ``identity`` resumes from the newest readable checkpoint and ends with
  bit-identical lambda; one with other settings is refused (errors.RunMismatch, listing the
  fields). ``on_iteration(k, metrics, images)`` gets each iteration's images (rendered with
  the lambda before that iteration's update), unpadded, as float [B, h, w, 3].

  NaN guard: an iteration whose loss, gradient or new lambda is not finite is never
  checkpointed; the run stops with errors.NonFinite naming the iteration and the checkpoint
  it kept.

  Each checkpoint also records the lambda every iteration's images were rendered with
  (``iteration_lambdas``), so the images, derived files, can be rendered again.
  """
  edits = as_edit_set(spec)
  update, tx = compiled_update(prep, edits)
  state = initial_state(prep, edits, tx)
  history, prev_lam = [], np.asarray(state.lam)
  lambdas = []  # per iteration, the lambda its images were rendered with (None: not recorded)
  current = run_identity_of(spec, identity)
  if checkpointer is not None:
    check_meta = functools.partial(_check_meta, spec=spec, current=current,
                                   directory=checkpointer.directory)
    restored = checkpointer.restore(state, check_meta=check_meta, log=log)
    if restored is not None:
      state, meta = restored
      history, prev_lam = list(meta["history"]), np.asarray(meta["prev_lam"], np.float32)
      lambdas = _recorded_lambdas(meta)
      state = jax.device_put(state, _replicated(prep))
      log(f"resumed from iteration {int(state.step)} of {edits.shared.optimizer.iterations}")
  total = edits.shared.optimizer.iterations
  times = []
  if int(state.step) < total:
    log("compiling the update step (the first iteration includes it) ...")
  while int(state.step) < total:
    k = int(state.step)
    prev_lam_next = np.asarray(state.lam)
    t0 = time.perf_counter()
    state, metrics, rendered = update(state, prep.params, prep.problem)
    jax.block_until_ready(state)
    metrics = _host_metrics(metrics)
    _check_finite(k + 1, metrics, np.asarray(state.lam), checkpointer)
    prev_lam = prev_lam_next
    metrics["iteration"] = k + 1
    history.append(metrics)
    lambdas.append(prev_lam.tolist())
    if on_iteration is not None:
      on_iteration(k + 1, metrics, np.asarray(rendered)[:prep.num_items])
    if checkpointer is not None:
      checkpointer.save(k + 1, state, {"history": history, "prev_lam": prev_lam.tolist(),
                                       "lambdas": lambdas,
                                       "fingerprint": spec.fingerprint(), "identity": current})
    times.append(time.perf_counter() - t0)
    # The first iteration of a process includes compilation: it gives no rate and no ETA.
    if len(times) == 1:
      timing = f"{times[0]:.2f}s incl. compile, ETA after the next iteration"
    else:
      per_it = float(np.mean(times[1:]))
      timing = f"{per_it:.2f}s/it ETA {per_it * (total - k - 1):.0f}s"
    if k + 1 == total:
      timing = timing.split(" ETA")[0] + ", done"
    log(f"iteration {k + 1}/{total}: loss={metrics['loss']:.4f} "
        f"l_dir={_fmt(metrics['l_dir'])} l_perc={_fmt(metrics['l_perc'])} "
        f"|grad|={metrics['grad_norm']:.3g} {timing}")
  if checkpointer is not None:
    checkpointer.wait()
  lam = np.asarray(state.lam)
  if isinstance(spec, EditSpec):  # given alone: its own lambda [T] and history
    return lam[0], edit_history(history, 0, spec.loss.beta), prev_lam[0]
  return lam, history, prev_lam


def _recorded_lambdas(meta: dict) -> list:
  """The metadata's per-iteration lambdas, aligned with its history (None where a checkpoint
  saved before they were recorded, or damaged, does not have them)."""
  got, n = meta.get("lambdas"), len(meta.get("history", []))
  return list(got) if isinstance(got, list) and len(got) == n else [None] * n


def iteration_lambdas(checkpointer, num_iterations: int, last) -> list[np.ndarray | None]:
  """The lambda each of ``num_iterations`` iterations rendered its images with: from the
  newest checkpoint's metadata, and ``last`` (``optimise``'s lambda before the last update)
  for the last iteration; None where neither has it (checkpoints older than this record, or
  iterations after the newest checkpoint with ``checkpoint_every`` > 1)."""
  recorded = []
  step = checkpointer.latest_step() if checkpointer is not None else None
  if step is not None:
    try:
      recorded = _recorded_lambdas(checkpointer.read_meta(step))[:num_iterations]
    except Exception:  # noqa: BLE001 -- an unreadable checkpoint: only ``last`` is known
      pass
  out = recorded + [None] * (num_iterations - len(recorded))
  if num_iterations:
    out[-1] = last
  return [None if lam is None else np.asarray(lam, np.float32) for lam in out]


def iteration_paths(iter_dir: str, k: int) -> tuple[str, str]:
  """(image, metrics) files of iteration k (1-based) in ``iter_dir``."""
  return (os.path.join(iter_dir, f"iter_{k:03d}.png"), os.path.join(iter_dir, f"iter_{k:03d}.json"))


def write_iteration(iter_dir: str, k: int, metrics: dict, pixels: np.ndarray) -> None:
  """Iteration k's files: its images (uint8 [B, h, w, 3], one row) and its metrics (the
  folder is made again if it was deleted meanwhile: derived files)."""
  image, metrics_file = iteration_paths(iter_dir, k)
  os.makedirs(iter_dir, exist_ok=True)
  workdir.write_atomic(image, images.png_bytes(np.asarray(images.grid([list(pixels)]))))
  workdir.write_atomic(metrics_file, json.dumps(metrics))


def iteration_strip(iter_dir: str, history: list[dict], lambdas: list,
                    render: Callable[[np.ndarray], np.ndarray],
                    log: Callable[[str], None] = print,
                    warn: Callable[[str], None] = print) -> tuple[list[np.ndarray], list[str]]:
  """The strip's cells (each iteration's image row, uint8) and labels ("it k": the lambda
  after k updates), read from ``iter_dir``.

  The iteration files are derived files, never required: an image that is missing or
  unreadable (deleted or truncated after a kill) is rendered again from the lambda it was
  rendered with (``lambdas``, ``iteration_lambdas``; ``render(lam) -> uint8 [B, h, w, 3]``)
  and written back, one ``log`` line each; one without a recorded lambda is left out, one
  ``warn`` line each. The render is the final images' program, not the update's, so a
  rebuilt image may differ from the lost one by float rounding (a level of 255 at most in
  the tests). A missing metrics file is written again from ``history``.
  """
  cells, labels = [], []
  for k, metrics in enumerate(history, start=1):
    image, metrics_file = iteration_paths(iter_dir, k)
    try:
      cell = images.load_png(image)
    except (OSError, ValueError, SyntaxError):  # missing, truncated, not an image
      if lambdas[k - 1] is None:
        warn(f"{image} is missing or unreadable and the lambda it was rendered with is not in "
             "the checkpoints: it is left out of strip.png")
        continue
      write_iteration(iter_dir, k, metrics, render(lambdas[k - 1]))
      cell = images.load_png(image)
      log(f"{image} was missing or unreadable: rendered it again from its checkpointed lambda")
    if not os.path.isfile(metrics_file):
      workdir.write_atomic(metrics_file, json.dumps(metrics))
    cells.append(cell)
    labels.append(f"it {k - 1}")
  return cells, labels


def _check_finite(iteration: int, metrics: dict, lam: np.ndarray, checkpointer) -> None:
  bad = [name for name in ("loss", "l_dir", "l_perc", "grad_norm")
         if not np.all(np.isfinite(metrics[name]))]
  if not np.all(np.isfinite(lam)):
    bad.append("lambda")
  if not bad:
    return
  if checkpointer is not None:
    checkpointer.wait()
    last_good = checkpointer.latest_step()
    kept = (f"the last good checkpoint, iteration {last_good}, is kept in "
            f"{checkpointer.directory}" if last_good else "no checkpoint was written yet")
  else:
    kept = "nothing was saved"
  raise errors.NonFinite(
      f"iteration {iteration} produced a non-finite {', '.join(bad)} (diverged); {kept}. Lower "
      "optimizer.learning_rate or loss.beta and run again (a rerun with other settings needs a "
      "new --workdir).")


def _host_metrics(metrics: dict) -> dict:
  """Device metrics -> JSON-able floats: loss and grad_norm a float, the per-edit terms
  (l_dir, l_perc [K]) a list of K."""
  return {name: (float(value) if np.ndim(value) == 0 else [float(v) for v in np.asarray(value)])
          for name, value in metrics.items()}


def edit_history(history: list[dict], k: int, beta: float) -> list[dict]:
  """The loss history of edit k: its per-edit terms picked out, its loss that edit's
  L_dir + beta * L_perc (for K = 1 the device's total, which is exactly that)."""
  return [{"iteration": h["iteration"], "l_dir": h["l_dir"][k], "l_perc": h["l_perc"][k],
           "loss": (h["loss"] if len(h["l_dir"]) == 1 else
                    h["l_dir"][k] + beta * h["l_perc"][k]),
           "grad_norm": h["grad_norm"]}
          for h in history]


def _fmt(values: list) -> str:
  if len(values) == 1:  # one edit: a plain number in the log
    return f"{values[0]:.4f}"
  return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def final_images(prep: Prepared, spec: EditSpec | EditSet, lam, prev_lam) -> np.ndarray:
  """The edited images to save: with the learned lambda (clean), or — the release's quirk —
  with the lambda before the last update (faithful). float [B, h, w, 3]."""
  use = prev_lam if as_edit_set(spec).shared.faithful else lam
  return render_images(prep, use)


def render_images(prep: Prepared, lam) -> np.ndarray:
  """The real items rendered with ``lam`` ([K, T], or [K, T, L]): float [B, h, w, 3]."""
  rendered = prep.render(prep.params["sd"], prep.problem, jnp.asarray(lam, jnp.float32))
  return np.asarray(rendered)[:prep.num_items]
