"""The judge: a small CNN trained on the renderer's labels, used only to score edits.

It is not part of any loss. It predicts every factor of a scene (shape, colour, position,
attribute) from an image in [0, 1] and, by regression, its continuous geometry and nuisance
(centre x, y and radius in pixels, background tint; ``scenes.GEOMETRY``), and scores an edit
against the pure-c0 image of the same seed:

  attribute success   judge(edited).attribute == the target attribute
  content preserved   judge(edited)[content] == judge(original)[content] (shape, colour,
                      position: the categorical factors)
  combined            both
  position error      distance of the two predicted centres, pixels
  size error          |size(edited) / size(original) - 1|
  geometry kept       position error <= POSITION_TOLERANCE px and size error <= SIZE_TOLERANCE
  combined strict     combined and geometry kept (every seed-decided factor kept)

Shapes: B batch, S image size, G = len(scenes.GEOMETRY). Images NHWC float in [0, 1].
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax.toy import scenes

CONFIG_FILE, WEIGHTS_FILE = "config.json", "judge.msgpack"
# Geometry targets are regressed as (g - _GEO_MEAN) / _GEO_STD (x, y, size in px; tint 0..255).
_GEO_MEAN = np.array([16.0, 16.6, 6.7, 0.0, 0.0, 0.0], np.float32)
_GEO_STD = np.array([6.7, 1.7, 0.8, 8.0, 8.0, 8.0], np.float32)
GEOMETRY_WEIGHT = 1.0  # weight of the geometry MSE (normalised units) against the mean CE
POSITION_TOLERANCE = 1.5  # px: "the same place" for geometry kept
SIZE_TOLERANCE = 0.1  # relative: "the same size" for geometry kept


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  widths: tuple[int, ...] = (32, 64, 64)  # conv widths, each conv followed by a stride-2 pool
  hidden: int = 128  # dense width before the factor heads
  image_size: int = scenes.IMAGE_SIZE


class Judge(nn.Module):
  """images [B, S, S, 3] in [0, 1] -> (one logits array per factor, [B, FACTOR_SIZES[k]];
  normalised geometry [B, G])."""

  config: JudgeConfig

  @nn.compact
  def __call__(self, x):
    x = x * 2 - 1
    b, h, w_, _ = x.shape
    coords = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w_),
                                    indexing="ij"), axis=-1)  # where: geometry is regressed
    x = jnp.concatenate([x, jnp.broadcast_to(coords, (b, h, w_, 2)).astype(x.dtype)], axis=-1)
    for w in self.config.widths:
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(self.config.hidden)(x.reshape(x.shape[0], -1)))
    logits = tuple(nn.Dense(n, name=f"head_{name}")(x)
                   for name, n in zip(scenes.FACTORS, scenes.FACTOR_SIZES))
    return logits, nn.Dense(len(scenes.GEOMETRY), name="head_geometry")(x)


def init(config: JudgeConfig, seed: int):
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  return Judge(config).init(jax.random.key(seed), x)["params"]


def loss(config: JudgeConfig, params, images, factors, geometry):
  """Mean over factors of the cross-entropy plus GEOMETRY_WEIGHT x the normalised geometry
  MSE; images [B,S,S,3] in [0,1], factors [B,4] int, geometry [B,G] (scenes.GEOMETRY units)."""
  logits, geo = Judge(config).apply({"params": params}, images)
  ce = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(l), factors[:, k:k + 1], axis=1))
        for k, l in enumerate(logits)]
  mse = jnp.mean((geo - (geometry - _GEO_MEAN) / _GEO_STD) ** 2)
  return sum(ce) / len(ce) + GEOMETRY_WEIGHT * mse


def predict(config: JudgeConfig, params, images) -> tuple[jax.Array, jax.Array]:
  """(factors [B, 4] int32, geometry [B, G] in scenes.GEOMETRY units) of images [B,S,S,3]."""
  logits, geo = Judge(config).apply({"params": params}, images)
  factors = jnp.stack([jnp.argmax(l, axis=-1) for l in logits], axis=1).astype(jnp.int32)
  return factors, geo * _GEO_STD + _GEO_MEAN


def score_edits(original_pred, edited_pred, attribute: int) -> dict[str, np.ndarray]:
  """Per-item scores [B] of edits from judge predictions (factors [B, 4], geometry [B, G]) of
  both images (module docstring): 0/1 scores, position error in px, relative size error."""
  (f0, g0), (f1, g1) = (tuple(np.asarray(a) for a in p) for p in (original_pred, edited_pred))
  content = scenes.CONTENT_FACTORS
  success = f1[:, 3] == attribute
  kept = np.all(f1[:, :content] == f0[:, :content], axis=1)
  position = np.hypot(g1[:, 0] - g0[:, 0], g1[:, 1] - g0[:, 1])
  size = np.abs(g1[:, 2] / g0[:, 2] - 1)
  geometry = (position <= POSITION_TOLERANCE) & (size <= SIZE_TOLERANCE)
  return {"attribute_success": success.astype(np.float64),
          "content_preserved": kept.astype(np.float64),
          "combined": (success & kept).astype(np.float64),
          "position_error_px": position.astype(np.float64),
          "size_error": size.astype(np.float64),
          "geometry_kept": geometry.astype(np.float64),
          "combined_strict": (success & kept & geometry).astype(np.float64)}


def accuracy(pred: np.ndarray, factors: np.ndarray) -> dict[str, float]:
  """Per-factor accuracy of predicted factors [N, 4] against the renderer's factors [N, 4]."""
  return {name: float(np.mean(pred[:, k] == factors[:, k]))
          for k, name in enumerate(scenes.FACTORS)}


def geometry_error(pred: np.ndarray, geometry: np.ndarray) -> dict[str, float]:
  """Mean absolute error of predicted geometry [N, G] against the renderer's labels: x and y in
  px, size relative (|pred / true - 1|), tint in 0..255 units (mean over channels)."""
  err = np.abs(np.asarray(pred) - np.asarray(geometry))
  return {"x_px": float(np.mean(err[:, 0])), "y_px": float(np.mean(err[:, 1])),
          "size_rel": float(np.mean(err[:, 2] / geometry[:, 2])),
          "tint": float(np.mean(err[:, 3:]))}


def save(directory, config: JudgeConfig, params) -> None:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
  (directory / WEIGHTS_FILE).write_bytes(flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, jax.device_get(params))))


def load(directory, rebuild_hint: str = "") -> tuple[JudgeConfig, dict]:
  """(config, params) from a judge folder; one clear error naming a missing/corrupt file."""
  cfg_path = os.path.join(directory, CONFIG_FILE)
  path = os.path.join(directory, WEIGHTS_FILE)
  for p in (cfg_path, path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"judge file {p} is missing; {rebuild_hint}")
  try:
    raw = json.loads(pathlib.Path(cfg_path).read_text())
    config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    state = flax.serialization.msgpack_restore(pathlib.Path(path).read_bytes())
    template = jax.eval_shape(lambda: init(config, 0))
    params = flax.serialization.from_state_dict(template, state)
    shapes_ok = jax.tree.all(jax.tree.map(lambda a, b: a.shape == np.shape(b), template, params))
  except Exception as e:  # pylint: disable=broad-except  # any reader's error: one message
    raise ValueError(f"judge file {path} could not be read ({type(e).__name__}: {e}); "
                     f"{rebuild_hint}") from None
  if not shapes_ok:
    raise ValueError(f"judge file {path} does not match {cfg_path}; {rebuild_hint}")
  return config, jax.device_put(params)  # no per-shape program, unlike jnp.asarray
