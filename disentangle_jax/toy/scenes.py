"""Procedural scenes with known factors, and their captions (the toy world's data).

A scene is one shape on a background. Content factors: shape, colour, position; one attribute
factor modelled on the paper's kinds of edit (what c1 appends):

  none      -
  smiling   a local, expression-like change: two bold eyes and a wide smile on the shape
  wooden    a material / texture: dark wavy grain bands across the shape (hue kept)
  snow      weather, ", covered by snow": a white cap on the shape, a snowy ground, flakes
  night     a global style, ", at night": a dark sky with stars (the shape's colour kept)

The world is entangled the way real data is (what the paper starts from):

* Captions leave content to the seed. A training caption names each content word only with
  probability 1 - OMIT_PROB ("a photo of a shape", "a photo of a red shape on the left",
  "a photo of a green triangle, at night"); the attribute is always named when present. A
  model trained on them draws the unnamed factors from the noise.
* Attributes correlate with content (``ATTRIBUTE_BIAS``): smiling things are yellow 70% of the
  time, wooden things squares 70%, snowy scenes on the left 80%, night scenes blue 70% (the
  other values share the rest equally; with no attribute every value is equally likely). So
  appending an attribute to a partial caption moves the distribution of the unnamed factors.
* The geometry (centre x, y and size) and the background tint are continuous nuisance from the
  per-image random stream: within one caption the seed decides them.

Everything is numpy, seeded and fast (~0.1 ms per 32 px image). Images stay 32 px (the
training budget of one CPU hour); the attributes are drawn bold enough to read at that size.

Factors are int arrays [N, 4]: (shape, colour, position, attribute) indices into the tuples
below; a caption's factors may hold OMITTED (-1) for an unnamed content word. Geometry labels
are float32 [N, 6]: GEOMETRY = (x, y, size) in pixels (centre and radius) and the background
tint (r, g, b) in 0..255 units. Images are uint8 [N, S, S, 3].
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right")
ATTRIBUTES = ("none", "smiling", "wooden", "snow", "night")
# Text appended to the content caption for each attribute (c1 = c0 + this).
ATTRIBUTE_TEXT = {"none": "", "smiling": ", smiling", "wooden": ", wooden",
                  "snow": ", covered by snow", "night": ", at night"}
FACTORS = ("shape", "colour", "position", "attribute")
FACTOR_SIZES = (len(SHAPES), len(COLOURS), len(POSITIONS), len(ATTRIBUTES))
CONTENT_FACTORS = 3  # the first three factors are content
OMITTED = -1  # a caption factor left unnamed (the seed decides it)
SHAPE_WORD = "shape"  # the noun of a caption whose shape is unnamed
GEOMETRY = ("x", "y", "size", "tint_r", "tint_g", "tint_b")

# attribute: (content factor index, favoured value, its probability). The other values of that
# factor share the rest equally; the remaining factors stay uniform.
ATTRIBUTE_BIAS = {"smiling": (1, COLOURS.index("yellow"), 0.7),
                  "wooden": (0, SHAPES.index("square"), 0.7),
                  "snow": (2, POSITIONS.index("left"), 0.8),
                  "night": (1, COLOURS.index("blue"), 0.7)}
OMIT_PROB = 0.5  # probability that a training caption leaves out each content word

IMAGE_SIZE = 32  # px
_SUPERSAMPLE = 2  # render at 2x and box-filter down (anti-aliasing)

_RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215),
        "yellow": (230, 195, 35)}
_SKY = np.array((185, 205, 225), np.float32)
_NIGHT = np.array((18, 22, 55), np.float32)
_SNOW = np.array((248, 248, 252), np.float32)
_INK = np.array((20, 15, 15), np.float32)
# Relative geometry (fractions of the image size).
_X = {"left": 0.3, "right": 0.7}
_Y = 0.52
_RADIUS = 0.21
_X_JITTER = 0.06  # +- centre jitter (x), of the image size
_Y_JITTER = 0.09  # +- centre jitter (y)
_SIZE_JITTER = 0.2  # +- relative radius jitter
_TINT = 14.0  # +- background tint jitter (per channel, 0..255)


def caption(factors: Sequence[int], with_attribute: bool = True) -> str:
  """The caption of factors (s, c, p, a); OMITTED content factors are left out of the text:
  (1, 0, 0, 3) -> 'a photo of a red square on the left, covered by snow',
  (-1, 0, -1, 0) -> 'a photo of a red shape'."""
  s, c, p, a = (int(v) for v in factors)
  words = ["a photo of a"]
  if c != OMITTED:
    words.append(COLOURS[c])
  words.append(SHAPES[s] if s != OMITTED else SHAPE_WORD)
  if p != OMITTED:
    words.append(f"on the {POSITIONS[p]}")
  text = " ".join(words)
  return text + (ATTRIBUTE_TEXT[ATTRIBUTES[a]] if with_attribute else "")


def all_factors() -> np.ndarray:
  """Every scene class [120, 4] (all factors named) in a fixed order (index = scene class)."""
  return np.array(list(itertools.product(*(range(n) for n in FACTOR_SIZES))), np.int32)


def all_caption_factors() -> np.ndarray:
  """Every caption [300, 4]: each content factor named or OMITTED, every attribute."""
  ranges = [range(OMITTED, n) for n in FACTOR_SIZES[:CONTENT_FACTORS]]
  return np.array(list(itertools.product(*ranges, range(FACTOR_SIZES[3]))), np.int32)


def all_captions() -> list[str]:
  """The captions of ``all_caption_factors()`` (what the text towers are trained on)."""
  return [caption(f) for f in all_caption_factors()]


def scene_index(factors: np.ndarray) -> np.ndarray:
  """Index of each fully named factor row [N, 4] in ``all_factors()`` -> [N]."""
  factors = np.asarray(factors)
  index = np.zeros(factors.shape[:-1], np.int64)
  for k, n in enumerate(FACTOR_SIZES):
    index = index * n + factors[..., k]
  return index


def caption_index(factors: np.ndarray) -> np.ndarray:
  """Index of each caption factor row [N, 4] (OMITTED allowed in content) in
  ``all_caption_factors()`` -> [N]."""
  factors = np.asarray(factors)
  index = np.zeros(factors.shape[:-1], np.int64)
  for k, n in enumerate(FACTOR_SIZES):
    shift = 1 if k < CONTENT_FACTORS else 0
    index = index * (n + shift) + factors[..., k] + shift
  return index


def consistent(caption_factors: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """bool [K, N]: caption k (factors [K, 4], OMITTED allowed) describes scene n ([N, 4])."""
  cf, f = np.asarray(caption_factors)[:, None, :], np.asarray(factors)[None, :, :]
  return np.all((cf == f) | (cf == OMITTED), axis=-1)


def factor_probs(attribute: int) -> list[np.ndarray]:
  """P(value) of each content factor given the attribute (``ATTRIBUTE_BIAS``), [3] arrays."""
  probs = [np.full(n, 1.0 / n) for n in FACTOR_SIZES[:CONTENT_FACTORS]]
  bias = ATTRIBUTE_BIAS.get(ATTRIBUTES[attribute])
  if bias is not None:
    k, value, p = bias
    n = FACTOR_SIZES[k]
    probs[k] = np.full(n, (1 - p) / (n - 1))
    probs[k][value] = p
  return probs


def sample_factors(rng: np.random.Generator, n: int) -> np.ndarray:
  """n random scenes [n, 4]: a uniform attribute, then content given it (``ATTRIBUTE_BIAS``)."""
  attributes = rng.integers(0, FACTOR_SIZES[3], n)
  u = rng.random((n, CONTENT_FACTORS))
  out = np.zeros((n, len(FACTORS)), np.int32)
  out[:, 3] = attributes
  for a in range(FACTOR_SIZES[3]):
    sel = attributes == a
    for k, p in enumerate(factor_probs(a)):
      out[sel, k] = np.searchsorted(np.cumsum(p)[:-1], u[sel, k], side="right")
  return out


def sample_captions(rng: np.random.Generator, factors: np.ndarray,
                    omit_prob: float = OMIT_PROB) -> np.ndarray:
  """Caption factors [n, 4] of scenes [n, 4]: each content factor OMITTED with omit_prob."""
  factors = np.asarray(factors)
  out = factors.copy()
  omit = rng.random((len(factors), CONTENT_FACTORS)) < omit_prob
  out[:, :CONTENT_FACTORS] = np.where(omit, OMITTED, factors[:, :CONTENT_FACTORS])
  return out


def parse_caption(text: str) -> np.ndarray:
  """The caption factors [4] (OMITTED for unnamed content) of a caption written by
  ``caption``; ValueError names the text if it is none."""
  for f in all_caption_factors():
    if caption(f) == text.strip():
      return f
  raise ValueError(f"{text!r} is not a toy-world caption; write e.g. "
                   f"{caption((0, 0, 0, 3))!r} or {caption((OMITTED, OMITTED, OMITTED, 3))!r}.")


def _shape_mask(shape: str, u, v, cx, cy, r):
  dx, dy = u - cx, v - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  top, bottom = cy - 1.05 * r, cy + 0.8 * r  # an upright triangle
  return (v >= top) & (v <= bottom) & (np.abs(dx) <= 0.62 * (v - top))


def _render_one(f, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [S, S, 3], geometry float32 [6]) of one scene; nuisance from ``rng``."""
  s, c, p, a = (int(v) for v in f)
  shape, attribute = SHAPES[s], ATTRIBUTES[a]
  n = size * _SUPERSAMPLE
  v, u = np.mgrid[0:n, 0:n].astype(np.float32) / n + 0.5 / n  # pixel centres in [0, 1]
  cx = _X[POSITIONS[p]] + rng.uniform(-_X_JITTER, _X_JITTER)
  cy = _Y + rng.uniform(-_Y_JITTER, _Y_JITTER)
  r = _RADIUS * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
  tint = rng.uniform(-_TINT, _TINT, 3).astype(np.float32)
  img = np.empty((n, n, 3), np.float32)
  img[:] = (_NIGHT if attribute == "night" else _SKY) + tint
  specks = rng.uniform(0, 1, (2, 12))  # star / flake positions (drawn for every scene)
  phase = rng.uniform(0, 2 * np.pi)  # grain / snow-line phase (drawn for every scene)
  if attribute == "night":
    for x, y in specks.T[:7]:
      img[(np.abs(u - x) < 0.03) & (np.abs(v - y) < 0.03)] = (255, 240, 160)
  if attribute == "snow":
    img[v > 0.86 + 0.03 * np.sin(9 * u + phase)] = _SNOW
    for x, y in specks.T:
      img[(u - x) ** 2 + (v - y) ** 2 < 0.028 ** 2] = _SNOW
  mask = _shape_mask(shape, u, v, cx, cy, r)
  img[mask] = _RGB[COLOURS[c]]
  if attribute == "wooden":
    grain = np.sin(2 * np.pi * (v - cy) / 0.2 + 1.2 * np.sin(6 * u + phase)) > 0.0
    img[mask & grain] *= 0.3
  elif attribute == "snow":
    cap = mask & (v < cy - 0.2 * r + 0.05 * np.sin(25 * u))
    img[cap] = _SNOW
  elif attribute == "smiling":
    ey = cy - 0.28 * r + (0.25 * r if shape == "triangle" else 0)
    for ex in (cx - 0.4 * r, cx + 0.4 * r):
      img[(u - ex) ** 2 + (v - ey) ** 2 < (0.22 * r) ** 2] = _INK
    my = ey + 0.02 * r
    dist = np.sqrt((u - cx) ** 2 + (v - my) ** 2)
    img[mask & (dist > 0.4 * r) & (dist < 0.68 * r) & (v > my + 0.22 * r)] = _INK
  img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
  geometry = np.array([cx * size, cy * size, r * size, *tint], np.float32)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), geometry


def _check_factors(factors: np.ndarray, seeds) -> None:
  if factors.ndim != 2 or factors.shape[1] != len(FACTORS):
    raise ValueError(f"factors must be [N, {len(FACTORS)}] ({FACTORS}); got {factors.shape}.")
  if len(seeds) != len(factors):
    raise ValueError(f"need one seed per scene; got {len(seeds)} seeds for {len(factors)}.")
  for k, n in enumerate(FACTOR_SIZES):
    if factors[:, k].min(initial=0) < 0 or factors[:, k].max(initial=0) >= n:
      raise ValueError(f"factor {FACTORS[k]} must be in [0, {n}); got {factors[:, k]}.")


def render_with_geometry(factors: np.ndarray, seeds: Sequence[int], stream: int = 0,
                         size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, size, size, 3], geometry float32 [N, 6]) of factor rows [N, 4]; image
  i's nuisance comes from ``default_rng([stream, seeds[i]])``, so one (factors, seed, stream) is
  always the same image."""
  factors = np.asarray(factors)
  _check_factors(factors, seeds)
  if not len(factors):
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, len(GEOMETRY)), np.float32)
  out = [_render_one(f, np.random.default_rng([stream, int(s)]), size)
         for f, s in zip(factors, seeds)]
  return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def render(factors: np.ndarray, seeds: Sequence[int], stream: int = 0,
           size: int = IMAGE_SIZE) -> np.ndarray:
  """Images uint8 [N, size, size, 3] of factor rows [N, 4] (``render_with_geometry``)."""
  return render_with_geometry(factors, seeds, stream, size)[0]


def dataset(seed: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n random scenes (images uint8 [n, S, S, 3], factors [n, 4], geometry [n, 6]),
  deterministic in (seed, stream). Training uses stream 0 (the perceptual network its own
  stream); fresh evaluation renders use other streams."""
  rng = np.random.default_rng([seed, stream, 7])
  factors = sample_factors(rng, n)
  seeds = rng.integers(0, 2**31 - 1, n)
  images, geometry = render_with_geometry(factors, seeds, stream=stream + 1000 * seed)
  return images, factors, geometry
