"""The judge: a small CNN trained on the renderer's labels, used only to score edits.

It is not part of any loss. It predicts every factor of a scene (shape, colour, position,
attribute) from an image in [0, 1] and scores an edit against the pure-c0 image of the same
seed:

  attribute success   judge(edited).attribute == the target attribute
  content preserved   judge(edited)[content] == judge(original)[content]
  combined            both

Shapes: B batch, S image size. Images NHWC float in [0, 1].
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


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  widths: tuple[int, ...] = (32, 64, 64)  # conv widths, each conv followed by a stride-2 pool
  hidden: int = 128  # dense width before the factor heads
  image_size: int = scenes.IMAGE_SIZE


class Judge(nn.Module):
  """images [B, S, S, 3] in [0, 1] -> one logits array per factor, [B, FACTOR_SIZES[k]]."""

  config: JudgeConfig

  @nn.compact
  def __call__(self, x):
    x = x * 2 - 1
    for w in self.config.widths:
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.relu(nn.Conv(w, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(self.config.hidden)(x.reshape(x.shape[0], -1)))
    return tuple(nn.Dense(n, name=f"head_{name}")(x)
                 for name, n in zip(scenes.FACTORS, scenes.FACTOR_SIZES))


def init(config: JudgeConfig, seed: int):
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  return Judge(config).init(jax.random.key(seed), x)["params"]


def loss(config: JudgeConfig, params, images, factors):
  """Mean over factors of the cross-entropy; images [B,S,S,3] in [0,1], factors [B,4] int."""
  logits = Judge(config).apply({"params": params}, images)
  ce = [-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(l), factors[:, k:k + 1], axis=1))
        for k, l in enumerate(logits)]
  return sum(ce) / len(ce)


def predict(config: JudgeConfig, params, images) -> jax.Array:
  """Predicted factors [B, 4] int32 of images [B, S, S, 3] in [0, 1]."""
  logits = Judge(config).apply({"params": params}, images)
  return jnp.stack([jnp.argmax(l, axis=-1) for l in logits], axis=1).astype(jnp.int32)


def score_edits(original_pred: np.ndarray, edited_pred: np.ndarray,
                attribute: int) -> dict[str, np.ndarray]:
  """Per-item scores [B] (0/1) of edits from judge predictions [B, 4] of both images."""
  content = scenes.CONTENT_FACTORS
  success = edited_pred[:, 3] == attribute
  kept = np.all(edited_pred[:, :content] == original_pred[:, :content], axis=1)
  return {"attribute_success": success.astype(np.float64),
          "content_preserved": kept.astype(np.float64),
          "combined": (success & kept).astype(np.float64)}


def accuracy(pred: np.ndarray, factors: np.ndarray) -> dict[str, float]:
  """Per-factor accuracy of predictions [N, 4] against the renderer's factors [N, 4]."""
  return {name: float(np.mean(pred[:, k] == factors[:, k]))
          for k, name in enumerate(scenes.FACTORS)}


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
