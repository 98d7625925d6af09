"""Optimising the per-step mixing weights (METHOD.md section 4).

    original = decode(sample(x_T, noise, lambda = 0))      # the pure-c0 reference, computed once
    edited   = decode(sample(x_T, noise, lambda))
    loss     = L_dir(original, edited, text0, text1) + beta * L_perc(edited, original)

The gradient flows through every sampling step, the VAE decoder and both frozen loss networks
into lambda (float32 [T]); nothing else is trained. With a batch of seeds the loss is the
(masked) mean over the batch, so one lambda is learned for all of them; the batch may be
sharded over devices (parallel.py) without changing this code.

Everything traced lives in ``EditProblem`` (arrays) and the params; everything static (apply
functions, sizes, sampler kind, loss weights, optimiser) lives in ``Objective`` and the optax
transformation, so one program is compiled per shape and reused every iteration.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from disentangle_jax import losses, pipeline, sampler, schedule


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
    if not self.beta >= 0:
      raise ValueError(f"loss.beta={self.beta!r} must be >= 0 (0.05 in the paper).")


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
    if not isinstance(self.iterations, int) or self.iterations < 1:
      raise ValueError(f"optimizer.iterations={self.iterations!r} must be an integer >= 1.")
    if not self.learning_rate > 0:
      raise ValueError(f"optimizer.learning_rate={self.learning_rate!r} must be > 0.")


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
    prompts: c0, c1, uncond embeddings [L, D].
    guidance: [] CFG scale.
    tables: schedule.StepTables of T steps.
    reference: [B, h, w, 3] the pure-c0 images the loss compares against.
    text0, text1: [E] CLIP text features of the neutral and the target prompt.
    mask: [B] 1 for real items, 0 for padding (parallel.pad_batch).
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


class TrainState(NamedTuple):
  step: jax.Array  # [] int32, iterations done
  lam: jax.Array  # [T] float32
  opt_state: Any


def init_state(lam, tx: optax.GradientTransformation) -> TrainState:
  lam = jnp.asarray(lam, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), lam=lam, opt_state=tx.init(lam))


def round_to_uint8_levels(images: jax.Array) -> jax.Array:
  """The release's reference quirk: images quantised to 8 bits (kept as floats in [0, 1])."""
  return jnp.round(images * 255.0) / 255.0


def objective(lam, params, problem: EditProblem, nets: Networks, loss_cfg: LossConfig,
              sampler_cfg: sampler.SamplerConfig):
  """Returns (loss [], aux) with aux = {"l_dir", "l_perc" (masked means), "images" [B,...]}.

  params: {"sd": {"unet", "vae"}, "clip": ..., "vgg": ...}.
  """
  images = pipeline.render(nets.eps, nets.decode, params["sd"], problem.x_T, problem.noise, lam,
                           problem.prompts, problem.guidance, problem.tables, sampler_cfg)
  f_ref = losses.clip_image_features(nets.clip_image, params["clip"], problem.reference,
                                     loss_cfg.preprocess, nets.clip_image_size)
  f_edit = losses.clip_image_features(nets.clip_image, params["clip"], images,
                                      loss_cfg.preprocess, nets.clip_image_size)
  l_dir = losses.directional_clip_loss(f_ref, f_edit, problem.text0, problem.text1)
  l_perc = losses.vgg_perceptual_loss(nets.vgg, params["vgg"], images, problem.reference,
                                      nets.vgg_input_size)
  w = problem.mask / jnp.sum(problem.mask)
  # where, not a product: a padded item can never leak in, not even as 0 * inf.
  l_dir, l_perc = (jnp.sum(jnp.where(problem.mask > 0, w * l, 0)) for l in (l_dir, l_perc))
  loss = l_dir + loss_cfg.beta * l_perc
  return loss, {"l_dir": l_dir, "l_perc": l_perc, "images": images}


def update_step(state: TrainState, params, problem: EditProblem, *, nets: Networks,
                loss_cfg: LossConfig, sampler_cfg: sampler.SamplerConfig,
                tx: optax.GradientTransformation):
  """One optimiser step. Returns (new state, metrics, images rendered with the OLD lambda)."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (loss, aux), grad = grad_fn(state.lam, params, problem, nets, loss_cfg, sampler_cfg)
  updates, opt_state = tx.update(grad, state.opt_state, state.lam)
  lam = optax.apply_updates(state.lam, updates)
  metrics = {"loss": loss, "l_dir": aux["l_dir"], "l_perc": aux["l_perc"],
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


def make_render_fn(nets: Networks, sampler_cfg: sampler.SamplerConfig) -> Callable:
  """The jitted ``render(sd_params, problem, lam) -> images`` (reference, final and transfer
  renders). It reads only the sampler inputs of ``problem``, so the reference images and the
  mask may change without a recompile."""
  @jax.jit
  def _render(sd_params, x_T, noise, prompts, guidance, tables, lam):
    return pipeline.render(nets.eps, nets.decode, sd_params, x_T, noise, lam, prompts, guidance,
                           tables, sampler_cfg)

  def render(sd_params, problem: EditProblem, lam):
    return _render(sd_params, problem.x_T, problem.noise, problem.prompts, problem.guidance,
                   problem.tables, lam)

  return render
