"""VGG16 up to relu4_3 (the perceptual loss network): the module, torchvision weights, a tiny one.

Weights: torchvision's state dict (keys features.0.weight ... features.21.bias) as a
.safetensors file; torchvision's own .pth (a pickle) only with ``allow_pickle=True``.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import safetensors
import safetensors.numpy

from disentangle_jax import convert, losses, noise
from disentangle_jax.loss_models.config import (_VGG_KERNEL, _VGG_POOL, TINY_VGG_WIDTHS,
                                                VGG16_BLOCK_DEPTHS, VGG16_WIDTHS, Params)

_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Independent numpy random stream of the tiny VGG (the tiny CLIP uses stream 0).
_TINY_VGG_STREAM = 1
# Loaded weights are cast to this dtype (checkpoints may be float16).
PARAM_DTYPE = np.float32
# At most this many key names are listed in an error message.
_MAX_KEYS_SHOWN = 5


def vgg_conv_layout(widths: Sequence[int] = VGG16_WIDTHS) -> list[tuple[int, int, int]]:
  """(torchvision features index, in channels, out channels) of every conv up to relu4_3.

  Indices follow torchvision's vgg16().features: conv 0, relu 1, conv 2, relu 3 (relu1_2),
  pool 4, conv 5, ... conv 21, relu 22 (relu4_3).
  """
  layout, index, in_ch = [], 0, 3
  for block, (width, depth) in enumerate(zip(widths, VGG16_BLOCK_DEPTHS)):
    if block > 0:
      index += 1  # max pool
    for _ in range(depth):
      layout.append((index, in_ch, width))
      in_ch = width
      index += 2  # conv + relu
  return layout


class VGG16Features(nn.Module):
  """torchvision's vgg16().features[:23] in NHWC: returns the relu1_2, relu2_2, relu3_3 and
  relu4_3 activations of x [B, H, W, 3] (already ImageNet-normalised).

  Conv parameters are named features_<torchvision index> (features_0 ... features_21).
  """

  widths: tuple[int, ...] = VGG16_WIDTHS

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    layout = iter(vgg_conv_layout(self.widths))
    taps = []
    for block, depth in enumerate(VGG16_BLOCK_DEPTHS):
      if block > 0:
        x = nn.max_pool(x, (_VGG_POOL, _VGG_POOL), strides=(_VGG_POOL, _VGG_POOL))
      for _ in range(depth):
        index, _, width = next(layout)
        x = nn.Conv(width, (_VGG_KERNEL, _VGG_KERNEL), padding=((1, 1), (1, 1)),
                    name=f"features_{index}")(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


def make_vgg_fn(module: VGG16Features) -> losses.VggApplyFn:
  """A pure apply function (params, x [B, H, W, 3]) -> 4 activations."""

  def apply(params, x):
    return module.apply({"params": params}, x)

  return apply


def init_tiny_vgg(seed: int, widths: Sequence[int] = TINY_VGG_WIDTHS) -> Params:
  """Random VGG16Features(widths) parameters, deterministic in seed, built in numpy.

  Kernels are He-normal (std sqrt(2 / fan_in), which keeps ReLU activations O(1)), biases 0.
  """
  layout = vgg_conv_layout(widths)
  kernels = noise.normal_arrays(
      [seed, _TINY_VGG_STREAM],
      [(np.sqrt(2.0 / (_VGG_KERNEL * _VGG_KERNEL * in_ch)),
        (_VGG_KERNEL, _VGG_KERNEL, in_ch, out_ch)) for _, in_ch, out_ch in layout])
  return {f"features_{index}": {"kernel": kernel.astype(PARAM_DTYPE),
                                "bias": np.zeros((out_ch,), PARAM_DTYPE)}
          for (index, _, out_ch), kernel in zip(layout, kernels)}


def show_keys(keys) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
  return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more


def vgg_params_from_state_dict(state: Mapping[str, np.ndarray],
                               widths: Sequence[int] = VGG16_WIDTHS,
                               source: str = "the state dict") -> Params:
  """Converts torchvision VGG16 weights (features.<i>.weight OIHW, .bias) to VGG16Features
  params (features_<i>: kernel HWIO, bias). Keys outside features[:23] (later layers, the
  classifier) are ignored. Raises ValueError naming ``source`` for missing keys or bad shapes.
  """
  if not any(k.startswith("features.") for k in state) and "0.weight" in state:
    state = {f"features.{k}": v for k, v in state.items()}  # a saved vgg16().features
  layout = vgg_conv_layout(widths)
  expected = {}
  for index, in_ch, out_ch in layout:
    expected[f"features.{index}.weight"] = (out_ch, in_ch, _VGG_KERNEL, _VGG_KERNEL)
    expected[f"features.{index}.bias"] = (out_ch,)
  missing = set(expected) - set(state)
  if missing:
    raise ValueError(
        f"{source} lacks VGG16 weights {show_keys(missing)}: expected torchvision's vgg16() "
        "state dict (keys features.0.weight ... features.21.bias).")
  for name, shape in expected.items():
    got = tuple(np.shape(state[name]))
    if got != shape:
      raise ValueError(
          f"{source}: {name} has shape {got}, expected {shape} (VGG16 widths "
          f"{tuple(widths)}); is this torchvision's vgg16 (not vgg16_bn / vgg19)?")
  params = {}
  for index, _, _ in layout:
    weight = np.asarray(state[f"features.{index}.weight"], PARAM_DTYPE)
    bias = np.asarray(state[f"features.{index}.bias"], PARAM_DTYPE)
    params[f"features_{index}"] = {
        "kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        "bias": bias,
    }
  return params


def _block_last_convs() -> list[int]:
  """torchvision feature indices of each block's last conv (0-based: 2, 7, 14, 21)."""
  ends = np.cumsum(VGG16_BLOCK_DEPTHS) - 1
  layout = vgg_conv_layout()
  return [layout[e][0] for e in ends]


def state_dict_widths(state: Mapping[str, np.ndarray]) -> tuple[int, ...]:
  """The 4 block widths of a torchvision-layout VGG16 state dict (the out channels of each
  block's last conv); VGG16_WIDTHS when those keys are missing (the shape check names them).
  Narrower VGG16-shaped networks (the toy world's) load through the same reader."""
  if not any(k.startswith("features.") for k in state) and "0.weight" in state:
    state = {f"features.{k}": v for k, v in state.items()}
  keys = [f"features.{i}.weight" for i in _block_last_convs()]
  if not all(k in state and np.ndim(state[k]) == 4 for k in keys):
    return VGG16_WIDTHS
  return tuple(int(np.shape(state[k])[0]) for k in keys)


def params_widths(params: Params) -> tuple[int, ...]:
  """The 4 block widths of VGG16Features parameters (inverse of ``vgg_conv_layout``)."""
  return tuple(int(params[f"features_{i}"]["bias"].shape[0]) for i in _block_last_convs())


def _read_pickle_state_dict(path: str) -> dict[str, np.ndarray]:
  torch = convert.import_torch(f"reading the pickled VGG16 checkpoint {path}",
                               "or convert it once to .safetensors and drop allow_pickle.")
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(
        f"{path} holds a {type(state).__name__}, not a state dict: save "
        "torchvision.models.vgg16(...).state_dict().")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def load_vgg_params(path: str, *, allow_pickle: bool = False,
                    widths: Sequence[int] | None = None) -> Params:
  """Loads torchvision VGG16 weights from a local .safetensors (or, opted in, .pth) file.

  widths: the expected block widths; None reads them from the file (``state_dict_widths``:
  VGG16's own, or a narrower VGG16-shaped network such as the toy world's).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"VGG16 weights file {path} does not exist: give a local .safetensors file with "
        "torchvision's vgg16 state dict (keys features.0.weight, ...).")
  if path.endswith(".safetensors"):
    try:
      state = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  elif path.endswith(_PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ValueError(
          f"{path} is a pickle, which can run arbitrary code when loaded. Convert it once to "
          ".safetensors (safetensors.torch.save_file(torch.load(path))) or pass "
          "allow_pickle=True if you trust the file.")
    state = _read_pickle_state_dict(path)
  else:
    raise ValueError(
        f"{path}: unknown VGG16 weights format; use .safetensors (or .pth with allow_pickle).")
  return vgg_params_from_state_dict(state, widths or state_dict_widths(state), source=path)
