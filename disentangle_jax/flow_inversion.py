"""Real-image inversion for the flow-matching sampler: clean latents z0 -> (x_T, noise).

The flow counterpart of inversion.py, with the same output: an initial latent x_T [B,H,W,C]
and a residual tensor noise [T,B,H,W,C] that ``flow_sampler.sample(..., noise=noise)`` adds
after each step, so editing a real image runs the one sampler:

1. forward-noised targets from the seed: xf(s) = (1 - s) z0 + s eps (the rectified-flow path
   FlowMatchEulerDiscreteScheduler.scale_noise samples), eps drawn once per seed;
2. Euler inversion from z0 (sigma = 0) up to sigma_0, conditioned on c0 (with CFG when the
   sampler config has it): x(sigma_i) = x(sigma_{i+1}) + (sigma_i - sigma_{i+1}) v(x(sigma_{i+1}),
   sigma_{i+1} N), the velocity taken where the reverse step starts (``euler_invert``);
3. a reconstruction pass from x_T with c0: step i's Euler update x_det gives the residual
   noise[i] = xf(sigma_{i+1}) - x_det, and x is pinned to that target (``reconstruct_residuals``;
   inversion.py's "next" pinning). Only the first ``inject_steps`` steps get a residual; after
   that x continues deterministically. With injection at every step the lambda = 0 run ends
   exactly at z0 (xf(0) = z0), to float rounding.

Pure and jit-able; step count, shapes and the sampler config are static; weights, embeddings,
guidance, tables, eps and ``inject_steps`` are traced. Shapes: T steps, B batch, H W C latent.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from disentangle_jax import flow_sampler, flow_schedule


def pinning_targets(z0: jax.Array, eps: jax.Array, tables: flow_schedule.FlowTables):
  """[T, B, H, W, C]: xf(sigma_next_i) = (1 - sigma_next_i) z0 + sigma_next_i eps (the last is
  z0, at sigma 0)."""
  s = jnp.asarray(tables.sigma_next, jnp.float32).astype(z0.dtype)[:, None, None, None, None]
  return (1 - s) * z0[None] + s * eps.astype(z0.dtype)[None]


def euler_invert(velocity_fn: flow_sampler.VelocityFn, params, z0: jax.Array, cond, uncond,
                 guidance, tables: flow_schedule.FlowTables,
                 config: flow_sampler.FlowSamplerConfig = flow_sampler.FlowSamplerConfig(),
                 embedded_guidance=0.0) -> jax.Array:
  """Runs the Euler steps backwards from z0 [B,H,W,C]; returns x_T at sigma_0.

  ``cond``: per-step conditioning as the sampler takes it (leaves [T, L, D]; step i's entry is
  used for step i's reverse step).
  """
  guidance, embedded_guidance, sigma, sigma_next, timesteps = flow_sampler.step_arrays(
      tables, z0.dtype, guidance, embedded_guidance)
  # The reverse step starts at sigma_next_i = sigma_{i+1}: the model sees that level's
  # scheduler timestep (timesteps[i + 1]; 0 at the clean end).
  t_start = jnp.concatenate([timesteps[1:], jnp.zeros((1,), jnp.float32)])

  def body(x, xs):
    t, s, s_next, cond_i = xs
    v = flow_sampler.guided_velocity(velocity_fn, params, x, t, cond_i, uncond, guidance,
                                     embedded_guidance, config.cfg)
    return x + (s - s_next) * v, None

  body = flow_sampler.maybe_remat(body, config.remat)
  reverse = lambda a: jax.tree.map(lambda leaf: leaf[::-1], a)  # pylint: disable=unnecessary-lambda-assignment
  x_T, _ = jax.lax.scan(body, z0, reverse((t_start, sigma, sigma_next, cond)))
  return x_T


def reconstruct_residuals(velocity_fn: flow_sampler.VelocityFn, params, x_T: jax.Array,
                          targets: jax.Array, cond, uncond, guidance,
                          tables: flow_schedule.FlowTables,
                          config: flow_sampler.FlowSamplerConfig = flow_sampler.FlowSamplerConfig(),
                          embedded_guidance=0.0, inject_steps=None) -> jax.Array:
  """noise [T, B, H, W, C]: targets[i] minus step i's Euler update of the pinned x (zero from
  step ``inject_steps`` on; None = every step)."""
  num_steps = targets.shape[0]
  inject_steps = num_steps if inject_steps is None else inject_steps
  guidance, embedded_guidance, sigma, sigma_next, timesteps = flow_sampler.step_arrays(
      tables, x_T.dtype, guidance, embedded_guidance)
  inject = jnp.arange(num_steps) < inject_steps

  def body(x, xs):
    t, s, s_next, target, use, cond_i = xs
    v = flow_sampler.guided_velocity(velocity_fn, params, x, t, cond_i, uncond, guidance,
                                     embedded_guidance, config.cfg)
    x_det = x + (s_next - s) * v
    # where, not a product: a skipped step adds an exact zero.
    residual = jnp.where(use, target - x_det, jnp.zeros_like(x_det))
    return x_det + residual, residual

  body = flow_sampler.maybe_remat(body, config.remat)
  _, noise = jax.lax.scan(body, x_T, (timesteps, sigma, sigma_next, targets.astype(x_T.dtype),
                                      inject, cond))
  return noise


def invert(velocity_fn: flow_sampler.VelocityFn, params, z0: jax.Array, eps: jax.Array, cond,
           uncond, guidance, tables: flow_schedule.FlowTables,
           config: flow_sampler.FlowSamplerConfig = flow_sampler.FlowSamplerConfig(),
           embedded_guidance=0.0, inject_steps=None):
  """(x_T, noise) of z0 [B,H,W,C] for ``flow_sampler.sample(..., noise=noise)`` (module
  docstring); ``eps`` [B,H,W,C] is the seed's target noise."""
  x_T = euler_invert(velocity_fn, params, z0, cond, uncond, guidance, tables, config,
                     embedded_guidance)
  targets = pinning_targets(z0, eps, tables)
  noise = reconstruct_residuals(velocity_fn, params, x_T, targets, cond, uncond, guidance,
                                tables, config, embedded_guidance, inject_steps)
  return x_T, noise
