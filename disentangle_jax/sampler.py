"""DDIM and PLMS samplers as pure ``jax.lax.scan`` functions over precomputed inputs.

The sampler never draws random numbers: it receives the initial latent x_T and an additive
noise tensor (``noise.draw`` for text-to-image, the inversion residuals for real images), the
per-step conditional embeddings (``mixing.mix``) and the coefficient tables
(``schedule.step_tables``). Everything a user varies between runs — lambda (through the
embeddings), guidance, eta (through the tables), noise, x_T, the weights — is a traced argument,
so changing it never recompiles; only the step count, shapes, sampler kind and remat policy are
static.

Shapes: T steps, B batch, H W C latent (NHWC), L tokens, D embedding width.

The noise predictor is any function ``eps_fn(params, x [N,H,W,C], t [] int32, emb [N,L,D]) ->
[N,H,W,C]`` (``models.make_eps_fn`` wraps the Flax UNet; tests use analytic predictors). CFG
evaluates the unconditional and the conditional halves in one batched call of size 2B.

What the network predicts is a property of the predictor, not of the call: a plain function
predicts the noise epsilon; a ``Predictor(fn, "v_prediction")`` (SD 2.x 768 px) predicts
v = sqrt(a) eps - sqrt(1 - a) x0. Guidance and PLMS' Adams-Bashforth combine the raw outputs
(as diffusers does); ``ddim_update`` converts the combined output to (x0, eps) with the current
sample and level, exactly as diffusers' DDIMScheduler / PNDMScheduler / DDIMInverseScheduler.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors, mixing
from disentangle_jax import schedule as schedule_lib

EpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

PREDICTION_TYPES = schedule_lib.PREDICTION_TYPES


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A noise-prediction network that states what it predicts (static; hashable).

  Calls like the wrapped ``fn``; ``prediction_type`` is "epsilon" or "v_prediction" (the
  model's scheduler config). Plain functions are epsilon predictors (``prediction_type_of``).
  """

  fn: Callable
  prediction_type: str = "epsilon"

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise errors.UserError(f"scheduler prediction_type={self.prediction_type!r} is not "
                             f"supported; use one of {PREDICTION_TYPES}.")

  def __call__(self, params, x, t, emb):
    return self.fn(params, x, t, emb)

  @property
  def prepare(self):
    """The wrapped network's loop-invariant weight transform, if any (``prepare_params``)."""
    return getattr(self.fn, "prepare", None)


def prediction_type_of(eps_fn) -> str:
  """What ``eps_fn`` predicts: its ``prediction_type`` ("epsilon" for a plain function)."""
  return getattr(eps_fn, "prediction_type", "epsilon")

SAMPLER_KINDS = ("ddim", "plms")

# Rematerialisation policies for the step body (names used in configs).
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: fastest forward, memory grows with T under grad
    "full": jax.checkpoint_policies.nothing_saveable,  # save only the carry: flat in T
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Adams-Bashforth weights of PLMS for steps 1, 2 and >= 3, on (e_i, e_{i-1}, e_{i-2}, e_{i-3}).
_PLMS_COEFS = np.array([
    [3 / 2, -1 / 2, 0, 0],
    [23 / 12, -16 / 12, 5 / 12, 0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler choices (a change recompiles)."""

  kind: str = "ddim"  # "ddim" (any eta) | "plms" (the reference release's sampler, eta = 0)
  remat: str = "none"  # a key of REMAT_POLICIES

  def __post_init__(self):
    if self.kind not in SAMPLER_KINDS:
      raise errors.UserError(f"sampler.kind={self.kind!r} is unknown; use one of {SAMPLER_KINDS}.")
    if self.remat not in REMAT_POLICIES:
      raise errors.UserError(
          f"sampler.remat={self.remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}.")


# Accepted ranges of the sampling settings (checked once, before any work).
MAX_ETA = 1.0  # eta > 1 makes sqrt(1 - a_prev - sigma^2) imaginary (NaN latents)
MAX_GUIDANCE = 100.0
# A sampler takes at most one step per training timestep, and every supported family's
# schedule has 1000 (SD 1.x/2.x/XL, SD 3.x, Flux.1): a larger num_steps is refused here, before
# the per-step tables and noise (T x latents) are allocated.
MAX_NUM_STEPS = 1000


def check_settings(num_steps, kind: str = "ddim", eta=0.0, guidance=7.5) -> None:
  """Validates the sampling settings every program shares; errors name the config field."""
  errors.check_number("num_steps", num_steps, low=1, high=MAX_NUM_STEPS, integer=True,
                      hint="50 in the paper; at most one step per training timestep.")
  SamplerConfig(kind=kind)
  errors.check_number("eta", eta, low=0, high=MAX_ETA, hint="0 = deterministic DDIM.")
  errors.check_number("guidance", guidance, low=0, high=MAX_GUIDANCE, hint="7.5 in the paper.")
  if kind == "plms" and eta != 0:
    raise errors.UserError(f"eta={eta} with sampler='plms': PLMS is deterministic; set eta=0 "
                           "or use sampler='ddim'.")


def cfg_eps(eps_fn: EpsFn, params, x, t, cond, uncond, guidance):
  """Classifier-free guided noise prediction in one UNet call of batch 2B.

  Args:
    x: [B, H, W, C]; t: [] int; cond: [L, D] or [B, L, D]; uncond: [L, D] or [B, L, D] (or
    pytrees of such leaves, e.g. SDXL's tokens + pooled; eps_fn gets the [2B, L, D] pytree);
    guidance: [] (e = e_u + guidance * (e_c - e_u)).
  """
  b = x.shape[0]
  e = eps_fn(params, jnp.concatenate([x, x]), t,
             jax.tree.map(functools.partial(_cfg_batch, b), uncond, cond))
  e = e.astype(x.dtype)
  e_u, e_c = e[:b], e[b:]
  return e_u + guidance * (e_c - e_u)


def _cfg_batch(b, uncond, cond):
  """[2B, L, D]: the unconditional half, then the conditional half."""
  cond = jnp.broadcast_to(cond, (b,) + cond.shape[-2:])
  uncond = jnp.broadcast_to(uncond, (b,) + uncond.shape[-2:]).astype(cond.dtype)
  return jnp.concatenate([uncond, cond])


def ddim_update(x, e, alpha, alpha_prev, sigma, prediction_type: str = "epsilon"):
  """One DDIM step without its noise term: returns (x_next_mean, x0_hat).

  x0_hat = (x - sqrt(1 - a) e) / sqrt(a);  x_next = sqrt(a_prev) x0_hat + sqrt(1 - a_prev -
  sigma^2) e. The caller adds noise[i] (= sigma_i z_i, or an inversion residual).
  With ``prediction_type="v_prediction"`` (static) ``e`` is v: x0_hat = sqrt(a) x - sqrt(1 - a) v
  and the noise is sqrt(a) v + sqrt(1 - a) x (diffusers' formulas; finite at a = 0).
  """
  if prediction_type == "v_prediction":
    x0 = jnp.sqrt(alpha) * x - jnp.sqrt(1 - alpha) * e
    e = jnp.sqrt(alpha) * e + jnp.sqrt(1 - alpha) * x
    direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - sigma**2, 0)) * e
    return jnp.sqrt(alpha_prev) * x0 + direction, x0
  if prediction_type != "epsilon":
    raise ValueError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}.")
  x0 = (x - jnp.sqrt(1 - alpha) * e) / jnp.sqrt(alpha)
  direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - sigma**2, 0)) * e
  return jnp.sqrt(alpha_prev) * x0 + direction, x0


def _maybe_remat(fn, remat: str):
  policy = REMAT_POLICIES[remat]
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _tables_as_arrays(tables: schedule_lib.StepTables, dtype):
  return schedule_lib.StepTables(
      timesteps=jnp.asarray(tables.timesteps, jnp.int32),
      alpha=jnp.asarray(tables.alpha).astype(dtype),
      alpha_prev=jnp.asarray(tables.alpha_prev).astype(dtype),
      sigma=jnp.asarray(tables.sigma).astype(dtype),
      next_timesteps=jnp.asarray(tables.next_timesteps, jnp.int32),
  )


def check_inputs(x_T, noise, cond, uncond, tables) -> int:
  """Checks the shapes of the sampler's inputs; returns T. Raises ValueError naming the input."""
  if x_T.ndim != 4:
    raise ValueError(f"x_T must be [B, H, W, C]; got shape {tuple(x_T.shape)}.")
  num_steps = int(np.shape(tables.timesteps)[0])
  for name in ("alpha", "alpha_prev", "sigma", "next_timesteps"):
    if np.shape(getattr(tables, name)) != (num_steps,):
      raise ValueError(f"tables.{name} has shape {np.shape(getattr(tables, name))}; "
                       f"expected ({num_steps},) like tables.timesteps.")
  if tuple(noise.shape) != (num_steps,) + tuple(x_T.shape):
    raise ValueError(f"noise has shape {tuple(noise.shape)}; expected [T, B, H, W, C] = "
                     f"{(num_steps,) + tuple(x_T.shape)} (T = {num_steps} steps, x_T "
                     f"{tuple(x_T.shape)}).")
  if jax.tree.structure(cond) != jax.tree.structure(uncond):
    raise ValueError(f"cond is {jax.tree.structure(cond)} but uncond is "
                     f"{jax.tree.structure(uncond)}: encode both with the same model.")
  for cond, uncond in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
    if cond.ndim not in (3, 4) or cond.shape[0] != num_steps:
      raise ValueError(f"cond has shape {tuple(cond.shape)}; expected [T, L, D] or [T, B, L, D] "
                       f"with T = {num_steps} (one embedding per step: mixing.mix).")
    if cond.ndim == 4 and cond.shape[1] != x_T.shape[0]:
      raise ValueError(f"cond has batch {cond.shape[1]} but x_T has batch {x_T.shape[0]}.")
    if tuple(uncond.shape[-2:]) != tuple(cond.shape[-2:]):
      raise ValueError(f"uncond has shape {tuple(uncond.shape)} but cond's embeddings are "
                       f"{tuple(cond.shape[-2:])} [L, D]: encode both with the same text encoder.")
  return num_steps


def prepare_params(eps_fn: EpsFn, params):
  """``eps_fn.prepare(params)`` if ``eps_fn`` has one, else ``params``: loop-invariant weight
  transforms (``fast_conv.prepare``'s flipped kernels), computed once outside the scan."""
  prepare = getattr(eps_fn, "prepare", None)
  return params if prepare is None else prepare(params)


def _ddim_step(eps_fn, params, uncond, guidance, x, xs):
  t, alpha, alpha_prev, sigma, noise_i, cond_i = xs
  e = cfg_eps(eps_fn, params, x, t, cond_i, uncond, guidance)
  x_next, _ = ddim_update(x, e, alpha, alpha_prev, sigma, prediction_type_of(eps_fn))
  return x_next + noise_i


def _plms_first_step(eps_fn, params, uncond, guidance, x, t, t_next, alpha, alpha_prev, cond_0,
                     noise_0, single_step: bool):
  """PLMS step 0: a pseudo improved Euler step (one extra UNet call at t_1, same c_0)."""
  pred = prediction_type_of(eps_fn)
  e0 = cfg_eps(eps_fn, params, x, t, cond_0, uncond, guidance)
  if single_step:  # diffusers' PNDM with one step: a plain DDIM step.
    x_next, _ = ddim_update(x, e0, alpha, alpha_prev, 0.0, pred)
    return x_next + noise_0, e0
  x_pred, _ = ddim_update(x, e0, alpha, alpha_prev, 0.0, pred)
  e_next = cfg_eps(eps_fn, params, x_pred, t_next, cond_0, uncond, guidance)
  # Averaged raw outputs, converted with x and step 0's level (PNDM's cur_sample).
  x_next, _ = ddim_update(x, (e0 + e_next) / 2, alpha, alpha_prev, 0.0, pred)
  return x_next + noise_0, e0


def _plms_step(eps_fn, params, uncond, guidance, carry, xs):
  x, hist = carry  # hist [3, B, H, W, C]: e_{i-1}, e_{i-2}, e_{i-3}
  t, alpha, alpha_prev, coefs, noise_i, cond_i = xs
  e = cfg_eps(eps_fn, params, x, t, cond_i, uncond, guidance)
  e_prime = coefs[0] * e + coefs[1] * hist[0] + coefs[2] * hist[1] + coefs[3] * hist[2]
  x_next, _ = ddim_update(x, e_prime, alpha, alpha_prev, 0.0, prediction_type_of(eps_fn))
  hist = jnp.concatenate([e[None], hist[:2]])
  return (x_next + noise_i, hist)


def sample(eps_fn: EpsFn, params, x_T: jax.Array, noise: jax.Array, cond: jax.Array,
           uncond: jax.Array, guidance, tables: schedule_lib.StepTables,
           config: SamplerConfig = SamplerConfig(), trajectory: bool = False) -> jax.Array:
  """Runs the T-step sampler; returns the final latents x_0 [B, H, W, C].

  With ``trajectory=True`` (static) it returns the latents after every step instead,
  [T, B, H, W, C] (the last entry is x_0): for step-by-step comparisons and visualisation.

  Args:
    eps_fn: noise predictor (static; see module docstring).
    params: its parameters (a pytree; traced).
    x_T: [B, H, W, C] initial latents.
    noise: [T, B, H, W, C] added after step i's deterministic update.
    cond: [T, L, D] or [T, B, L, D] conditional embedding of each step (or a pytree of such
      leaves, the structure the model's eps_fn takes: ``mixing.mix``).
    uncond: [L, D] (or [B, L, D]) unconditional embedding, never mixed (same structure).
    guidance: [] CFG scale (7.5 in the paper).
    tables: ``schedule.step_tables(...)`` for T steps (numpy or traced arrays).
    config: static sampler kind and remat policy.

  PLMS is deterministic: it ignores ``tables.sigma`` but still adds ``noise``. A
  ``Predictor`` with prediction_type "v_prediction" is sampled as diffusers does (module
  docstring).
  """
  num_steps = check_inputs(x_T, noise, cond, uncond, tables)
  params = prepare_params(eps_fn, params)
  dtype = x_T.dtype
  tb = _tables_as_arrays(tables, dtype)
  guidance = jnp.asarray(guidance, dtype)
  noise = noise.astype(dtype)

  if config.kind == "ddim":
    def body(x, xs):
      x_next = _ddim_step(eps_fn, params, uncond, guidance, x, xs)
      return x_next, (x_next if trajectory else None)

    body = _maybe_remat(body, config.remat)
    x0, xs = jax.lax.scan(
        body, x_T, (tb.timesteps, tb.alpha, tb.alpha_prev, tb.sigma, noise, cond))
    return xs if trajectory else x0

  # PLMS.
  first = _maybe_remat(
      lambda p, x, *a: _plms_first_step(eps_fn, p, uncond, guidance, x, *a,
                                        single_step=num_steps == 1), config.remat)
  x1, e0 = first(params, x_T, tb.timesteps[0], tb.next_timesteps[0], tb.alpha[0],
                 tb.alpha_prev[0], mixing.select(cond, 0), noise[0])
  if num_steps == 1:
    return x1[None] if trajectory else x1
  coefs = np.concatenate([_PLMS_COEFS, np.repeat(_PLMS_COEFS[-1:], max(num_steps - 4, 0), 0)])
  coefs = jnp.asarray(coefs[:num_steps - 1], dtype)
  hist0 = jnp.concatenate([e0[None], jnp.zeros((2,) + e0.shape, dtype)])

  def plms_body(carry, xs):
    carry = _plms_step(eps_fn, params, uncond, guidance, carry, xs)
    return carry, (carry[0] if trajectory else None)

  plms_body = _maybe_remat(plms_body, config.remat)
  (x0, _), xs = jax.lax.scan(
      plms_body, (x1, hist0),
      (tb.timesteps[1:], tb.alpha[1:], tb.alpha_prev[1:], coefs, noise[1:],
       mixing.select(cond, slice(1, None))))
  return jnp.concatenate([x1[None], xs]) if trajectory else x0
