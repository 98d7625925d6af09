"""The two losses of the lambda optimisation (docs/METHOD.md section 4), as pure functions.

    L_dir  = 1 - cos(E_img(original) - E_img(edited), E_txt(text0) - E_txt(text1))
    L_perc = sum over relu1_2, relu2_2, relu3_3, relu4_3 of mean |VGG(a) - VGG(b)|

Everything here is jit-able and differentiable with respect to the images. The networks enter
as apply functions with their parameters passed explicitly (``loss_models.load_loss_models``
builds them):

    clip_apply_fn(params, pixels [B, S, S, 3]) -> [B, E]   projected CLIP image features
    vgg_apply_fn(params, x [B, R, R, 3]) -> 4 arrays [B, h, w, c]   VGG16 activations

Images are NHWC float in [0, 1]: a decoded Stable Diffusion image x in [-1, 1] enters as
(x + 1) / 2. Shapes: B batch, H W image size, E CLIP embedding width, S CLIP image size,
R VGG input size.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ClipApplyFn = Callable[[Any, jax.Array], jax.Array]
VggApplyFn = Callable[[Any, jax.Array], Sequence[jax.Array]]

# "release": the reference code's CLIP input (nearest x7 up, 16x16 average pool, no mean/std);
# "standard": bilinear resize + CLIP's mean/std normalisation.
PREPROCESS_MODES = ("release", "standard")

# CLIP's per-channel RGB normalisation (openai/CLIP, CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ImageNet per-channel RGB normalisation of torchvision's VGG16 weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Default VGG input size (torchvision's ImageNet models are trained on 224 x 224 crops).
VGG_INPUT_SIZE = 224

# Bilinear resizes match torch.nn.functional.interpolate(mode="bilinear",
# align_corners=False) with its default antialias=False (half-pixel centres, no low-pass
# filter when shrinking).
RESIZE_ANTIALIAS = False

# Floor of the vector norms in the cosine: keeps the loss and its gradient finite when the
# image direction is zero (edited == original).
COSINE_EPS = 1e-8


def _check_images(name: str, images) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"{name} must be RGB images [B, H, W, 3] (NHWC, values in [0, 1]); got shape "
        f"{tuple(images.shape)}.")


def box_resample_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The [out_size, in_size] matrix of nearest-upsample-by-u then average-pool-by-k.

  With g = gcd(in_size, out_size), u = out_size / g and k = in_size / g are the smallest
  integers with in_size * u / k = out_size. Row i averages the k upsampled samples
  [i k, (i + 1) k); upsampled sample m copies input pixel m // u. For in_size = 512 and
  out_size = 224 this is the reference code's x7 nearest upsample + 16 x 16 average pool
  exactly (u = 7, k = 16); for other sizes it is the same exact area (box) resampling.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"box resampling needs positive sizes; got {in_size} -> {out_size}.")
  g = math.gcd(in_size, out_size)
  up, pool = out_size // g, in_size // g
  m = np.arange(in_size * up)
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (m // pool, m // up), 1.0 / pool)
  return matrix


def release_resize(images: jax.Array, size: int) -> jax.Array:
  """The reference code's CLIP resize: [B, H, W, C] -> [B, size, size, C].

  Each axis is resampled with ``box_resample_matrix`` (512 -> 224: nearest x7 then 16 x 16
  average pooling, computed as two small matrix products instead of a 3584 x 3584 image).
  """
  rows = jnp.asarray(box_resample_matrix(images.shape[1], size), images.dtype)
  cols = jnp.asarray(box_resample_matrix(images.shape[2], size), images.dtype)
  return jnp.einsum("ih,bhwc,jw->bijc", rows, images, cols,
                    precision=jax.lax.Precision.HIGHEST)


def bilinear_resize(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize [B, H, W, C] -> [B, size, size, C] (torch's interpolate semantics)."""
  shape = (images.shape[0], size, size, images.shape[3])
  if tuple(images.shape) == shape:
    return images
  return jax.image.resize(images, shape, method="bilinear", antialias=RESIZE_ANTIALIAS)


def _normalize(images: jax.Array, mean, std) -> jax.Array:
  mean = jnp.asarray(mean, images.dtype)
  std = jnp.asarray(std, images.dtype)
  return (images - mean) / std


def clip_preprocess(images: jax.Array, preprocess: str, image_size: int) -> jax.Array:
  """Turns images in [0, 1] [B, H, W, 3] into CLIP's input [B, image_size, image_size, 3].

  "release": ``release_resize`` and no normalisation (the reference code);
  "standard": ``bilinear_resize`` and CLIP's mean/std normalisation.
  """
  _check_images("images", images)
  if preprocess == "release":
    return release_resize(images, image_size)
  if preprocess == "standard":
    return _normalize(bilinear_resize(images, image_size), CLIP_MEAN, CLIP_STD)
  raise ValueError(f"preprocess={preprocess!r} is unknown; use one of {PREPROCESS_MODES}.")


def clip_image_features(clip_apply_fn: ClipApplyFn, params, images: jax.Array,
                        preprocess: str, image_size: int) -> jax.Array:
  """Projected CLIP image features [B, E] of images [B, H, W, 3] in [0, 1].

  Not L2-normalised (the reference code takes differences of raw projected features).
  """
  return clip_apply_fn(params, clip_preprocess(images, preprocess, image_size))


def _safe_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), COSINE_EPS**2))


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """cos(a, b) along the last axis, with norms floored at COSINE_EPS; [..., E] -> [...]."""
  return jnp.sum(a * b, axis=-1) / (_safe_norm(a) * _safe_norm(b))


def directional_clip_loss(img_feat_orig: jax.Array, img_feat_edit: jax.Array,
                          txt_feat0: jax.Array, txt_feat1: jax.Array) -> jax.Array:
  """L_dir = 1 - cos(d_img, d_txt) per image; returns [B].

  Args:
    img_feat_orig: [B, E] CLIP image features of the original (lambda = 0) images.
    img_feat_edit: [B, E] CLIP image features of the edited images.
    txt_feat0: [E] (or [B, E], one per image) CLIP text features of the neutral prompt c0.
    txt_feat1: [E] (or [B, E]) CLIP text features of the target prompt c1.

  d_img = orig - edit and d_txt = text0 - text1 (both "neutral minus target"), so the loss is
  0 when the edit moves the image exactly along the text direction and 2 when opposite.
  """
  if img_feat_orig.ndim != 2 or img_feat_orig.shape != img_feat_edit.shape:
    raise ValueError(
        f"img_feat_orig {tuple(img_feat_orig.shape)} and img_feat_edit "
        f"{tuple(img_feat_edit.shape)} must both be [B, E] with the same shape.")
  width = img_feat_orig.shape[-1]
  for name, feat in (("txt_feat0", txt_feat0), ("txt_feat1", txt_feat1)):
    if tuple(feat.shape) not in ((width,), (img_feat_orig.shape[0], width)):
      raise ValueError(
          f"{name} has shape {tuple(feat.shape)}; expected [E] = ({width},) like the image "
          f"features, or [B, E] = {tuple(img_feat_orig.shape)} (one per image) "
          "(loss_models.encode_texts returns [N, E]: index one row).")
  d_img = img_feat_orig - img_feat_edit
  d_txt = (txt_feat0 - txt_feat1).astype(d_img.dtype)
  return 1.0 - cosine_similarity(d_img, jnp.broadcast_to(d_txt, d_img.shape))


def vgg_input(images: jax.Array, input_size: int = VGG_INPUT_SIZE) -> jax.Array:
  """What VGG16 reads: images [B, H, W, 3] in [0, 1] resized bilinearly to
  [B, input_size, input_size, 3] and ImageNet-normalised."""
  return _normalize(bilinear_resize(images, input_size), IMAGENET_MEAN, IMAGENET_STD)


def vgg_features(vgg_apply_fn: VggApplyFn, params, images: jax.Array,
                 input_size: int = VGG_INPUT_SIZE) -> list[jax.Array]:
  """VGG16 activations of ``vgg_input(images, input_size)``; a list of 4 arrays [B, h, w, c]."""
  _check_images("images", images)
  return list(vgg_apply_fn(params, vgg_input(images, input_size)))


def vgg_perceptual_loss(vgg_apply_fn: VggApplyFn, params, a: jax.Array, b: jax.Array,
                        input_size: int = VGG_INPUT_SIZE) -> jax.Array:
  """L_perc(a, b) = sum over the VGG taps of mean |f(a) - f(b)|, per image; returns [B].

  Args:
    vgg_apply_fn, params: the VGG16 feature extractor (see module docstring).
    a, b: [B, H, W, 3] images in [0, 1] (edited and original); run as one batch of 2B.
    input_size: side of the bilinear resize before VGG (224 for the real network).
  """
  _check_images("a", a)
  _check_images("b", b)
  if a.shape != b.shape:
    raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape.")
  n = a.shape[0]
  feats = vgg_features(vgg_apply_fn, params, jnp.concatenate([a, b.astype(a.dtype)]),
                       input_size)
  return sum(jnp.mean(jnp.abs(f[:n] - f[n:]), axis=(1, 2, 3)) for f in feats)
