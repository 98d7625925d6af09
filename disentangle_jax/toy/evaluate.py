"""Quality of a trained toy world, measured on fresh renders and fresh samples.

  judge accuracy        per factor, on renders from a stream training never used
  toy CLIP zero-shot    argmax over the 120 captions; content (shape, colour, position all
                        right) and attribute accuracy
  diffusion floors      samples from c0 prompts: judge finds the prompted content; samples from
                        c1 prompts: judge finds the prompted attribute

Shapes: N items, S image size. Images NHWC float in [0, 1].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax import losses, models, noise, pipeline, sampler, schedule
from disentangle_jax.toy import judge as judge_lib
from disentangle_jax.toy import scenes

EVAL_STREAM = 7  # render stream of evaluation scenes (training uses stream 0)
NUM_STEPS = 50  # sampling steps of the floors (the paper's)
GUIDANCE = 7.5  # classifier-free guidance of the floors (the paper's)


def fresh_renders(seed: int, n: int):
  """(images [n, S, S, 3] in [0, 1], factors [n, 4]) never seen in training."""
  images, factors = scenes.dataset(seed, n, stream=EVAL_STREAM)
  return images.astype(np.float32) / 255.0, factors


def judge_predict(w, images) -> np.ndarray:
  fn = jax.jit(lambda p, x: judge_lib.predict(w.judge_config, p, x))
  return np.asarray(fn(w.judge_params, jnp.asarray(images)))


def clip_predict(w, images) -> np.ndarray:
  """Zero-shot factors [N, 4]: the factors of the best-matching caption among all 120."""
  lm = w.loss_models
  txt = loss_models_lib.encode_texts(lm, scenes.all_captions())
  img = jax.jit(lambda p, x: losses.clip_image_features(lm.clip_image_apply, p, x, "standard",
                                                        lm.clip_image_size))(
                                                            lm.params["clip"], jnp.asarray(images))
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  return scenes.all_factors()[np.asarray(jnp.argmax(img @ txt.T, axis=-1))]


def content_attribute_accuracy(pred: np.ndarray, factors: np.ndarray) -> dict[str, float]:
  c = scenes.CONTENT_FACTORS
  return {"content": float(np.mean(np.all(pred[:, :c] == factors[:, :c], axis=1))),
          "attribute": float(np.mean(pred[:, c] == factors[:, c]))}


def sample(w, factors: np.ndarray, seeds, num_steps: int = NUM_STEPS,
           guidance: float = GUIDANCE) -> np.ndarray:
  """Text-to-image samples [N, S, S, 3] of the captions of factor rows [N, 4] (DDIM, eta 0)."""
  sd = w.sd
  emb = models.encode_prompts(sd, [scenes.caption(f) for f in factors] + [""])
  tables = schedule.step_tables(sd.schedule, num_steps)
  run = noise.draw(jax.random.key(0), np.asarray(seeds), (sd.latent_size, sd.latent_size,
                                                          sd.latent_channels), tables.sigma)
  render = pipeline.make_render_fn(models.make_eps_fn(sd.unet),
                                   models.make_decode_fn(sd.vae, sd.scaling_factor),
                                   sampler.SamplerConfig("ddim"))
  prompts = pipeline.PromptPair(emb[:-1], emb[:-1], emb[-1])
  return np.asarray(render(sd.params, run.x_T, run.noise, jnp.zeros((num_steps, len(factors))), prompts,
                           guidance, tables))


def diffusion_floors(w, seed: int, n: int, num_steps: int = NUM_STEPS) -> dict[str, float]:
  """Judge rates on samples: c0 prompts -> content; c1 prompts -> attribute (and content)."""
  rng = np.random.default_rng([seed, 11])
  c0 = scenes.sample_factors(rng, n)
  c0[:, 3] = 0
  c1 = c0.copy()
  c1[:, 3] = rng.integers(1, len(scenes.ATTRIBUTES), n)
  seeds = np.arange(n) + 1000 * seed
  p0 = judge_predict(w, sample(w, c0, seeds, num_steps))
  p1 = judge_predict(w, sample(w, c1, seeds, num_steps))
  a0, a1 = content_attribute_accuracy(p0, c0), content_attribute_accuracy(p1, c1)
  return {"c0_content": a0["content"], "c0_no_attribute": a0["attribute"],
          "c1_attribute": a1["attribute"], "c1_content": a1["content"]}


def quality(w, seed: int, n_renders: int = 1000, n_samples: int = 64,
            log: Callable = print) -> dict:
  """All quality numbers of a world (what made.json records and the benchmark prints)."""
  images, factors = fresh_renders(seed, n_renders)
  out = {"judge_accuracy": judge_lib.accuracy(judge_predict(w, images), factors),
         "clip_zero_shot": content_attribute_accuracy(clip_predict(w, images), factors),
         "diffusion": diffusion_floors(w, seed, n_samples)}
  log(f"quality: {out}")
  return out
