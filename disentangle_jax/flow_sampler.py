"""The flow-matching Euler sampler of SD 3.x and Flux.1 as a pure ``jax.lax.scan``.

x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i (+ noise[i]), with v_i the transformer's velocity
at (x_i, t_i) conditioned on the step's embedding c_i (``mixing.mix``: c_i = lam[i] c1 +
(1 - lam[i]) c0, tokens and pooled vector mixed with the same lam[i]). Guidance:

  CFG (``config.cfg``; SD 3.x, and Flux's "true CFG" with a negative prompt): one batched call
    of 2B, unconditional half first, v = v_u + guidance (v_c - v_u). The unconditional
    (negative-prompt) embedding is never mixed.
  distilled guidance (Flux.1-dev): ``embedded_guidance`` is a model input, not a combination;
    the velocity function receives it every call (SD3 ignores it).

Like sampler.py, the sampler draws no random numbers: x_T and the optional additive ``noise``
[T, B, H, W, C] (an inversion's residuals; None for text-to-image) are inputs, the tables
(flow_schedule.tables) and the per-step embeddings enter the scan as data. Everything a user
varies (lambda through the embeddings, guidance, embedded guidance, x_T, the weights) is traced,
so changing it never recompiles; the step count, shapes, ``config`` and whether ``noise`` is
given are static.

The velocity function: ``velocity_fn(params, x [N,H,W,C], t [] float32 (the scheduler's
timestep, sigma * 1000), cond (pytree of [N, L, D] leaves), embedded_guidance []) -> v
[N,H,W,C]``; ``sd3_velocity_fn`` and ``flux_velocity_fn`` wrap the modules of models/.

Shapes: T steps, B batch, H W C latent (NHWC), L tokens, D width; conditioning pytrees
{"tokens": [L, D], "pooled": [1, P]} (the pooled vector as a one-token leaf, as for SDXL).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors
from disentangle_jax import flow_schedule
from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit

VelocityFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], jax.Array]

# Rematerialisation policies for the step body (names used in configs; as sampler.py).
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: fastest forward, memory grows with T under grad
    "full": jax.checkpoint_policies.nothing_saveable,  # save only the carry: flat in T
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class FlowSamplerConfig:
  """Static sampler choices (a change recompiles)."""

  cfg: bool = True  # classifier-free guidance with an unconditional / negative embedding
  remat: str = "none"  # a key of REMAT_POLICIES (jax.checkpoint around each step)

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise errors.UserError(
          f"sampler.remat={self.remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}.")


def _broadcast_leaf(b, leaf):
  """[L, D] or [B, L, D] -> [B, L, D]."""
  return jnp.broadcast_to(leaf, (b,) + leaf.shape[-2:])


def guided_velocity(velocity_fn: VelocityFn, params, x, t, cond, uncond, guidance,
                    embedded_guidance, cfg: bool):
  """v at (x [B,H,W,C], t []) for the step's cond (leaves [L, D] or [B, L, D]); with ``cfg``
  one call of batch 2B and v_u + guidance (v_c - v_u)."""
  b = x.shape[0]
  if not cfg:
    v = velocity_fn(params, x, t, jax.tree.map(functools.partial(_broadcast_leaf, b), cond),
                    embedded_guidance)
    return v.astype(x.dtype)
  emb = jax.tree.map(
      lambda u, c: jnp.concatenate([_broadcast_leaf(b, u).astype(c.dtype), _broadcast_leaf(b, c)]),
      uncond, cond)
  v = velocity_fn(params, jnp.concatenate([x, x]), t, emb, embedded_guidance).astype(x.dtype)
  v_u, v_c = v[:b], v[b:]
  return v_u + guidance * (v_c - v_u)


def check_inputs(x_T, cond, uncond, tables: flow_schedule.FlowTables, noise, cfg: bool) -> int:
  """Checks the shapes of the sampler's inputs; returns T. Raises ValueError naming the input."""
  if x_T.ndim != 4:
    raise ValueError(f"x_T must be [B, H, W, C]; got shape {tuple(x_T.shape)}.")
  num_steps = int(np.shape(tables.timesteps)[0])
  for name in ("sigma", "sigma_next"):
    if np.shape(getattr(tables, name)) != (num_steps,):
      raise ValueError(f"tables.{name} has shape {np.shape(getattr(tables, name))}; expected "
                       f"({num_steps},) like tables.timesteps.")
  if noise is not None and tuple(noise.shape) != (num_steps,) + tuple(x_T.shape):
    raise ValueError(f"noise has shape {tuple(noise.shape)}; expected [T, B, H, W, C] = "
                     f"{(num_steps,) + tuple(x_T.shape)}.")
  if cfg and jax.tree.structure(cond) != jax.tree.structure(uncond):
    raise ValueError(f"cond is {jax.tree.structure(cond)} but uncond is "
                     f"{jax.tree.structure(uncond)}: encode both with the same model.")
  for leaf in jax.tree.leaves(cond):
    if leaf.ndim not in (3, 4) or leaf.shape[0] != num_steps:
      raise ValueError(f"cond has a leaf of shape {tuple(leaf.shape)}; expected [T, L, D] or "
                       f"[T, B, L, D] with T = {num_steps} (one embedding per step: mixing.mix).")
    if leaf.ndim == 4 and leaf.shape[1] != x_T.shape[0]:
      raise ValueError(f"cond has batch {leaf.shape[1]} but x_T has batch {x_T.shape[0]}.")
  return num_steps


def maybe_remat(fn, remat: str):
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


def step_arrays(tables: flow_schedule.FlowTables, dtype, guidance, embedded_guidance):
  """(guidance, embedded_guidance, sigma [T], sigma_next [T]) in the latents' dtype, and the
  timesteps [T] in float32: the velocity function gets the scheduler's float32 timestep, as
  diffusers passes it. Shared by the sampler and the inversion (flow_inversion.py)."""
  return (jnp.asarray(guidance, dtype), jnp.asarray(embedded_guidance, dtype),
          jnp.asarray(tables.sigma, jnp.float32).astype(dtype),
          jnp.asarray(tables.sigma_next, jnp.float32).astype(dtype),
          jnp.asarray(tables.timesteps, jnp.float32))


def _euler_step(velocity_fn, params, uncond, guidance, embedded_guidance, cfg, x, xs):
  t, sigma, sigma_next, noise_i, cond_i = xs
  v = guided_velocity(velocity_fn, params, x, t, cond_i, uncond, guidance, embedded_guidance,
                      cfg)
  x_next = x + (sigma_next - sigma) * v
  return x_next if noise_i is None else x_next + noise_i


def sample(velocity_fn: VelocityFn, params, x_T: jax.Array, cond, uncond, guidance,
           tables: flow_schedule.FlowTables, config: FlowSamplerConfig = FlowSamplerConfig(),
           embedded_guidance=0.0, noise: jax.Array | None = None,
           trajectory: bool = False) -> jax.Array:
  """Runs the T-step Euler sampler; returns x_0 [B, H, W, C] (the clean latents).

  Args:
    velocity_fn: the transformer (static; module docstring).
    params: its weights (a pytree; traced).
    x_T: [B, H, W, C] initial latents (pure noise at sigma_0 = 1).
    cond: per-step conditioning, leaves [T, L, D] or [T, B, L, D] (``mixing.mix``).
    uncond: the unconditional / negative embedding, leaves [L, D] or [B, L, D] (ignored unless
      ``config.cfg``).
    guidance: [] CFG scale (SD 3.5: 3.5-7; Flux true CFG: ``true_cfg_scale``).
    tables: ``flow_schedule.tables(...)`` for T steps (numpy or traced).
    config: static CFG switch and step remat policy.
    embedded_guidance: [] Flux.1-dev's distilled guidance (3.5), passed to every call.
    noise: optional [T, B, H, W, C] added after step i's update (None: none, static).
    trajectory: (static) return the latents after every step, [T, B, H, W, C].
  """
  check_inputs(x_T, cond, uncond, tables, noise, config.cfg)
  dtype = x_T.dtype
  guidance, embedded_guidance, sigma, sigma_next, timesteps = step_arrays(
      tables, dtype, guidance, embedded_guidance)
  if noise is not None:
    noise = noise.astype(dtype)

  def body(x, xs):
    x_next = _euler_step(velocity_fn, params, uncond, guidance, embedded_guidance, config.cfg,
                         x, xs)
    return x_next, (x_next if trajectory else None)

  body = maybe_remat(body, config.remat)
  x0, xs = jax.lax.scan(body, x_T, (timesteps, sigma, sigma_next, noise, cond))
  return xs if trajectory else x0


def sd3_velocity_fn(module: mmdit.MMDiT) -> VelocityFn:
  """velocity_fn of an MMDiT: cond {"tokens": [N, L, J], "pooled": [N, 1, P]}; the timestep
  enters as the float scheduler timestep (StableDiffusion3Pipeline passes t itself)."""

  def velocity(params, x, t, cond, embedded_guidance):
    del embedded_guidance  # SD3 has no guidance embedding
    n = x.shape[0]
    return module.apply({"params": params}, x, cond["tokens"], cond["pooled"][:, 0],
                        jnp.broadcast_to(jnp.asarray(t, jnp.float32), (n,)))

  return velocity


def flux_velocity_fn(module: flux_lib.Flux) -> VelocityFn:
  """velocity_fn of a Flux transformer on NHWC latents: cond {"tokens": [N, L, J], "pooled":
  [N, 1, P]}; FluxPipeline passes t / 1000 (float32) and the model multiplies it back; the
  embedded guidance is used only by guidance-distilled models (config.guidance_embeds)."""

  def velocity(params, x, t, cond, embedded_guidance):
    t = jnp.asarray(t, jnp.float32) / jnp.float32(1000)
    guidance = embedded_guidance if module.config.guidance_embeds else None
    return flux_lib.velocity(module, params, x, cond["tokens"], cond["pooled"][:, 0], t,
                             guidance)

  return velocity
