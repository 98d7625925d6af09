"""The disentangle program as a library: set up one edit, optimise lambda resumably, render.

``launch/disentangle.py`` only parses flags, calls ``prepare`` / ``optimise`` / ``final_images``
and writes files; everything here is importable and tested.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors, mixing, noise, optimize, parallel, pipeline, sampler
from disentangle_jax import run_identity, schedule

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
  num_steps: int = 50
  sampler: str = "ddim"
  remat: str = "full"
  eta: float = 0.0
  guidance: float = 7.5
  rng_seed: int = 0
  faithful: bool = False  # the release's quirks: uint8 reference, its CLIP preprocessing,
  #                         final image = the one before the last update
  loss: optimize.LossConfig = optimize.LossConfig()
  optimizer: optimize.OptimizerConfig = optimize.OptimizerConfig()

  def __post_init__(self):
    sampler.check_settings(self.num_steps, self.sampler, self.eta, self.guidance)
    noise.check_seeds(self.seeds)
    mixing.check_t_star(self.num_steps, self.t_star)
    sampler.SamplerConfig(kind=self.sampler, remat=self.remat)
    errors.check_number("lambda_late", self.lambda_late, low=-MAX_LAMBDA, high=MAX_LAMBDA,
                        hint="1.0-1.2 in the paper.")
    if not self.prompt.strip() or not self.attribute.strip():
      raise ValueError("prompt and attribute must be non-empty (c1 = prompt + attribute).")

  @property
  def target_prompt(self) -> str:
    return self.prompt + self.attribute

  @property
  def sampler_config(self) -> sampler.SamplerConfig:
    return sampler.SamplerConfig(kind=self.sampler, remat=self.remat)

  def init_lambda(self) -> np.ndarray:
    return mixing.hard_switch(self.num_steps, self.t_star, self.lambda_late)

  def fingerprint(self) -> str:
    """A hash of everything that determines the result: a checkpoint from a different spec
    must not be resumed."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields every edit of an EditSet must share (one compiled program, one optimiser).
_SHARED_FIELDS = ("num_steps", "sampler", "remat", "eta", "guidance", "rng_seed", "faithful",
                  "loss", "optimizer")


@dataclasses.dataclass(frozen=True)
class EditSet:
  """K edits (attributes) learned together: one lambda [K, T], each on its own seeds, in one
  sharded, compiled program. Equivalent to K separate runs (no shared loss term; Adam is
  elementwise). ``prepare``/``optimise``/``final_images`` accept it wherever an EditSpec goes.
  """

  specs: tuple[EditSpec, ...]

  def __post_init__(self):
    if not self.specs:
      raise ValueError("an EditSet needs at least one edit (attributes is empty).")
    first = self.specs[0]
    for spec in self.specs[1:]:
      for name in _SHARED_FIELDS:
        if getattr(spec, name) != getattr(first, name):
          raise ValueError(f"all edits learned together must share {name}: "
                           f"{getattr(first, name)!r} vs {getattr(spec, name)!r}.")

  def __getattr__(self, name):  # the shared fields and properties, from the first edit
    if name in _SHARED_FIELDS or name == "sampler_config":
      return getattr(self.specs[0], name)
    raise AttributeError(name)

  def init_lambda(self) -> np.ndarray:
    return np.stack([spec.init_lambda() for spec in self.specs])  # [K, T]

  def fingerprint(self) -> str:
    blob = "".join(spec.fingerprint() for spec in self.specs)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _edits(spec) -> tuple[EditSpec, ...]:
  return spec.specs if isinstance(spec, EditSet) else (spec,)


class Prepared(NamedTuple):
  nets: optimize.Networks
  render: Callable  # jitted (sd_params, problem, lam) -> images, shared by reference and final
  params: dict  # {"sd": {"unet", "vae"}, "clip", "vgg"}, replicated over the mesh
  problem: optimize.EditProblem  # batch padded to the mesh and sharded
  num_items: int  # real (unpadded) batch size


def prepare(model, loss_models, spec: EditSpec | EditSet, latent_shape, mesh,
            x_T=None, run_noise=None) -> Prepared:
  """Encodes prompts, draws (or takes) x_T and noise, renders the reference, shards it all.

  Items are the seeds of each edit in order (edit 0's seeds, then edit 1's, ...).
  ``x_T`` [B,H,W,C] / ``run_noise`` [T,B,H,W,C] may be given for a single edit (real-image
  editing: the inversion's outputs); by default they are drawn from the seeds.
  """
  from disentangle_jax import loss_models as loss_models_lib  # noqa: PLC0415
  from disentangle_jax import models  # noqa: PLC0415

  edits = _edits(spec)
  loss_cfg = _effective_loss(spec)
  tables = schedule.step_tables(model.schedule, spec.num_steps, spec.eta)
  group = np.concatenate([np.full(len(e.seeds), k, np.int32) for k, e in enumerate(edits)])
  if x_T is None:
    seeds = np.concatenate([np.asarray(e.seeds) for e in edits])
    drawn = noise.draw(jax.random.key(spec.rng_seed), seeds, latent_shape, tables.sigma)
    x_T, run_noise = drawn.x_T, drawn.noise
  elif len(edits) != 1:
    raise ValueError("x_T/run_noise can only be given for a single edit.")
  else:
    group = np.zeros((x_T.shape[0],), np.int32)
  n = x_T.shape[0]
  size = parallel.padded_size(n, mesh)
  texts = [t for e in edits for t in (e.prompt, e.target_prompt)]
  emb = models.encode_prompts(model, texts + [""])
  feats = loss_models_lib.encode_texts(loss_models, texts)
  nets = optimize.Networks(
      eps=models.make_eps_fn(model.unet, model.config),
      decode=models.make_decode_fn(model.vae, model.scaling_factor, model.config),
      clip_image=loss_models.clip_image_apply, vgg=loss_models.vgg_apply,
      clip_image_size=loss_models.clip_image_size, vgg_input_size=loss_models.vgg_input_size)
  params = parallel.replicate({"sd": {"unet": model.params["unet"], "vae": model.params["vae"]},
                               "clip": loss_models.params["clip"],
                               "vgg": loss_models.params["vgg"]}, mesh)
  x_T = parallel.shard(parallel.pad_batch(x_T, size), mesh)
  run_noise = parallel.shard(parallel.pad_batch(run_noise, size, axis=1), mesh, axis=1)
  prompts = parallel.replicate(pipeline.PromptPair(emb[0:-1:2], emb[1:-1:2], emb[-1]), mesh)
  guidance = jnp.asarray(spec.guidance, jnp.float32)
  tables = parallel.replicate(schedule.StepTables(*(jnp.asarray(t) for t in tables)), mesh)
  problem = optimize.EditProblem(
      x_T=x_T, noise=run_noise, prompts=prompts, guidance=guidance, tables=tables,
      reference=None, text0=parallel.replicate(feats[0::2], mesh),
      text1=parallel.replicate(feats[1::2], mesh),
      mask=parallel.shard(parallel.mask(n, size), mesh),
      group=parallel.shard(parallel.pad_batch(jnp.asarray(group), size), mesh))
  render = optimize.make_render_fn(nets, spec.sampler_config)
  reference = render(params["sd"], problem, jnp.zeros(spec.init_lambda().shape, jnp.float32))
  if loss_cfg.round_reference:  # the release saves the reference as 8-bit and reloads it
    reference = optimize.round_to_uint8_levels(reference)
  return Prepared(nets, render, params, problem._replace(reference=reference), n)


def _effective_loss(spec: EditSpec | EditSet) -> optimize.LossConfig:
  if spec.faithful:
    return dataclasses.replace(spec.loss, preprocess="release", round_reference=True)
  return spec.loss


def make_update_fn(prep: Prepared, spec: EditSpec):
  """(jitted update, optax transformation) for this problem's networks and the spec's static
  choices; cached, so resuming or re-running in one process reuses the compiled program."""
  return _cached_update(prep.nets, _effective_loss(spec), spec.sampler_config, spec.optimizer)


@functools.lru_cache(maxsize=8)
def _cached_update(nets, loss_cfg, sampler_cfg, optimizer_cfg):
  tx = optimize.make_optimizer(optimizer_cfg)
  return optimize.make_update_fn(nets, loss_cfg, sampler_cfg, tx), tx


def initial_state(prep: Prepared, spec: EditSpec, tx) -> optimize.TrainState:
  """The hard-switch initialisation, replicated over the mesh like the states update returns
  (so the first call and the later ones share one compiled program)."""
  return jax.device_put(optimize.init_state(spec.init_lambda(), tx), _replicated(prep))


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


def optimise(prep: Prepared, spec: EditSpec, checkpointer=None,
             on_iteration: Callable[[int, dict, np.ndarray], None] | None = None,
             log: Callable[[str], None] = print, identity: dict | None = None):
  """Runs (or resumes) the optimisation. Returns (lambda [T], history, lambda before the last
  update).

  ``checkpointer`` (checkpoint.Checkpointer) saves after every iteration; a run restarted with
  the same spec and ``identity`` resumes from the newest readable checkpoint and ends with
  bit-identical lambda; one with other settings is refused (errors.RunMismatch, listing the
  fields). ``on_iteration(k, metrics, images)`` gets each iteration's images (rendered with
  the lambda before that iteration's update), unpadded, as float [B, h, w, 3].

  NaN guard: an iteration whose loss, gradient or new lambda is not finite is never
  checkpointed; the run stops with errors.NonFinite naming the iteration and the checkpoint
  it kept.
  """
  update, tx = make_update_fn(prep, spec)
  state = initial_state(prep, spec, tx)
  history, prev_lam = [], np.asarray(state.lam)
  current = run_identity_of(spec, identity)
  if checkpointer is not None:
    check_meta = functools.partial(_check_meta, spec=spec, current=current,
                                   directory=checkpointer.directory)
    restored = checkpointer.restore(state, check_meta=check_meta, log=log)
    if restored is not None:
      state, meta = restored
      history, prev_lam = list(meta["history"]), np.asarray(meta["prev_lam"], np.float32)
      state = jax.device_put(state, _replicated(prep))
      log(f"resumed from iteration {int(state.step)} of {spec.optimizer.iterations}")
  total = spec.optimizer.iterations
  times = []
  if int(state.step) < total:
    log("compiling the update step (the first iteration includes it) ...")
  while int(state.step) < total:
    k = int(state.step)
    prev_lam_next = np.asarray(state.lam)
    t0 = time.perf_counter()
    state, metrics, images = update(state, prep.params, prep.problem)
    jax.block_until_ready(state)
    metrics = _host_metrics(metrics, single=not isinstance(spec, EditSet))
    _check_finite(k + 1, metrics, np.asarray(state.lam), checkpointer)
    prev_lam = prev_lam_next
    metrics["iteration"] = k + 1
    history.append(metrics)
    if on_iteration is not None:
      on_iteration(k + 1, metrics, np.asarray(images)[:prep.num_items])
    if checkpointer is not None:
      checkpointer.save(k + 1, state, {"history": history, "prev_lam": prev_lam.tolist(),
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
  return np.asarray(state.lam), history, prev_lam


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


def _host_metrics(metrics: dict, single: bool) -> dict:
  """Device metrics -> JSON-able floats; per-edit [K] terms become lists (a float for one
  EditSpec)."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    out[name] = (float(value.reshape(-1)[0]) if value.ndim == 0 or single
                 else [float(v) for v in value])
  return out


def edit_history(history: list[dict], k: int, beta: float) -> list[dict]:
  """The loss history of edit k of an EditSet run (per-edit terms picked out, loss recomputed
  as that edit's L_dir + beta * L_perc); a single edit's history is returned unchanged."""
  if not history or not isinstance(history[0]["l_dir"], list):
    return history
  return [{"iteration": h["iteration"], "l_dir": h["l_dir"][k], "l_perc": h["l_perc"][k],
           "loss": h["l_dir"][k] + beta * h["l_perc"][k], "grad_norm": h["grad_norm"]}
          for h in history]


def _fmt(value) -> str:
  if isinstance(value, list):
    return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
  return f"{value:.4f}"


def final_images(prep: Prepared, spec: EditSpec, lam, prev_lam) -> np.ndarray:
  """The edited images to save: with the learned lambda (clean), or — the release's quirk —
  with the lambda before the last update (faithful). float [B, h, w, 3]."""
  use = prev_lam if spec.faithful else lam
  images = prep.render(prep.params["sd"], prep.problem, jnp.asarray(use, jnp.float32))
  return np.asarray(images)[:prep.num_items]
