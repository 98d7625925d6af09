"""Quality of a trained toy world, measured on fresh renders and fresh samples.

  judge accuracy        per factor, on renders from a stream training never used
  judge geometry        mean error of the regressed centre (px), size (relative) and tint
  perceptual accuracy   the world's VGG16-shaped network, scene class (120-way)
  toy CLIP zero-shot    argmax over the 120 fully named captions; content (shape, colour,
                        position all right) and attribute accuracy
  diffusion floors      samples from c0 prompts: judge finds the prompted content; samples from
                        c1 prompts: judge finds the prompted attribute
  partial captions      samples from captions that leave content words out: the named factors
                        are kept
  open-caption spread   samples of "a photo of a shape": the unnamed factors spread over their
                        values (the lowest frequency of any value, as a fraction of its share)
  entanglement          samples of "a photo of a shape" and "..., <attribute>" from the same
                        noise: how often a seed-decided factor changes

Shapes: N items, S image size. Images NHWC float in [0, 1].
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax import losses, models, noise, pipeline, sampler, schedule
from disentangle_jax.loss_models import vgg
from disentangle_jax.toy import judge as judge_lib
from disentangle_jax.toy import perceptual, scenes, world

EVAL_STREAM = 7  # render stream of evaluation scenes (training uses stream 0)
NUM_STEPS = 50  # sampling steps of the floors (the paper's)
GUIDANCE = 7.5  # classifier-free guidance of the floors (the paper's)


def fresh_renders(seed: int, n: int):
  """(images [n, S, S, 3] in [0, 1], factors [n, 4], geometry [n, G]) never seen in training."""
  images, factors, geometry = scenes.dataset(seed, n, stream=EVAL_STREAM)
  return images.astype(np.float32) / 255.0, factors, geometry


def judge_predict(w, images) -> tuple[np.ndarray, np.ndarray]:
  """The judge's (factors [N, 4], geometry [N, G]) of images [N, S, S, 3] in [0, 1]."""
  fn = jax.jit(lambda p, x: judge_lib.predict(w.judge_config, p, x))
  factors, geometry = fn(w.judge_params, jnp.asarray(images))
  return np.asarray(factors), np.asarray(geometry)


def perceptual_accuracy(w, images, factors) -> float:
  """Scene-class accuracy of the world's VGG16-shaped network (its own training task)."""
  lm = w.loss_models
  vgg_params = lm.params["vgg"]
  cfg = perceptual.PerceptualConfig(vgg.params_widths(vgg_params), lm.vgg_input_size)
  head = perceptual.load_head(os.path.join(w.root, world.VGG_DIR, world.VGG_FILE))
  fn = jax.jit(lambda p, x: perceptual.predict(cfg, p, x))
  pred = np.asarray(fn({"features": vgg_params, "classifier": head}, jnp.asarray(images)))
  return float(np.mean(pred == scenes.scene_index(factors)))


def clip_predict(w, images) -> np.ndarray:
  """Zero-shot factors [N, 4]: the factors of the best-matching caption among all 120."""
  lm = w.loss_models
  txt = loss_models_lib.encode_texts(lm, [scenes.caption(f) for f in scenes.all_factors()])
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


_RENDER_FNS: dict = {}


def render_fn(unet, vae, scaling_factor: float):
  """The jitted DDIM render of a world's modules, kept per module configuration (the modules
  hold lists, so they cannot be hashed; their repr is the key), so that the quality checks
  compile it once per batch shape, not once per call."""
  key = (repr(unet), repr(vae), scaling_factor)
  if key not in _RENDER_FNS:
    _RENDER_FNS[key] = pipeline.make_render_fn(models.make_eps_fn(unet),
                                               models.make_decode_fn(vae, scaling_factor),
                                               sampler.SamplerConfig("ddim"))
  return _RENDER_FNS[key]


def sample(w, factors: np.ndarray, seeds, num_steps: int = NUM_STEPS,
           guidance: float = GUIDANCE) -> np.ndarray:
  """Text-to-image samples [N, S, S, 3] of the captions of (caption) factor rows [N, 4]
  (OMITTED content is left out of the caption; DDIM, eta 0)."""
  sd = w.sd
  emb = models.encode_prompts(sd, [scenes.caption(f) for f in factors] + [""])
  tables = schedule.step_tables(sd.schedule, num_steps)
  run = noise.draw(jax.random.key(0), np.asarray(seeds), (sd.latent_size, sd.latent_size,
                                                          sd.latent_channels), tables.sigma)
  render = render_fn(sd.unet, sd.vae, sd.scaling_factor)
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
  a0, a1 = content_attribute_accuracy(p0[0], c0), content_attribute_accuracy(p1[0], c1)
  return {"c0_content": a0["content"], "c0_no_attribute": a0["attribute"],
          "c1_attribute": a1["attribute"], "c1_content": a1["content"]}


# Guidance of the spread measurement: at the paper's 7.5, classifier-free guidance sharpens
# "a photo of a shape" onto its modes (circle, blue, right) and the rarest values fall below
# half their share (benchmarks/toy_spread.py, README: the toy world); at 1.5 the conditional
# model's own spread shows.
SPREAD_GUIDANCE = 1.5


def partial_caption_floors(w, seed: int, n: int, num_steps: int = NUM_STEPS,
                           guidance: float = GUIDANCE) -> dict[str, float]:
  """Samples of partial captions without attribute (each content word left out with
  probability 1/2): how often the named factors are right ("named_kept")."""
  rng = np.random.default_rng([seed, 13])
  caps = scenes.sample_captions(rng, scenes.sample_factors(rng, n) * [1, 1, 1, 0], 0.5)
  pred = judge_predict(w, sample(w, caps, np.arange(n) + 1000 * seed, num_steps, guidance))[0]
  named = caps[:, :scenes.CONTENT_FACTORS] != scenes.OMITTED
  right = pred[:, :scenes.CONTENT_FACTORS] == caps[:, :scenes.CONTENT_FACTORS]
  return {"named_kept": float(np.sum(right & named) / max(1, np.sum(named)))}


def open_caption_spread(w, seed: int, n: int, num_steps: int = NUM_STEPS,
                        guidance: float = SPREAD_GUIDANCE) -> dict[str, float]:
  """Samples of "a photo of a shape" (every content factor left to the seed): per content
  factor, the lowest frequency of any of its values as a fraction of its share (1 / number of
  values): "spread_<factor>" (1 = perfectly even, 0.5 = some value at half its share)."""
  caps = np.full((n, 4), scenes.OMITTED, np.int32)
  caps[:, 3] = 0
  pred = judge_predict(w, sample(w, caps, np.arange(n) + 1000 * seed, num_steps, guidance))[0]
  out = {}
  for k, name in enumerate(scenes.FACTORS[:scenes.CONTENT_FACTORS]):
    counts = np.bincount(pred[:, k], minlength=scenes.FACTOR_SIZES[k]) / n
    out[f"spread_{name}"] = float(counts.min() * scenes.FACTOR_SIZES[k])
  return out


def entanglement(w, seed: int, n: int, num_steps: int = NUM_STEPS) -> dict[str, float]:
  """Per attribute: the fraction of seeds whose pure-c1 sample ("a photo of a shape,
  <attribute>") differs from the pure-c0 sample ("a photo of a shape") of the same noise in at
  least one content factor (the judge's reading)."""
  seeds = np.arange(n) + 1000 * seed
  open_c0 = np.full((n, 4), scenes.OMITTED, np.int32)
  open_c0[:, 3] = 0
  p0 = judge_predict(w, sample(w, open_c0, seeds, num_steps))[0]
  out = {}
  for a, name in enumerate(scenes.ATTRIBUTES[1:], start=1):
    c1 = open_c0.copy()
    c1[:, 3] = a
    p1 = judge_predict(w, sample(w, c1, seeds, num_steps))[0]
    changed = np.any(p1[:, :scenes.CONTENT_FACTORS] != p0[:, :scenes.CONTENT_FACTORS], axis=1)
    out[name] = float(np.mean(changed))
  return out


def quality(w, seed: int, n_renders: int = 1000, n_samples: int = 64,
            log: Callable = print) -> dict:
  """All quality numbers of a world (what made.json records and the benchmark prints)."""
  images, factors, geometry = fresh_renders(seed, n_renders)
  pred, geo = judge_predict(w, images)
  out = {"judge_accuracy": judge_lib.accuracy(pred, factors),
         "judge_geometry_error": judge_lib.geometry_error(geo, geometry),
         "perceptual_accuracy": perceptual_accuracy(w, images, factors),
         "clip_zero_shot": content_attribute_accuracy(clip_predict(w, images), factors),
         "diffusion": diffusion_floors(w, seed, n_samples),
         "partial_captions": partial_caption_floors(w, seed, n_samples),
         "open_caption_spread": {str(g): open_caption_spread(w, seed, n_samples, guidance=g)
                                 for g in (GUIDANCE, SPREAD_GUIDANCE)},
         "entanglement": entanglement(w, seed, n_samples)}
  log(f"quality: {out}")
  return out


# The judge's scores of an edit (judge.score_edits), as the study's host-side scores.
STUDY_SCORES = ("attribute_success", "content_preserved", "combined", "position_error_px",
                "size_error", "geometry_kept", "combined_strict")


def attribute_index(target_prompt: str) -> int:
  """The toy-world attribute a c1 prompt names; ValueError names the prompt if it is no caption."""
  return int(scenes.parse_caption(target_prompt)[3])


def study_score_fn(judge_config, judge_params, attributes: Sequence[int]) -> Callable:
  """The study's ``score_fn`` (study_store.run) of a toy world: the judge reads every image
  of a chunk and scores each source's image against column 0 (the pure-c0 image).

  attributes: the toy attribute index of each study attribute (``attribute_index``).
  """
  predict = jax.jit(lambda p, x: judge_lib.predict(judge_config, p, x))
  attributes = np.asarray(attributes)

  def score(images: np.ndarray, attr: np.ndarray) -> dict[str, np.ndarray]:
    u, cols = images.shape[:2]
    factors, geometry = (np.asarray(a).reshape((u, cols) + a.shape[1:]) for a in predict(
        judge_params, jnp.asarray(images.reshape((u * cols,) + images.shape[2:]))))
    out = {name: np.zeros((u, cols - 1)) for name in STUDY_SCORES}
    for j in range(u):
      orig = (np.repeat(factors[j, :1], cols - 1, 0), np.repeat(geometry[j, :1], cols - 1, 0))
      scores = judge_lib.score_edits(orig, (factors[j, 1:], geometry[j, 1:]),
                                     int(attributes[attr[j]]))
      for name in STUDY_SCORES:
        out[name][j] = scores[name]
    return out
  return score
