"""Optimising the per-step mixing weights (docs/METHOD.md section 4).

    original = decode(sample(x_T, noise, lambda = 0))      # the pure-c0 reference, computed once
    edited   = decode(sample(x_T, noise, lambda))
    loss     = L_dir(original, edited, text0, text1) + beta * L_perc(edited, original)

The gradient flows through every sampling step, the VAE decoder and both frozen loss networks
into lambda (float32 [T], or [T, L] per token); nothing else is trained. With a batch of
seeds the loss is the (masked) mean over the batch, so one lambda is learned for all of them;
the batch may be sharded over devices (parallel.py) without changing this code.

Several edits (K attributes, each with its own prompts and seeds) can be learned in one
program: lambda is then [K, T], each batch item belongs to one edit (``EditProblem.group``),
and the loss is the sum over edits of each edit's masked mean. The edits share no term and
Adam is elementwise, so this equals K separate optimisations, in one compiled program.

Everything traced lives in ``EditProblem`` (arrays) and the params; everything static (apply
functions, sizes, sampler kind, loss weights, optimiser) lives in ``Networks``, ``LossConfig``,
the sampler config and the optax transformation, so one program is compiled per shape and
reused every iteration.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from disentangle_jax import errors, losses, mixing, pipeline, sampler, schedule

# Sane upper bounds of the objective's settings: lambda is O(1), so a larger learning rate or
# content weight can only blow the run up (checked before any work; NaN guard in disentangle).
MAX_LEARNING_RATE = 10.0
MAX_BETA = 1e3


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static choices of the objective."""

  beta: float = 0.05  # weight of the VGG perceptual content loss
  preprocess: str = "release"  # CLIP preprocessing: "release" (x7 nearest, pool 16) | "standard"
  round_reference: bool = False  # the release's quirk: the reference image rounded to uint8

  def __post_init__(self):
    if self.preprocess not in losses.PREPROCESS_MODES:
      raise ValueError(f"loss.preprocess={self.preprocess!r} is unknown; use one of "
                       f"{losses.PREPROCESS_MODES}.")
    errors.check_number("loss.beta", self.beta, low=0, high=MAX_BETA,
                        hint="0.05 in the paper (0.03 for some attributes).")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optax optimiser of lambda."""

  name: str = "adam"  # "adam" | "sgd" | "adamw"
  learning_rate: float = 0.05
  schedule: str = "constant"  # "constant" | "cosine" (decay to 0 over the iterations)
  iterations: int = 10

  def __post_init__(self):
    if self.name not in ("adam", "sgd", "adamw"):
      raise ValueError(f"optimizer.name={self.name!r} is unknown; use adam, sgd or adamw.")
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"optimizer.schedule={self.schedule!r} is unknown; use constant or cosine.")
    errors.check_number("optimizer.iterations", self.iterations, low=1, integer=True,
                        hint="10 in the paper.")
    errors.check_number("optimizer.learning_rate", self.learning_rate, low=0, low_open=True,
                        high=MAX_LEARNING_RATE, hint="0.05 in the paper.")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  lr = cfg.learning_rate
  if cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.learning_rate, cfg.iterations)
  return {"adam": optax.adam, "sgd": optax.sgd, "adamw": optax.adamw}[cfg.name](lr)


class Networks(NamedTuple):
  """Static apply functions and sizes of every network in the objective (no weights)."""

  eps: sampler.EpsFn
  decode: Callable
  clip_image: Callable
  vgg: Callable
  clip_image_size: int
  vgg_input_size: int


class EditProblem(NamedTuple):
  """Every traced input of one optimisation (a pytree; batch B may be sharded).

  Attributes:
    x_T: [B, H, W, C]; noise: [T, B, H, W, C] (noise.draw, or an inversion's residuals).
    prompts: c0, c1 [K, L, D] of each of the K edits; uncond [L, D].
    guidance: [] CFG scale.
    tables: schedule.StepTables of T steps.
    reference: [B, h, w, 3] the pure-c0 images the loss compares against.
    text0, text1: [K, E] CLIP text features of each edit's neutral and target prompt.
    mask: [B] 1 for real items, 0 for padding (parallel.pad_batch).
    group: [B] int32, the edit (in [0, K)) each item belongs to.
  """

  x_T: jax.Array
  noise: jax.Array
  prompts: pipeline.PromptPair
  guidance: jax.Array
  tables: schedule.StepTables
  reference: jax.Array
  text0: jax.Array
  text1: jax.Array
  mask: jax.Array
  group: jax.Array


def per_item(lam, prompts: pipeline.PromptPair, group):
  """lambda [T] (one edit), [K, T] or per token [K, T, L], prompts [K, L, D], group [B] ->
  (lambda of each item: [T, B], or mixing.PerToken [T, B, L]; per-item PromptPair with c0, c1
  [B, L, D]). Here the edit axis K is always present from two dimensions on, so the number of
  dimensions tells per step from per token."""
  lam = jnp.asarray(lam)
  lam_k = lam[None] if lam.ndim == 1 else lam
  items = jnp.moveaxis(lam_k[group], 0, 1)  # [T, B] or [T, B, L]
  return (mixing.PerToken(items) if lam.ndim == 3 else items,
          pipeline.PromptPair(c0=mixing.select(prompts.c0, group),
                              c1=mixing.select(prompts.c1, group), uncond=prompts.uncond))


class TrainState(NamedTuple):
  step: jax.Array  # [] int32, iterations done
  lam: jax.Array  # [T], [K, T] or per token [K, T, L] float32
  opt_state: Any


def init_state(lam, tx: optax.GradientTransformation) -> TrainState:
  lam = jnp.asarray(lam, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), lam=lam, opt_state=tx.init(lam))


def round_to_uint8_levels(images: jax.Array) -> jax.Array:
  """The release's reference quirk: images quantised to 8 bits (kept as floats in [0, 1])."""
  return jnp.round(images * 255.0) / 255.0


def objective(lam, params, problem: EditProblem, nets: Networks, loss_cfg: LossConfig,
              sampler_cfg: sampler.SamplerConfig):
  """Returns (loss [], aux) with aux = {"l_dir", "l_perc" [K] (each edit's masked mean),
  "images" [B, h, w, 3]}; loss = sum over the K edits of L_dir + beta * L_perc.

  lam: [T] (one edit, K = 1), [K, T], or per token [K, T, L] (``per_item``).
  params: {"sd": {"unet", "vae"}, "clip", "vgg"}.
  """
  num_edits = 1 if jnp.ndim(lam) == 1 else lam.shape[0]
  lam_items, prompts = per_item(lam, problem.prompts, problem.group)
  images = pipeline.render(nets.eps, nets.decode, params["sd"], problem.x_T, problem.noise,
                           lam_items, prompts, problem.guidance, problem.tables, sampler_cfg)
  f_ref = losses.clip_image_features(nets.clip_image, params["clip"], problem.reference,
                                     loss_cfg.preprocess, nets.clip_image_size)
  f_edit = losses.clip_image_features(nets.clip_image, params["clip"], images,
                                      loss_cfg.preprocess, nets.clip_image_size)
  l_dir = losses.directional_clip_loss(f_ref, f_edit, problem.text0[problem.group],
                                       problem.text1[problem.group])
  l_perc = losses.vgg_perceptual_loss(nets.vgg, params["vgg"], images, problem.reference,
                                      nets.vgg_input_size)
  count = jax.ops.segment_sum(problem.mask, problem.group, num_segments=num_edits)
  w = problem.mask / count[problem.group]
  # where, not a product: a padded item can never leak in, not even as 0 * inf.
  l_dir, l_perc = (jax.ops.segment_sum(jnp.where(problem.mask > 0, w * l, 0), problem.group,
                                       num_segments=num_edits) for l in (l_dir, l_perc))
  loss = jnp.sum(l_dir + loss_cfg.beta * l_perc)
  return loss, {"l_dir": l_dir, "l_perc": l_perc, "images": images}


def update_step(state: TrainState, params, problem: EditProblem, *, nets: Networks,
                loss_cfg: LossConfig, sampler_cfg: sampler.SamplerConfig,
                tx: optax.GradientTransformation):
  """One optimiser step. Returns (new state, metrics, images rendered with the OLD lambda)."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (loss, aux), grad = grad_fn(state.lam, params, problem, nets, loss_cfg, sampler_cfg)
  updates, opt_state = tx.update(grad, state.opt_state, state.lam)
  lam = optax.apply_updates(state.lam, updates)
  metrics = {"loss": loss, "l_dir": aux["l_dir"], "l_perc": aux["l_perc"],  # [K] per edit
             "grad_norm": jnp.linalg.norm(grad)}
  return TrainState(state.step + 1, lam, opt_state), metrics, aux["images"]


def make_update_fn(nets: Networks, loss_cfg: LossConfig, sampler_cfg: sampler.SamplerConfig,
                   tx: optax.GradientTransformation) -> Callable:
  """The jitted ``update(state, params, problem) -> (state, metrics, images)``.

  The old state is donated: lambda and the optimiser moments are updated in place.
  """
  def update(state, params, problem):
    return update_step(state, params, problem, nets=nets, loss_cfg=loss_cfg,
                       sampler_cfg=sampler_cfg, tx=tx)

  return jax.jit(update, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def make_problem_render_fn(nets: Networks, sampler_cfg: sampler.SamplerConfig) -> Callable:
  """The jitted ``render(sd_params, problem, lam) -> images`` (reference, final and transfer
  renders). It reads only the sampler inputs of ``problem``, so the reference images and the
  mask may change without a recompile. One per (networks, sampler settings): equal calls share
  the compiled programs."""
  @jax.jit
  def _render(sd_params, x_T, noise, prompts, guidance, tables, group, lam):
    lam_items, item_prompts = per_item(lam, prompts, group)
    return pipeline.render(nets.eps, nets.decode, sd_params, x_T, noise, lam_items,
                           item_prompts, guidance, tables, sampler_cfg)

  def render(sd_params, problem: EditProblem, lam):
    return _render(sd_params, problem.x_T, problem.noise, problem.prompts, problem.guidance,
                   problem.tables, problem.group, lam)

  return render
