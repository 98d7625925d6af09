"""Training the toy world from scratch: VAE, judge, perceptual VGG, toy CLIP, then the UNet.

Every stage is a loop of one jitted, top-level step (params and optimiser state are
arguments) over batches drawn from a fixed rendered dataset; batch k of a stage is a pure
function of (seed, stage, k), so a run is deterministic and a resumed run equals an
uninterrupted one. Each stage checkpoints through orbax under checkpoints/<stage>/; a finished
stage is restored, not retrained.

Stages (in order; later ones use earlier ones):
  vae        AutoencoderKL on renders: MSE + kl_weight * KL; then the latent scale is set
             to 1 / std(latents) (SD's scaling_factor)
  judge      CNN factor classifier + geometry regression on renders and their VAE
             reconstructions
  perceptual VGG16-shaped scene classifier on its own render stream and seed (the content
             loss's network; toy/perceptual.py)
  clip       FlaxCLIPModel, contrastive over the 300 captions: each image is paired with a
             caption that names each content word with probability 1 - omit_prob (image ->
             caption cross-entropy, and caption -> every consistent image of the batch)
  diffusion  UNet, epsilon prediction on the SD v1 schedule, on the same kind of partial
             captions (so unnamed content comes from the noise), captions dropped to "" with
             probability uncond_prob (classifier-free guidance). The text encoder is the toy
             CLIP's text tower, frozen, as SD v1's is CLIP ViT-L/14's: its contrastive training
             separates every caption (a text encoder trained with the UNet from scratch kept
             "left" and "right" nearly equal, and the samples ignored position).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from disentangle_jax import checkpoint, losses, models, noise, schedule
from disentangle_jax.toy import judge as judge_lib
from disentangle_jax.toy import perceptual, scenes, world

STAGES = ("vae", "judge", "perceptual", "clip", "diffusion")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  steps: int  # optimiser steps
  batch: int  # batch size
  lr: float  # Adam learning rate (cosine decay to 10%)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  dataset_size: int = 24000
  sizes: world.Sizes = world.Sizes()
  judge: judge_lib.JudgeConfig = judge_lib.JudgeConfig()
  perceptual_net: perceptual.PerceptualConfig = perceptual.PerceptualConfig()
  vae: StageConfig = StageConfig(900, 16, 2e-3)
  judge_stage: StageConfig = StageConfig(1500, 64, 2e-3)
  perceptual: StageConfig = StageConfig(800, 64, 2e-3)
  clip: StageConfig = StageConfig(2500, 64, 1e-3)
  diffusion: StageConfig = StageConfig(14000, 32, 1e-3)
  kl_weight: float = 1e-5
  uncond_prob: float = 0.1
  omit_prob: float = scenes.OMIT_PROB
  checkpoint_every: int = 200
  log_every: int = 50

  def stage(self, name: str) -> StageConfig:
    return self.judge_stage if name == "judge" else getattr(self, name)


class Data(NamedTuple):
  images: np.ndarray  # uint8 [N, S, S, 3]
  factors: np.ndarray  # int32 [N, 4]
  geometry: np.ndarray  # float32 [N, G] (scenes.GEOMETRY)


def make_data(cfg: TrainConfig, stream: int = 0, seed_offset: int = 0) -> Data:
  """The rendered training scenes of a stream (0: every stage but the perceptual network's)."""
  return Data(*scenes.dataset(cfg.seed + seed_offset, cfg.dataset_size, stream=stream))


def batch_captions(cfg: TrainConfig, stage: str, step: int, factors: np.ndarray) -> np.ndarray:
  """Caption factors [B, 4] of a batch's scenes (scenes.sample_captions), deterministic in
  (seed, stage, step) like the batch itself."""
  rng = np.random.default_rng([cfg.seed, STAGES.index(stage), step, 1])
  return scenes.sample_captions(rng, factors, cfg.omit_prob)


def batch_indices(cfg: TrainConfig, stage: str, step: int, n: int) -> np.ndarray:
  rng = np.random.default_rng([cfg.seed, STAGES.index(stage), step])
  return rng.integers(0, n, cfg.stage(stage).batch)


def _optimizer(stage: StageConfig):
  return optax.adam(optax.cosine_decay_schedule(stage.lr, stage.steps, alpha=0.1))


def train_step(loss_fn: Callable, tx, params, opt_state, batch, key):
  """One Adam step of loss_fn(params, batch, key) -> scalar. Returns (params, opt_state, loss)."""
  value, grads = jax.value_and_grad(loss_fn)(params, batch, key)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


# ----------------------------------------------------------------------------------------------
# Losses (params first, batch dict, key).


def vae_loss(vae, kl_weight: float, params, batch, key):
  x = jnp.transpose(batch["images"] * 2 - 1, (0, 3, 1, 2))
  post = vae.apply({"params": params}, x, method="encode").latent_dist
  rec = vae.apply({"params": params}, post.sample(key), method="decode").sample
  return jnp.mean((rec - x) ** 2) + kl_weight * jnp.mean(post.kl()) / x[0].size


def judge_loss(config, params, batch, key):
  del key
  return judge_lib.loss(config, params, batch["images"], batch["factors"], batch["geometry"])


def perceptual_loss(config, params, batch, key):
  del key
  return perceptual.loss(config, params, batch["images"], batch["labels"])


def _clip_apply(module, params, pixels, ids):
  """Normalised image [B, E] and text [K, E] features, and the logit scale."""
  out = module.apply({"params": params}, ids, pixels, jnp.ones_like(ids),
                     jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
  return out.image_embeds, out.text_embeds, jnp.exp(params["logit_scale"])


def clip_loss(module, params, batch, key):
  """Cross-entropy of each image against all captions (target: its sampled caption), and of
  each sampled caption against the batch's images (every image it describes is a positive:
  batch["positives"] [B captions, B images], 1 where consistent)."""
  del key
  img, txt, scale = _clip_apply(module, params, batch["pixels"], batch["all_ids"])
  logits = scale * img @ txt.T  # [B, K]
  labels = batch["labels"]
  i2t = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
  same = batch["positives"].astype(logits.dtype)
  col = jax.nn.log_softmax(jnp.take(logits, labels, axis=1).T, axis=1)  # [B captions, B images]
  t2i = -jnp.mean(jnp.sum(same * col, axis=1) / jnp.sum(same, axis=1))
  return (i2t + t2i) / 2


def diffusion_loss(unet, alphas_cumprod, params, batch, key):
  """Epsilon MSE of the UNet (params) given the captions' frozen text embeddings batch["emb"]."""
  k_t, k_n = jax.random.split(key)
  z0 = batch["latents"]
  t = jax.random.randint(k_t, (z0.shape[0],), 0, alphas_cumprod.shape[0])
  eps = jax.random.normal(k_n, z0.shape)
  a = alphas_cumprod[t][:, None, None, None]
  x_t = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps
  pred = models.make_eps_fn(unet)(params, x_t, t, batch["emb"])
  return jnp.mean((pred - eps) ** 2)


# ----------------------------------------------------------------------------------------------
# The stage loop.


def run_stage(name: str, cfg: TrainConfig, loss_fn: Callable, params, make_batch: Callable,
              ckpt_dir: str, fingerprint: str, log: Callable):
  """Trains ``params`` for cfg.stage(name).steps steps, resuming from ``ckpt_dir``.

  Returns (params, history, seconds): history = [[step, loss], ...] every log_every steps;
  seconds = training time over all runs of the stage (None if an old checkpoint lacks it).
  """
  stage = cfg.stage(name)
  tx = _optimizer(stage)
  params = jax.tree.map(jnp.copy, params)  # the step donates its inputs: keep the caller's
  opt_state = tx.init(params)
  # Closed on every exit (also an exception mid-stage): pending saves finish before anyone
  # else opens this folder.
  with checkpoint.Checkpointer(ckpt_dir, cfg.checkpoint_every) as ckpt:
    start, history, before = 0, [], 0.0
    restored = ckpt.restore({"params": params, "opt": opt_state})
    if restored is not None:
      state, meta = restored
      if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{ckpt_dir} holds a checkpoint of another training config; use a new "
                         "--workdir (a run never mixes configs).")
      params, opt_state = state["params"], state["opt"]
      start, history = int(meta["step"]), [list(h) for h in meta["history"]]
      before = meta.get("seconds")
      log(f"{name}: resumed at step {start}/{stage.steps}")
    step_fn = jax.jit(functools.partial(train_step, loss_fn, tx), donate_argnums=(0, 1))
    base = jax.random.key(cfg.seed)
    t0, losses_since = time.time(), []
    for step in range(start, stage.steps):
      batch = make_batch(step)
      key = jax.random.fold_in(jax.random.fold_in(base, STAGES.index(name)), step)
      params, opt_state, value = step_fn(params, opt_state, batch, key)
      losses_since.append(value)
      done = step + 1
      if done % cfg.log_every == 0 or done == stage.steps:
        mean = float(np.mean(jax.device_get(losses_since)))
        losses_since = []
        history.append([done, mean])
        rate = (done - start) / (time.time() - t0)
        log(f"{name}: step {done}/{stage.steps} loss {mean:.5f} "
            f"{rate:.1f} steps/s ETA {(stage.steps - done) / rate:.0f}s")
      if done % cfg.checkpoint_every == 0 or done == stage.steps:
        seconds = None if before is None else round(before + time.time() - t0, 1)
        ckpt.save(done, {"params": params, "opt": opt_state},
                  {"step": done, "history": history, "fingerprint": fingerprint,
                   "seconds": seconds}, force=True)
  return params, history, (before if start == stage.steps else seconds)


def to_unit(images_uint8) -> np.ndarray:
  return np.asarray(images_uint8, np.float32) / 255.0


def vae_batches(data: Data, cfg: TrainConfig):
  def make(step):
    return {"images": to_unit(data.images[batch_indices(cfg, "vae", step, len(data.images))])}
  return make


def mixed_batches(images_a, images_b, data: Data, cfg: TrainConfig, stage: str):
  """Half renders, half VAE reconstructions (so the networks see decoded images too):
  make(step) -> (images [B, S, S, 3] in [0, 1], factors [B, 4], geometry [B, G])."""
  n = len(data.factors)

  def make(step):
    idx = batch_indices(cfg, stage, step, n)
    half = len(idx) // 2
    imgs = np.concatenate([to_unit(images_a[idx[:half]]), to_unit(images_b[idx[half:]])])
    return imgs, data.factors[idx], data.geometry[idx]
  return make


def clip_pixels(images) -> jax.Array:
  return losses.clip_preprocess(jnp.asarray(images), "standard", images.shape[1])


def latent_scale(latents: np.ndarray) -> float:
  return float(1.0 / np.std(latents))


def encode_all(vae, params, images_uint8, batch: int = 500) -> np.ndarray:
  """Posterior means (unscaled) [N, h, w, C] of all images."""
  enc = jax.jit(models.make_encode_fn(vae, 1.0))
  return np.concatenate([np.asarray(enc(params, to_unit(images_uint8[i:i + batch])))
                         for i in range(0, len(images_uint8), batch)])


def decode_all(vae, params, latents, batch: int = 500) -> np.ndarray:
  dec = jax.jit(models.make_decode_fn(vae, 1.0))
  out = [np.asarray(dec(params, latents[i:i + batch])) for i in range(0, len(latents), batch)]
  return np.round(np.concatenate(out) * 255).astype(np.uint8)


def schedule_alphas() -> jax.Array:
  return jnp.asarray(schedule.alphas_cumprod(schedule.ScheduleConfig()), jnp.float32)


def init_params(cfg: TrainConfig, sd: models.StableDiffusion, clip_module) -> dict:
  """Fresh weights of every trained network (vae, unet, clip, judge; SD's text encoder is the
  trained CLIP's text tower), deterministic in cfg.seed, drawn in numpy (no compile): kernels
  N(0, 1/fan_in), embeddings N(0, 0.02^2), small random biases and norm scales."""
  size = cfg.judge.image_size
  ids = jnp.zeros((1, world.MAX_TOKENS), jnp.int32)
  shapes = {
      "perceptual": jax.eval_shape(lambda: perceptual.init(cfg.perceptual_net, 0)),
      "vae": jax.eval_shape(sd.vae.init_weights, jax.random.key(0)),
      "unet": jax.eval_shape(sd.unet.init_weights, jax.random.key(0)),
      "clip": jax.eval_shape(clip_module.init, jax.random.key(0), ids,
                             jnp.zeros((1, size, size, 3)), ids, ids)["params"],
      "judge": jax.eval_shape(lambda: judge_lib.init(cfg.judge, 0)),
  }
  params = {name: noise.random_params(tree, [cfg.seed, i])
            for i, (name, tree) in enumerate(sorted(shapes.items()))}
  params["clip"]["logit_scale"] = np.full((), np.log(1 / 0.07), np.float32)  # CLIP's init
  return jax.device_put(params)  # no per-shape program, unlike jnp.asarray
