"""Procedural scenes with known factors, and their captions (the toy world's data).

A scene is one shape on a background. Content factors: shape, colour, position (what c0
describes); one attribute factor modelled on the paper's kinds of edit (what c1 appends):

  none      -
  smiling   a local, expression-like change: two eyes and a smile on the shape
  wooden    a material / texture: dark wavy grain stripes across the shape (hue kept)
  snow      weather, ", covered by snow": a white cap on the shape, a snowy ground, flakes
  night     a global style, ", at night": a dark sky with stars (the shape's colour kept)

Nuisance variation (size, jitter of the position, background tint, flakes, stars) comes from
the per-image random stream, so one caption has many images. Everything is numpy, seeded
and fast (~0.1 ms per 32 px image).

Factors are int arrays [N, 4]: (shape, colour, position, attribute) indices into the tuples
below. Images are uint8 [N, S, S, 3].
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

IMAGE_SIZE = 32  # px
_SUPERSAMPLE = 2  # render at 2x and box-filter down (anti-aliasing)

_RGB = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215),
        "yellow": (230, 195, 35)}
_SKY = np.array((185, 205, 225), np.float32)
_NIGHT = np.array((18, 22, 55), np.float32)
_SNOW = np.array((246, 246, 252), np.float32)
_INK = np.array((25, 20, 20), np.float32)
# Relative geometry (fractions of the image size).
_X = {"left": 0.29, "right": 0.71}
_Y = 0.5
_RADIUS = 0.2
_JITTER = 0.05  # position jitter
_SIZE_JITTER = 0.12  # relative radius jitter
_TINT = 12.0  # background tint jitter (per channel, 0..255)


def caption(factors: Sequence[int], with_attribute: bool = True) -> str:
  """'a photo of a red circle on the left[, covered by snow]' for factors (s, c, p, a)."""
  s, c, p, a = (int(v) for v in factors)
  text = f"a photo of a {COLOURS[c]} {SHAPES[s]} on the {POSITIONS[p]}"
  return text + (ATTRIBUTE_TEXT[ATTRIBUTES[a]] if with_attribute else "")


def all_factors() -> np.ndarray:
  """Every factor combination [120, 4] in a fixed order (index = caption class)."""
  return np.array(list(itertools.product(*(range(n) for n in FACTOR_SIZES))), np.int32)


def all_captions() -> list[str]:
  return [caption(f) for f in all_factors()]


def caption_index(factors: np.ndarray) -> np.ndarray:
  """Index of each factor row [N, 4] in ``all_factors()`` -> [N]."""
  factors = np.asarray(factors)
  index = np.zeros(factors.shape[:-1], np.int64)
  for k, n in enumerate(FACTOR_SIZES):
    index = index * n + factors[..., k]
  return index


def sample_factors(rng: np.random.Generator, n: int) -> np.ndarray:
  """n uniformly random factor rows [n, 4]."""
  return np.stack([rng.integers(0, k, n) for k in FACTOR_SIZES], axis=1).astype(np.int32)


def parse_caption(text: str) -> np.ndarray:
  """The factors [4] of a caption written by ``caption``; ValueError names the text if not."""
  for f in all_factors():
    if caption(f) == text.strip():
      return f
  raise ValueError(f"{text!r} is not a toy-world caption; write e.g. {caption((0, 0, 0, 3))!r}.")


def _shape_mask(shape: str, u, v, cx, cy, r):
  dx, dy = u - cx, v - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  top, bottom = cy - 1.05 * r, cy + 0.8 * r  # an upright triangle
  return (v >= top) & (v <= bottom) & (np.abs(dx) <= 0.62 * (v - top))


def _render_one(f, rng: np.random.Generator, size: int) -> np.ndarray:
  s, c, p, a = (int(v) for v in f)
  shape, attribute = SHAPES[s], ATTRIBUTES[a]
  n = size * _SUPERSAMPLE
  v, u = np.mgrid[0:n, 0:n].astype(np.float32) / n + 0.5 / n  # pixel centres in [0, 1]
  cx = _X[POSITIONS[p]] + rng.uniform(-_JITTER, _JITTER)
  cy = _Y + rng.uniform(-_JITTER, _JITTER)
  r = _RADIUS * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
  tint = rng.uniform(-_TINT, _TINT, 3).astype(np.float32)
  img = np.empty((n, n, 3), np.float32)
  img[:] = (_NIGHT if attribute == "night" else _SKY) + tint
  specks = rng.uniform(0, 1, (2, 12))  # star / flake positions (drawn for every scene)
  if attribute == "night":
    for x, y in specks.T[:6]:
      img[(np.abs(u - x) < 0.025) & (np.abs(v - y) < 0.025)] = (250, 240, 170)
  if attribute == "snow":
    img[v > 0.84 + 0.03 * np.sin(9 * u + rng.uniform(0, 6))] = _SNOW
    for x, y in specks.T:
      img[(u - x) ** 2 + (v - y) ** 2 < 0.022 ** 2] = _SNOW
  mask = _shape_mask(shape, u, v, cx, cy, r)
  img[mask] = _RGB[COLOURS[c]]
  if attribute == "wooden":
    phase = rng.uniform(0, 2 * np.pi)
    grain = np.sin(2 * np.pi * (v - cy) / 0.16 + 1.5 * np.sin(7 * u + phase)) > 0.2
    img[mask & grain] *= 0.45
  elif attribute == "snow":
    cap = mask & (v < cy - 0.25 * r + 0.04 * np.sin(25 * u))
    img[cap] = _SNOW
  elif attribute == "smiling":
    ey = cy - 0.25 * r + (0.2 * r if shape == "triangle" else 0)
    for ex in (cx - 0.38 * r, cx + 0.38 * r):
      img[(u - ex) ** 2 + (v - ey) ** 2 < (0.16 * r) ** 2] = _INK
    my = ey + 0.05 * r
    dist = np.sqrt((u - cx) ** 2 + (v - my) ** 2)
    img[mask & (dist > 0.42 * r) & (dist < 0.6 * r) & (v > my + 0.2 * r)] = _INK
  img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(factors: np.ndarray, seeds: Sequence[int], stream: int = 0,
           size: int = IMAGE_SIZE) -> np.ndarray:
  """Images uint8 [N, size, size, 3] of factor rows [N, 4]; image i's nuisance comes from
  ``default_rng([stream, seeds[i]])``, so one (factors, seed, stream) is always the same image.
  """
  factors = np.asarray(factors)
  if factors.ndim != 2 or factors.shape[1] != len(FACTORS):
    raise ValueError(f"factors must be [N, {len(FACTORS)}] ({FACTORS}); got {factors.shape}.")
  if len(seeds) != len(factors):
    raise ValueError(f"need one seed per scene; got {len(seeds)} seeds for {len(factors)}.")
  for k, n in enumerate(FACTOR_SIZES):
    if factors[:, k].min(initial=0) < 0 or factors[:, k].max(initial=0) >= n:
      raise ValueError(f"factor {FACTORS[k]} must be in [0, {n}); got {factors[:, k]}.")
  return np.stack([_render_one(f, np.random.default_rng([stream, int(s)]), size)
                   for f, s in zip(factors, seeds)]) if len(factors) else np.zeros(
                       (0, size, size, 3), np.uint8)


def dataset(seed: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
  """n random scenes (images uint8 [n, S, S, 3], factors [n, 4]), deterministic in (seed,
  stream). Training uses stream 0; fresh evaluation renders use other streams."""
  rng = np.random.default_rng([seed, stream, 7])
  factors = sample_factors(rng, n)
  seeds = rng.integers(0, 2**31 - 1, n)
  return render(factors, seeds, stream=stream + 1000 * seed), factors
