"""Evaluation metrics of an attribute edit, per item, as pure jit-able functions.

For an original (pure c0) image o, an edited image e and the prompts' CLIP text features
t0 (neutral) and t1 (target):

    directional_clip = cos(E_img(e) - E_img(o), t1 - t0)      in [-1, 1], higher = on-target
    clip_score       = cos(E_img(e), t1)                      in [-1, 1], higher = on-target
    content_distance = L_perc(e, o) (losses.vgg_perceptual_loss)   >= 0, lower = more faithful

The networks enter as apply functions (``loss_models.load_loss_models``) with their
parameters passed explicitly. Images are NHWC float in [0, 1]. Shapes: B items, E CLIP width.

Real-image editing adds how well the lambda = 0 run reproduces its input
(``reconstruction_metrics``, host-side numpy).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import losses

# The keys of ``item_metrics``'s result, in the order reports list them.
METRIC_NAMES = ("directional_clip", "clip_score", "content_distance")


class MetricNets(NamedTuple):
  """Static parts of the metric networks (no weights; hashable, so jit can bind them).

  Attributes:
    clip_image: (clip params, pixels [B, S, S, 3]) -> [B, E] projected image features.
    vgg: (vgg params, x [B, R, R, 3]) -> 4 activations.
    clip_image_size: S.
    vgg_input_size: R.
    preprocess: CLIP preprocessing, one of losses.PREPROCESS_MODES.
  """

  clip_image: Callable
  vgg: Callable
  clip_image_size: int
  vgg_input_size: int
  preprocess: str = "standard"


def from_loss_models(lm, preprocess: str = "standard") -> MetricNets:
  """The MetricNets of a ``loss_models.LossModels``; validates ``preprocess``."""
  if preprocess not in losses.PREPROCESS_MODES:
    raise ValueError(f"preprocess={preprocess!r} is unknown; use one of "
                     f"{losses.PREPROCESS_MODES}.")
  return MetricNets(lm.clip_image_apply, lm.vgg_apply, lm.clip_image_size, lm.vgg_input_size,
                    preprocess)


def _check(original, edited, text0, text1) -> None:
  if original.shape != edited.shape:
    raise ValueError(f"original {tuple(original.shape)} and edited {tuple(edited.shape)} must "
                     "have the same shape [B, H, W, 3].")
  if text0.shape != text1.shape or text0.ndim != 2 or text0.shape[0] != original.shape[0]:
    raise ValueError(f"text0 {tuple(text0.shape)} and text1 {tuple(text1.shape)} must both be "
                     f"[B, E] with B = {original.shape[0]} (one row per item).")


def item_metrics(nets: MetricNets, params: dict[str, Any], original: jax.Array,
                 edited: jax.Array, text0: jax.Array, text1: jax.Array) -> dict[str, jax.Array]:
  """The metrics of each item; every value is float [B].

  Args:
    nets: the static network functions and sizes.
    params: {"clip": ..., "vgg": ...}.
    original: [B, H, W, 3] pure-c0 images in [0, 1].
    edited: [B, H, W, 3] edited images in [0, 1].
    text0, text1: [B, E] CLIP text features of each item's neutral and target prompt.
  """
  _check(original, edited, text0, text1)
  n = original.shape[0]
  feats = losses.clip_image_features(nets.clip_image, params["clip"],
                                     jnp.concatenate([original, edited]), nets.preprocess,
                                     nets.clip_image_size)
  f_orig, f_edit = feats[:n], feats[n:]
  text0 = text0.astype(feats.dtype)
  text1 = text1.astype(feats.dtype)
  return {
      "directional_clip": losses.cosine_similarity(f_edit - f_orig, text1 - text0),
      "clip_score": losses.cosine_similarity(f_edit, text1),
      "content_distance": losses.vgg_perceptual_loss(nets.vgg, params["vgg"], edited, original,
                                                     nets.vgg_input_size),
  }


def psnr(a, b, peak: float = 1.0) -> float:
  """Peak signal-to-noise ratio in dB of two float arrays in [0, peak] (inf if equal)."""
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def reconstruction_metrics(z0, z_rec, image, image_rec, image_vae) -> dict:
  """How well the lambda = 0 run reproduces the input (host-side numpy; JSON-ready floats).

  Args:
    z0, z_rec: [B, H, W, C] encoded latents and the latents of the lambda = 0 run.
    image: [B, h, w, 3] the (resized) input; image_rec: decode(z_rec); image_vae: decode(z0),
      the VAE's own round trip (the floor any inversion can reach in pixels).
  """
  dz = np.asarray(z_rec, np.float64) - np.asarray(z0, np.float64)
  di = np.asarray(image_rec, np.float64) - np.asarray(image, np.float64)
  return {
      "latent_rmse": float(np.sqrt(np.mean(dz**2))),
      "latent_max_abs": float(np.max(np.abs(dz))),
      "pixel_mae": float(np.mean(np.abs(di))),
      "pixel_psnr_db": psnr(image_rec, image),
      "vae_roundtrip_psnr_db": psnr(image_vae, image),
  }
