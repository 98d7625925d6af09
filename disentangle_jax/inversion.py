"""Real-image inversion: clean latent z0 -> (x_T, noise) for the sampler (docs/METHOD.md section 5).

The output is a ``noise.RunNoise`` — the same x_T [B,H,W,C] and noise [T,B,H,W,C] that
``noise.draw`` produces for text-to-image runs — so editing a real image uses the one sampler
(``sampler.sample``, ``pipeline.render``, ``disentangle.prepare(..., x_T=, run_noise=)``):

1. forward-noised targets from the seed: xf = sqrt(a) z0 + sqrt(1 - a) eps, eps drawn once per
   seed (``noise.target_noise``);
2. DDIM inversion (eta = 0) from z0 to x_T, conditioned on c0 with CFG (``ddim_invert``);
3. a reconstruction pass from x_T with c0: at step i the deterministic DDIM update x_det of x
   gives the residual noise[i] = target_i - x_det, and x is pinned to target_i
   (``reconstruct_residuals``). Only the first ``inject_steps`` steps get a residual; after that
   noise[i] = 0 and x continues deterministically.

Pinning ("pin"):
  "next" (default, correct): target_i is the forward-noised latent at step i's NEXT (less noisy)
    level alpha_prev_i, which is xf_{i+1}; for the last step it is z0 itself. With injection at
    every step the lambda = 0 run then ends exactly at z0 (to float rounding).
  "current" (the release's behaviour): target_i = xf_i, the latent at step i's own level alpha_i,
    one step noisier than the DDIM update lands.

Everything here is pure and jit-able; step count, shapes and ``pin`` are static; weights,
embeddings, guidance, tables, eps and ``inject_steps`` are traced (changing them never
recompiles). Shapes: T steps, B batch, H W C latent (NHWC), L tokens, D embedding width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors
from disentangle_jax import noise as noise_lib
from disentangle_jax import pipeline, sampler, schedule
from disentangle_jax.sampling import SamplingConfig

PIN_MODES = ("next", "current")


@dataclasses.dataclass(frozen=True)
class InversionConfig:
  """Choices of the inversion (validated on construction; errors name the config field)."""

  # DDIM with eta = 0 (the residuals fit only that sampler); num_steps, guidance (of the
  # inversion and the reconstruction) and rng_seed (keys the targets) come from here.
  sampling: SamplingConfig = SamplingConfig()
  inject_steps: int = 33  # K: residuals are injected during the first K steps (33 of 50)
  pin: str = "next"  # "next" (correct DDIM target) | "current" (the release's pinning)

  def __post_init__(self):
    num_steps = self.sampling.num_steps
    if self.sampling.kind != "ddim" or self.sampling.eta != 0:
      raise errors.UserError(
          f"sampler={self.sampling.kind!r}, eta={self.sampling.eta}: real images are inverted "
          "with DDIM (eta = 0); set sampler='ddim' and eta=0.")
    if isinstance(self.inject_steps, bool) or not isinstance(self.inject_steps, int) or not (
        0 <= self.inject_steps <= num_steps):
      raise ValueError(
          f"inject_steps={self.inject_steps!r} must be an integer in [0, num_steps="
          f"{num_steps}] (the release injects residuals in the first 33 of 50 steps; "
          f"{num_steps} = every step, exact reconstruction).")
    if self.pin not in PIN_MODES:
      raise ValueError(f"pin={self.pin!r} is unknown; use one of {PIN_MODES} ('next' = correct "
                       "DDIM target, 'current' = the release's).")


def _bcast(v, x):
  """A per-step scalar (or [T]) broadcast against [T, B, H, W, C] / [B, H, W, C]."""
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v)))


def pinning_targets(z0: jax.Array, eps: jax.Array, tables: schedule.StepTables,
                    pin: str = "next") -> jax.Array:
  """The latent each reconstruction step is pinned to.

  Args:
    z0: [B, H, W, C] clean latents.
    eps: [T, B, H, W, C] ``target_noise``.
    tables: T-step tables (eta = 0).
    pin: "next" | "current" (module docstring).

  Returns:
    [T, B, H, W, C] in z0's dtype. "current": xf_i = sqrt(a_i) z0 + sqrt(1 - a_i) eps_i.
    "next": xf_{i+1} for i < T - 1 (the level alpha_prev_i, eps_{i+1}) and z0 for the last step.
  """
  if pin not in PIN_MODES:
    raise ValueError(f"pin={pin!r} is unknown; use one of {PIN_MODES}.")
  dtype = z0.dtype
  if pin == "current":
    alpha = jnp.asarray(tables.alpha).astype(dtype)
    return jnp.sqrt(_bcast(alpha, eps)) * z0 + jnp.sqrt(1 - _bcast(alpha, eps)) * eps
  alpha = jnp.asarray(tables.alpha_prev).astype(dtype)[:-1]
  inner = eps[1:]
  noisy = jnp.sqrt(_bcast(alpha, inner)) * z0 + jnp.sqrt(1 - _bcast(alpha, inner)) * inner
  return jnp.concatenate([noisy, z0[None]]).astype(dtype)


def _invert_step(eps_fn, params, cond, uncond, guidance, x, xs):
  """One inverse DDIM step: x at level alpha_prev_i -> level alpha_i, UNet evaluated at t_i."""
  t, alpha, alpha_prev = xs
  e = sampler.cfg_eps(eps_fn, params, x, t, cond, uncond, guidance)
  # ddim_update with the roles of the two levels swapped (eta = 0); a v-prediction converts
  # with x's own level alpha_prev, as diffusers' DDIMInverseScheduler does.
  x_noisier, _ = sampler.ddim_update(x, e, alpha_prev, alpha, 0.0,
                                     sampler.prediction_type_of(eps_fn))
  return x_noisier, None


def ddim_invert(eps_fn: sampler.EpsFn, params, z0: jax.Array, cond: jax.Array,
                uncond: jax.Array, guidance, tables: schedule.StepTables) -> jax.Array:
  """Deterministic DDIM inversion (eta = 0) from z0 to x_T, steps T-1, ..., 0.

  Step i moves x from step i's next level (alpha_prev_i; z0 for the last step) to its own level
  alpha_i with the noise predicted at (x, t_i), the convention of null-text inversion (it avoids
  the negative "next" timestep of the last step). For a predictor that ignores x this is the
  exact inverse of ``sampler.sample`` with zero noise.

  Args:
    eps_fn: noise predictor (static). params: its weights (traced).
    z0: [B, H, W, C]; cond: [L, D] or [B, L, D] (c0); uncond: [L, D]; guidance: [].
    tables: T-step tables (eta = 0).

  Returns:
    x_T [B, H, W, C].
  """
  dtype = z0.dtype
  xs = (jnp.asarray(tables.timesteps, jnp.int32)[::-1],
        jnp.asarray(tables.alpha).astype(dtype)[::-1],
        jnp.asarray(tables.alpha_prev).astype(dtype)[::-1])
  body = functools.partial(_invert_step, eps_fn, params, cond, uncond,
                           jnp.asarray(guidance, dtype))
  x_T, _ = jax.lax.scan(body, z0, xs)
  return x_T


def _reconstruct_step(eps_fn, params, cond, uncond, guidance, x, xs):
  t, alpha, alpha_prev, target, inject = xs
  e = sampler.cfg_eps(eps_fn, params, x, t, cond, uncond, guidance)
  x_det, _ = sampler.ddim_update(x, e, alpha, alpha_prev, 0.0, sampler.prediction_type_of(eps_fn))
  residual = jnp.where(inject, target - x_det, jnp.zeros_like(x_det))
  # The same sum the sampler computes, so the lambda = 0 run follows this trajectory exactly.
  return x_det + residual, residual


def reconstruct_residuals(eps_fn: sampler.EpsFn, params, x_T: jax.Array, targets: jax.Array,
                          cond: jax.Array, uncond: jax.Array, guidance,
                          tables: schedule.StepTables, inject_steps) -> jax.Array:
  """The residual noise tensor of the c0 reconstruction pass.

  Args:
    x_T: [B, H, W, C] (``ddim_invert``); targets: [T, B, H, W, C] (``pinning_targets``).
    cond: c0 [L, D] or [B, L, D]; uncond: [L, D]; guidance: [].
    inject_steps: [] int K (traced): noise[i] = 0 for i >= K.

  Returns:
    noise [T, B, H, W, C]: noise[i] = target_i - x_det_i for i < K, else 0.
  """
  dtype = x_T.dtype
  num_steps = int(np.shape(tables.timesteps)[0])
  if tuple(targets.shape) != (num_steps,) + tuple(x_T.shape):
    raise ValueError(f"targets has shape {tuple(targets.shape)}; expected [T, B, H, W, C] = "
                     f"{(num_steps,) + tuple(x_T.shape)}.")
  inject = jnp.arange(num_steps) < inject_steps
  xs = (jnp.asarray(tables.timesteps, jnp.int32), jnp.asarray(tables.alpha).astype(dtype),
        jnp.asarray(tables.alpha_prev).astype(dtype), targets.astype(dtype), inject)
  body = functools.partial(_reconstruct_step, eps_fn, params, cond, uncond,
                           jnp.asarray(guidance, dtype))
  _, residuals = jax.lax.scan(body, x_T, xs)
  return residuals


def invert(eps_fn: sampler.EpsFn, params, z0: jax.Array, eps: jax.Array, cond: jax.Array,
           uncond: jax.Array, guidance, tables: schedule.StepTables, inject_steps,
           pin: str = "next") -> noise_lib.RunNoise:
  """z0 -> the sampler inputs that reproduce it under c0 (module docstring).

  Args:
    eps_fn: noise predictor (static), params: the UNet's weights (traced).
    z0: [B, H, W, C] encoded latents (``models.make_encode_fn``).
    eps: [T, B, H, W, C] ``target_noise`` of the batch's seeds.
    cond: c0 [L, D] (or [B, L, D]); uncond: "" [L, D]; guidance: [] CFG scale.
    tables: ``schedule.step_tables(schedule, T, 0.0)``.
    inject_steps: [] int K (traced); pin: "next" | "current" (static).

  Returns:
    RunNoise(x_T [B, H, W, C], noise [T, B, H, W, C]) for ``sampler.sample`` / ``pipeline.render``.
  """
  num_steps = int(np.shape(tables.timesteps)[0])
  if z0.ndim != 4:
    raise ValueError(f"z0 must be [B, H, W, C]; got shape {tuple(z0.shape)}.")
  if tuple(eps.shape) != (num_steps,) + tuple(z0.shape):
    raise ValueError(f"eps has shape {tuple(eps.shape)}; expected [T, B, H, W, C] = "
                     f"{(num_steps,) + tuple(z0.shape)} (target_noise for T = {num_steps}).")
  if isinstance(tables.sigma, np.ndarray) and np.any(tables.sigma != 0):
    raise ValueError("tables have eta > 0: inversion needs step_tables(..., eta=0.0).")
  x_T = ddim_invert(eps_fn, params, z0, cond, uncond, guidance, tables)
  targets = pinning_targets(z0, eps.astype(z0.dtype), tables, pin)
  residuals = reconstruct_residuals(eps_fn, params, x_T, targets, cond, uncond, guidance, tables,
                                    inject_steps)
  return noise_lib.RunNoise(x_T=x_T, noise=residuals)


def make_invert_fn(eps_fn: sampler.EpsFn, pin: str = "next") -> Callable:
  """A jitted ``invert(params, z0, eps, cond, uncond, guidance, tables, inject_steps)``.

  Only the predictor and ``pin`` are bound (static); the weights stay arguments.
  """
  if pin not in PIN_MODES:
    raise ValueError(f"pin={pin!r} is unknown; use one of {PIN_MODES}.")
  if hasattr(eps_fn, "invert"):  # SD 3.x / Flux.1: the Euler inversion (models/flow_bundle.py)
    return jax.jit(functools.partial(eps_fn.invert, pin=pin))
  return jax.jit(functools.partial(invert, eps_fn, pin=pin))


class Inverter(NamedTuple):
  """Jitted functions of one model (static modules bound, weights are arguments).

  encode(vae_params, images [B,h,w,3] in [0,1], key=None) -> z0 [B,H,W,C];
  invert(unet_params, z0, eps, cond, uncond, guidance, tables, inject_steps) -> RunNoise.
  """

  encode: Callable
  invert: Callable


def make_inverter(model, pin: str = "next") -> Inverter:
  """The encoder and the inversion of a loaded ``models.StableDiffusion``, jitted."""
  from disentangle_jax import models  # noqa: PLC0415  (keeps this module free of diffusers)
  return Inverter(
      encode=jax.jit(models.make_encode_fn(model.vae, model.scaling_factor, model.config)),
      invert=make_invert_fn(models.predictor(model), pin))


class Inverted(NamedTuple):
  """A real image prepared for editing.

  Attributes:
    z0: [B, H, W, C] encoded latents.
    run: RunNoise(x_T [B, H, W, C], noise [T, B, H, W, C]) for the sampler.
    tables: the T-step (eta = 0) tables the residuals were computed with.
  """

  z0: jax.Array
  run: noise_lib.RunNoise
  tables: schedule.StepTables


def invert_images(inverter: Inverter, params: dict, images, c0, uncond, seeds,
                  config: InversionConfig, sched: schedule.ScheduleConfig,
                  sample_posterior: bool = False) -> Inverted:
  """Encodes images and inverts them under c0.

  Args:
    inverter: ``make_inverter(model, config.pin)``.
    params: {"unet": ..., "vae": ...}.
    images: [B, h, w, 3] float in [0, 1] (``real_images``), h and w multiples of 8.
    c0, uncond: [L, D] embeddings of the neutral prompt and "".
    seeds: int [B], one per image: keys the target noise (and the posterior sample).
    config: the inversion choices (its sampling.rng_seed is the run's base key); sched: the
      model's training schedule. sample_posterior: encode a posterior sample, not the mean.
  """
  seeds = noise_lib.check_seeds(seeds)
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[0] != len(seeds):
    raise ValueError(f"images has shape {tuple(images.shape)}: expected [B, h, w, 3] with "
                     f"B = {len(seeds)}, one image per seed.")
  base = jax.random.key(config.sampling.rng_seed)
  if sample_posterior:
    keys = [noise_lib.encode_key(base, int(s)) for s in seeds]
    z0 = jnp.concatenate([inverter.encode(params["vae"], images[i:i + 1], k)
                          for i, k in enumerate(keys)])
  else:
    z0 = inverter.encode(params["vae"], images)
  tables = config.sampling.tables(sched)
  eps = noise_lib.target_noise(base, seeds, config.sampling.num_steps, z0.shape[1:], z0.dtype)
  run = inverter.invert(params["unet"], z0, eps, c0, uncond,
                        jnp.asarray(config.sampling.guidance, z0.dtype), tables,
                        jnp.asarray(config.inject_steps, jnp.int32))
  return Inverted(z0=z0, run=run, tables=tables)


class EditOutput(NamedTuple):
  """One real-image edit (all [B, ...]).

  Attributes:
    z_rec: latents of the lambda = 0 run (the reconstruction); z_edit: with lambda.
    reconstruction, edited: decoded images [B, h, w, 3] in [0, 1].
    vae_roundtrip: decode(z0), the VAE's own reconstruction of the input.
  """

  z_rec: jax.Array
  z_edit: jax.Array
  reconstruction: jax.Array
  edited: jax.Array
  vae_roundtrip: jax.Array


def edit(eps_fn: sampler.EpsFn, decode_fn: Callable, params: dict, z0, run: noise_lib.RunNoise,
         lam, prompts, guidance, tables: schedule.StepTables,
         config: sampler.SamplerConfig) -> EditOutput:
  """Renders the c0 reconstruction (lambda = 0) and the edit (lambda [T]) of inverted images.

  Decodes all three latents (reconstruction, edit, z0) in one VAE call of batch 3B.

  The same ``pipeline.render_latents`` as text-to-image runs, on the inversion's (x_T, noise).
  params: {"unet", "vae"}; z0: [B, H, W, C]; prompts: pipeline.PromptPair.
  """
  lam = jnp.asarray(lam, jnp.float32)
  b = run.x_T.shape[0]
  # Two sampler calls of batch B, not one of 2B: the reconstruction must follow the inversion's
  # trajectory to float rounding, and a different batch shape rounds differently (CFG-guided
  # sampling amplifies that: ~1e-2 relative after 50 steps on the tiny random model).
  z_rec, z = (pipeline.render_latents(eps_fn, params["unet"], run.x_T, run.noise, l, prompts,
                                      guidance, tables, config)
              for l in (jnp.zeros_like(lam), lam))
  z = jnp.concatenate([z_rec, z])
  images = decode_fn(params["vae"], jnp.concatenate([z, z0.astype(z.dtype)]))
  return EditOutput(z_rec=z[:b], z_edit=z[b:], reconstruction=images[:b],
                    edited=images[b:2 * b], vae_roundtrip=images[2 * b:])


def make_edit_fn(eps_fn: sampler.EpsFn, decode_fn: Callable,
                 config: sampler.SamplerConfig = sampler.SamplerConfig()) -> Callable:
  """A jitted ``edit(params, z0, run, lam, prompts, guidance, tables)`` (weights are arguments)."""
  return jax.jit(functools.partial(edit, eps_fn, decode_fn, config=config))
