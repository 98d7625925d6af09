"""The research API: one call per idea, on a loaded model (``models.load``).

    render(model, prompt, target_prompt, lam, seeds)  images [B, h, w, 3] of a prompt pair
    renderer(model, prompt, target_prompt, seeds)     the same as a function of lam alone:
                                                      encoded and drawn once, differentiable
    paper_objective(loss_models, prompt, target)      (images, reference) -> (loss, parts),
                                                      L_dir + beta * L_perc (docs/METHOD.md §4)
    save_weights(path, lam, ...) / load_weights(path) the weights file of launch.disentangle

lam is any shape ``mixing.mix`` accepts: [T], [T, B] (one per seed), or
``mixing.PerToken([T, L])`` / ``PerToken([T, B, L])``. Everything here is a thin layer over the
modules the programs use (models, noise, pipeline, losses, weights_file): the images equal the
programs' for the same settings. The model's decoder and noise predictor, for code that calls
``pipeline.render`` or ``sampler.sample`` itself, are ``models.decoder(model)`` and
``models.predictor(model)``.

Weights stay arguments of the jitted programs inside: call these functions under ``jax.grad``
directly, without a ``jax.jit`` of your own around them (that would bake the weights into your
program as constants).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax import losses, mixing, models, noise, pipeline, weights_file
from disentangle_jax.sampling import SamplingConfig

__all__ = ["SamplingConfig", "Weights", "load_weights", "paper_objective", "render", "renderer",
           "save_weights"]


def renderer(model, prompt: str, target_prompt: str, seeds: Sequence[int],
             sampling: SamplingConfig = SamplingConfig(), *, image_size: int = 0,
             remat: str = "full") -> Callable[[Any], jax.Array]:
  """``render(lam) -> images [B, h, w, 3]`` in [0, 1] for c0 = ``prompt`` and c1 =
  ``target_prompt``, one image per seed (B = len(seeds)); differentiable in lam.

  The prompts are encoded (a pair that encodes to the same tokens is refused) and x_T and the
  noise drawn from the seeds once; every call samples ``sampling.num_steps`` steps. The jitted
  program is shared by every renderer of equal model modules and sampler settings.
  """
  noise.check_seeds(seeds)
  emb, uncond = models.encode_with_negative(model, [prompt, target_prompt],
                                            sampling.negative_prompt, pairs=True)
  prompts = pipeline.PromptPair(mixing.select(emb, 0), mixing.select(emb, 1), uncond)
  tables = sampling.tables(model.schedule)
  run = noise.draw(jax.random.key(sampling.rng_seed), list(seeds),
                   pipeline.latent_shape(model, image_size), tables.sigma)
  render_fn = _render_fn(model, sampling.sampler_config(remat))
  params = {"unet": model.params["unet"], "vae": model.params["vae"]}

  def render_lam(lam):
    return render_fn(params, run.x_T, run.noise, lam, prompts, sampling.guidance, tables)
  return render_lam


def render(model, prompt: str, target_prompt: str, lam, seeds: Sequence[int],
           sampling: SamplingConfig | None = None, **options) -> jax.Array:
  """Images [B, h, w, 3] in [0, 1] of the pair mixed with ``lam``, one per seed (``renderer``);
  ``sampling`` defaults to the DDIM settings of the programs with T = lam's steps."""
  if sampling is None:
    steps = np.shape(lam.lam if isinstance(lam, mixing.PerToken) else lam)[0]
    sampling = SamplingConfig(num_steps=steps)
  return renderer(model, prompt, target_prompt, seeds, sampling, **options)(lam)


# The last render programs built, by what they are made of (static modules and settings, never
# weights): a new renderer of the same model reuses the compiled program.
_RENDER_FNS: list[tuple[tuple, Callable]] = []
_RENDER_FNS_KEPT = 4


def _render_fn(model, sampler_config) -> Callable:
  key = (model.unet, model.vae, model.scaling_factor, model.config,
         model.schedule.prediction_type, model.vae_scale_factor, sampler_config)
  for known, fn in _RENDER_FNS:
    if known == key:
      return fn
  fn = pipeline.make_render_fn(models.predictor(model), models.decoder(model), sampler_config)
  _RENDER_FNS[:] = [(key, fn)] + _RENDER_FNS[:_RENDER_FNS_KEPT - 1]
  return fn


def paper_objective(loss_models, prompt: str, target_prompt: str, *, beta: float = 0.05,
                    preprocess: str = "standard") -> Callable:
  """The paper's objective as ``objective(images, reference) -> (loss [], parts)``.

  loss = mean over the B images of L_dir + beta * L_perc, with L_dir the directional CLIP loss
  along (c0 text -> c1 text) and L_perc the VGG content distance to ``reference`` (the lambda =
  0 images); parts = {"l_dir": [B], "l_perc": [B]}. ``loss_models``: loss_models.load_loss_models
  (CLIP + VGG16). Differentiable in ``images``; add your own terms to ``loss``.
  """
  if preprocess not in losses.PREPROCESS_MODES:
    raise ValueError(f"preprocess={preprocess!r} is unknown; use one of "
                     f"{losses.PREPROCESS_MODES}.")
  text = loss_models_lib.encode_texts(loss_models, [prompt, target_prompt])
  statics = dict(clip_apply=loss_models.clip_image_apply, vgg_apply=loss_models.vgg_apply,
                 clip_size=loss_models.clip_image_size, vgg_size=loss_models.vgg_input_size,
                 preprocess=preprocess)
  params = loss_models.params

  def objective(images, reference):
    return _paper_loss(params, images, reference, text[0], text[1], jnp.float32(beta), **statics)
  return objective


@functools.partial(jax.jit, static_argnames=("clip_apply", "vgg_apply", "clip_size", "vgg_size",
                                             "preprocess"))
def _paper_loss(params, images, reference, text0, text1, beta, *, clip_apply, vgg_apply,
                clip_size, vgg_size, preprocess):
  f_ref = losses.clip_image_features(clip_apply, params["clip"], reference, preprocess,
                                     clip_size)
  f_edit = losses.clip_image_features(clip_apply, params["clip"], images, preprocess, clip_size)
  l_dir = losses.directional_clip_loss(f_ref, f_edit, text0, text1)
  l_perc = losses.vgg_perceptual_loss(vgg_apply, params["vgg"], images, reference, vgg_size)
  return jnp.mean(l_dir + beta * l_perc), {"l_dir": l_dir, "l_perc": l_perc}


class Weights(NamedTuple):
  """A weights file, ready to render: lam float32 [T] or mixing.PerToken([T, L]), the prompts,
  the sampling settings it was learned with, and the whole file (weights_file.LearnedWeights)."""

  lam: Any
  prompt: str
  target_prompt: str
  sampling: SamplingConfig
  file: weights_file.LearnedWeights


def load_weights(path: str) -> Weights:
  """Reads a weights file (launch.disentangle's weights.json, or ``save_weights``'); errors
  name the file and the problem."""
  w = weights_file.read(path)
  lam = np.asarray(w.lam, np.float32)
  sampling = SamplingConfig(num_steps=w.num_steps, kind=w.sampler, eta=w.eta,
                            guidance=w.guidance, rng_seed=int(w.extra.get("rng_seed", 0)))
  return Weights(mixing.PerToken(lam) if w.lambda_shape == "per_token" else lam, w.prompt,
                 w.target_prompt, sampling, w)


def save_weights(path: str, lam, prompt: str, target_prompt: str, model,
                 sampling: SamplingConfig, **extra) -> None:
  """Writes lam ([T], or mixing.PerToken([T, L])) as a weights file the programs read
  (``--config.weights``, ``lambda_files``, ``weights_files``), atomically; ``extra``: free-form
  provenance (JSON-able)."""
  per_token = isinstance(lam, mixing.PerToken)
  shape = "per_token" if per_token else "per_step"
  lam = mixing.check_lambda(np.asarray(lam.lam if per_token else lam), sampling.num_steps,
                            lambda_shape=shape)
  weights_file.write(path, weights_file.LearnedWeights(
      lam=weights_file.as_tuple(lam), prompt=prompt, target_prompt=target_prompt,
      num_steps=sampling.num_steps, sampler=sampling.kind, eta=sampling.eta,
      guidance=sampling.guidance, schedule=dataclasses.asdict(model.schedule),
      extra=dict(extra, rng_seed=sampling.rng_seed), lambda_shape=shape))
