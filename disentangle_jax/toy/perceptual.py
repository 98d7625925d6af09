"""The toy world's perceptual network: a VGG16-shaped classifier trained on the world's renders.

The content loss L_perc reads VGG16's relu1_2 / relu2_2 / relu3_3 / relu4_3 features; a VGG
trained on ImageNet knows natural images, a random one knows nothing. This network has VGG16's
layers (``loss_models.vgg.VGG16Features``, 10 convolutions in 4 blocks, narrower) and is
trained for its own task, as VGG16 was for ImageNet's: classify a render into one of the 120
scene classes (shape x colour x position x attribute) from the global mean of relu4_3. It uses
its own render stream and seed, independent of the judge, and is saved as torchvision's
``vgg16().state_dict()`` keys (features.<i>.weight OIHW, .bias; classifier.* is ignored by the
loader) in a .safetensors file that ``loss_models.vgg_path`` reads like real VGG16 weights.

Shapes: B batch, S image size. Images NHWC float in [0, 1].
"""
from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from disentangle_jax import losses
from disentangle_jax.loss_models import vgg
from disentangle_jax.toy import scenes

FILE = "vgg.safetensors"
NUM_CLASSES = len(scenes.all_factors())  # the scene classes
DATA_STREAM = 3  # the render stream of its training scenes (the other stages use stream 0)
SEED_OFFSET = 101  # its seed is the run's seed + this (its own initialisation and batches)


@dataclasses.dataclass(frozen=True)
class PerceptualConfig:
  widths: tuple[int, ...] = (16, 32, 64, 64)  # channels of VGG16's 4 blocks (VGG16: 64..512)
  input_size: int = scenes.IMAGE_SIZE  # the resize before the network (loss_models.vgg_input_size)


class Classifier(nn.Module):
  """images [B, S, S, 3] in [0, 1] -> scene-class logits [B, NUM_CLASSES]."""

  config: PerceptualConfig

  @nn.compact
  def __call__(self, images):
    features = vgg.VGG16Features(self.config.widths, name="features")
    top = features(losses.vgg_input(images, self.config.input_size))[-1]  # relu4_3
    return nn.Dense(NUM_CLASSES, name="classifier")(jnp.mean(top, axis=(1, 2)))


def init(config: PerceptualConfig, seed: int):
  x = jnp.zeros((1, config.input_size, config.input_size, 3))
  return Classifier(config).init(jax.random.key(seed), x)["params"]


def loss(config: PerceptualConfig, params, images, labels):
  """Cross-entropy of the scene class; images [B, S, S, 3] in [0, 1], labels [B] int
  (scenes.scene_index of the factors)."""
  logits = Classifier(config).apply({"params": params}, images)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def predict(config: PerceptualConfig, params, images) -> jax.Array:
  """Scene-class index [B] of images [B, S, S, 3] in [0, 1]."""
  return jnp.argmax(Classifier(config).apply({"params": params}, images), axis=-1)


def state_dict(params) -> dict[str, np.ndarray]:
  """torchvision-layout arrays: features.<i>.weight (OIHW) / .bias, classifier.weight / .bias."""
  out = {}
  for name, leaf in jax.device_get(params["features"]).items():
    index = name.split("_")[1]
    out[f"features.{index}.weight"] = np.ascontiguousarray(
        np.asarray(leaf["kernel"], np.float32).transpose(3, 2, 0, 1))  # HWIO -> OIHW
    out[f"features.{index}.bias"] = np.asarray(leaf["bias"], np.float32)
  head = jax.device_get(params["classifier"])
  out["classifier.weight"] = np.ascontiguousarray(np.asarray(head["kernel"], np.float32).T)
  out["classifier.bias"] = np.asarray(head["bias"], np.float32)
  return out


def save(directory, params) -> None:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(state_dict(params), str(directory / FILE))


def load_head(path) -> dict:
  """The classifier head {"kernel" [C, NUM_CLASSES], "bias"} saved beside the features (the VGG
  loader reads only the features; the world's evaluation also checks the network's own task)."""
  state = safetensors.numpy.load_file(str(path))
  return {"kernel": jnp.asarray(state["classifier.weight"].T),
          "bias": jnp.asarray(state["classifier.bias"])}
