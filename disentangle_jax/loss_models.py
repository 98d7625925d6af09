"""The frozen loss networks: CLIP ViT-B/32 (image and text towers) and VGG16 up to relu4_3.

With ``models.py``, the only library module that imports transformers. It builds the networks,
loads their weights from local files (it never downloads), builds tiny random versions for
tests, and returns pure apply functions; ``losses.py`` holds the loss math.

Weights:
  * CLIP: a Hugging Face CLIP directory (config.json plus flax_model.msgpack or
    model.safetensors). safetensors files are converted to Flax in numpy (torch is not needed,
    and the model is never initialised eagerly).
  * VGG16: torchvision's state dict (keys features.0.weight ... features.21.bias) as a
    .safetensors file; torchvision's own .pth (a pickle) only with ``allow_pickle=True``.

Shapes: B batch, S CLIP image size, E CLIP embedding width, N texts, L tokens. Images NHWC.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.core
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from flax import traverse_util
from transformers import modeling_flax_pytorch_utils
from transformers.models.clip import modeling_flax_clip

from disentangle_jax import convert, library_logs, losses

Params = Any

# torchvision vgg16().features up to relu4_3: conv widths and 3x3 convs per block; the block
# outputs relu1_2, relu2_2, relu3_3, relu4_3 are the perceptual-loss taps.
VGG16_WIDTHS = (64, 128, 256, 512)
VGG16_BLOCK_DEPTHS = (2, 2, 3, 3)
VGG_TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
_VGG_KERNEL = 3  # 3x3 convolutions, stride 1, padding 1
_VGG_POOL = 2  # 2x2 max pooling, stride 2, between blocks

# Tiny random VGG (tests, demos): same layers and taps, few channels, small input.
TINY_VGG_WIDTHS = (4, 8, 16, 32)
TINY_VGG_INPUT_SIZE = 32

# Tiny random CLIP (tests, demos). Image size 28 = 64 * 7 / 16, so a 64 x 64 test image goes
# through the reference code's exact nearest x7 / average-pool 16 preprocessing.
TINY_CLIP_IMAGE_SIZE = 28
TINY_CLIP_PATCH_SIZE = 7
TINY_CLIP_HIDDEN = 32
TINY_CLIP_INTERMEDIATE = 64
TINY_CLIP_LAYERS = 2
TINY_CLIP_HEADS = 4
TINY_CLIP_PROJECTION = 16
TINY_CLIP_MAX_TOKENS = 77  # CLIP's context length, so SD tokenizers fit unchanged

# File names of a Hugging Face model directory.
_HF_CONFIG = "config.json"
_HF_FLAX_WEIGHTS = "flax_model.msgpack"
_HF_SAFE_WEIGHTS = "model.safetensors"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")

# Independent numpy random streams of the two tiny networks (same tiny_seed).
_TINY_CLIP_STREAM = 0
_TINY_VGG_STREAM = 1

# Loaded weights are cast to this dtype (checkpoints may be float16).
_PARAM_DTYPE = np.float32

# At most this many key names are listed in an error message.
_MAX_KEYS_SHOWN = 5

ClipTextApplyFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossModelConfig:
  """Where the loss networks come from (None = the tiny random version)."""

  clip_path: str | None = None  # Hugging Face CLIP directory; None = tiny random CLIP
  vgg_path: str | None = None  # torchvision VGG16 .safetensors (.pth with allow_pickle)
  allow_pickle: bool = False  # permit loading a pickled .pth VGG checkpoint (runs code!)
  tiny_seed: int = 0  # seed of the tiny random networks
  vgg_input_size: int | None = None  # VGG resize; None: 224 (real) / 32 (tiny)
  tiny_vgg_widths: tuple[int, ...] = TINY_VGG_WIDTHS  # channels of the tiny VGG's 4 blocks

  def __post_init__(self):
    if len(self.tiny_vgg_widths) != len(VGG16_WIDTHS) or min(self.tiny_vgg_widths) < 1:
      raise ValueError(
          f"loss_models.tiny_vgg_widths={self.tiny_vgg_widths} must be "
          f"{len(VGG16_WIDTHS)} positive channel counts, e.g. {TINY_VGG_WIDTHS}.")
    min_size = _VGG_POOL**(len(VGG16_WIDTHS) - 1)
    if self.vgg_input_size is not None and self.vgg_input_size < min_size:
      raise ValueError(
          f"loss_models.vgg_input_size={self.vgg_input_size} is too small: VGG pools "
          f"{len(VGG16_WIDTHS) - 1} times, so use at least {min_size} (224 for real VGG16).")


class LossModels(NamedTuple):
  """The loss networks as pure functions plus their parameters.

  Attributes:
    clip_image_apply: (params["clip"], pixels [B, S, S, 3] preprocessed) -> [B, E].
    clip_text_apply: (params["clip"], input_ids [N, L], attention_mask [N, L]) -> [N, E].
    vgg_apply: (params["vgg"], x [B, R, R, 3] normalised) -> 4 activations [B, h, w, c].
    params: {"clip": ..., "vgg": ...}; pass them to jitted code as arguments.
    clip_image_size: S, the CLIP vision tower's input size.
    clip_max_tokens: L, the CLIP text tower's context length.
    vgg_input_size: R, the side of the resize before VGG.
    tokenizer: a Hugging Face-style tokenizer whose ids the CLIP text tower accepts.
  """

  clip_image_apply: losses.ClipApplyFn
  clip_text_apply: ClipTextApplyFn
  vgg_apply: losses.VggApplyFn
  params: dict
  clip_image_size: int
  clip_max_tokens: int
  vgg_input_size: int
  tokenizer: Any


# ------------------------------------------------------------------------------------------
# VGG16


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
  rng = np.random.default_rng([seed, _TINY_VGG_STREAM])
  params = {}
  for index, in_ch, out_ch in vgg_conv_layout(widths):
    shape = (_VGG_KERNEL, _VGG_KERNEL, in_ch, out_ch)
    std = np.sqrt(2.0 / (_VGG_KERNEL * _VGG_KERNEL * in_ch))
    params[f"features_{index}"] = {
        "kernel": jnp.asarray(rng.normal(0.0, std, shape).astype(_PARAM_DTYPE)),
        "bias": jnp.zeros((out_ch,), _PARAM_DTYPE),
    }
  return params


def _show(keys) -> str:
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
        f"{source} lacks VGG16 weights {_show(missing)}: expected torchvision's vgg16() "
        "state dict (keys features.0.weight ... features.21.bias).")
  for name, shape in expected.items():
    got = tuple(np.shape(state[name]))
    if got != shape:
      raise ValueError(
          f"{source}: {name} has shape {got}, expected {shape} (VGG16 widths "
          f"{tuple(widths)}); is this torchvision's vgg16 (not vgg16_bn / vgg19)?")
  params = {}
  for index, _, _ in layout:
    weight = np.asarray(state[f"features.{index}.weight"], _PARAM_DTYPE)
    bias = np.asarray(state[f"features.{index}.bias"], _PARAM_DTYPE)
    params[f"features_{index}"] = {
        "kernel": jnp.asarray(weight.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        "bias": jnp.asarray(bias),
    }
  return params


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
                    widths: Sequence[int] = VGG16_WIDTHS) -> Params:
  """Loads torchvision VGG16 weights from a local .safetensors (or, opted in, .pth) file."""
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
  return vgg_params_from_state_dict(state, widths, source=path)


# ------------------------------------------------------------------------------------------
# CLIP


def tiny_clip_config(tokenizer) -> transformers.CLIPConfig:
  """A tiny CLIPConfig whose text vocabulary and special ids match ``tokenizer``."""
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
  common = dict(hidden_size=TINY_CLIP_HIDDEN, intermediate_size=TINY_CLIP_INTERMEDIATE,
                num_hidden_layers=TINY_CLIP_LAYERS, num_attention_heads=TINY_CLIP_HEADS)
  text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=TINY_CLIP_MAX_TOKENS,
              eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)
  vision = dict(common, image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH_SIZE)
  return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=TINY_CLIP_PROJECTION)


@library_logs.quietly
def _clip_shapes(config: transformers.CLIPConfig) -> tuple[nn.Module, dict]:
  """The Flax CLIP module and its flat {key tuple: ShapeDtypeStruct} (nothing is computed)."""
  module = modeling_flax_clip.FlaxCLIPModule(config)
  size = config.vision_config.image_size
  tokens = (1, config.text_config.max_position_embeddings)
  shapes = jax.eval_shape(
      module.init, jax.random.PRNGKey(0), jnp.zeros(tokens, jnp.int32),
      jnp.zeros((1, size, size, 3), jnp.float32), jnp.ones(tokens, jnp.int32),
      jnp.zeros(tokens, jnp.int32))["params"]
  return module, traverse_util.flatten_dict(flax.core.unfreeze(shapes))


def init_tiny_clip(tokenizer, seed: int) -> tuple[nn.Module, transformers.CLIPConfig, Params]:
  """A tiny random Flax CLIP, deterministic in seed, built in numpy: (module, config, params).

  Kernels and embeddings ~ N(0, 0.02^2) (CLIP's initializer_range), LayerNorm scale 1 and
  biases 0, logit_scale at the config's initial value.
  """
  config = tiny_clip_config(tokenizer)
  module, shapes = _clip_shapes(config)
  rng = np.random.default_rng([seed, _TINY_CLIP_STREAM])
  flat = {}
  for key, spec in shapes.items():
    if key[-1] == "scale":
      value = np.ones(spec.shape)
    elif key[-1] == "bias":
      value = np.zeros(spec.shape)
    elif key[-1] == "logit_scale":
      value = np.full(spec.shape, config.logit_scale_init_value)
    else:
      value = rng.normal(0.0, config.text_config.initializer_range, spec.shape)
    flat[key] = value
  return module, config, _check_and_unflatten(flat, shapes, "the tiny CLIP")


def _check_and_unflatten(flat: dict, shapes: dict, source: str) -> Params:
  missing = set(shapes) - set(flat)
  if missing:
    raise ValueError(
        f"{source} lacks CLIP weights {_show('.'.join(k) for k in missing)}: is it a full "
        "CLIPModel checkpoint (vision and text towers) matching config.json?")
  out = {}
  for key, spec in shapes.items():
    value = np.asarray(flat[key])
    if value.shape != tuple(spec.shape):
      raise ValueError(
          f"{source}: CLIP weight {'.'.join(key)} has shape {value.shape}, expected "
          f"{tuple(spec.shape)} from config.json.")
    out[key] = jnp.asarray(value.astype(_PARAM_DTYPE))
  return traverse_util.unflatten_dict(out)


def _clip_flat_from_safetensors(path: str, shapes: dict) -> dict:
  """A CLIP model.safetensors -> flat Flax names, in numpy.

  PyTorch-saved files (metadata format "pt", or none) are renamed and transposed with
  transformers' own rules; Flax-saved files (format "flax") already carry Flax names.
  """
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      saved_by = (f.metadata() or {}).get("format", "pt")
    state = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  if saved_by == "flax":
    return {tuple(name.split(".")): value for name, value in state.items()}
  flat = {}
  for name, value in state.items():
    key, value = modeling_flax_pytorch_utils.rename_key_and_reshape_tensor(
        tuple(name.split(".")), value, shapes, "")
    if key in shapes:  # buffers such as position_ids are not parameters
      flat[key] = value
  return flat


def _clip_flat_from_msgpack(path: str) -> dict:
  with open(path, "rb") as f:
    try:
      state = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input.
      raise ValueError(f"{path} is not a readable Flax msgpack file: {e}") from e
  return traverse_util.flatten_dict(state)


def load_clip(path: str) -> tuple[nn.Module, transformers.CLIPConfig, Params]:
  """Loads a Hugging Face CLIP directory: (module, config, params). Never downloads."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"CLIP directory {path} does not exist: give a local Hugging Face CLIP directory "
        f"(e.g. a download of openai/clip-vit-base-patch32) with {_HF_CONFIG} and "
        f"{_HF_SAFE_WEIGHTS} or {_HF_FLAX_WEIGHTS}.")
  config_file = os.path.join(path, _HF_CONFIG)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"CLIP directory {path} has no {_HF_CONFIG}.")
  config = transformers.CLIPConfig.from_pretrained(path, local_files_only=True)
  module, shapes = _clip_shapes(config)
  flax_file = os.path.join(path, _HF_FLAX_WEIGHTS)
  safe_file = os.path.join(path, _HF_SAFE_WEIGHTS)
  if os.path.isfile(flax_file):
    flat, source = _clip_flat_from_msgpack(flax_file), flax_file
  elif os.path.isfile(safe_file):
    flat, source = _clip_flat_from_safetensors(safe_file, shapes), safe_file
  else:
    raise FileNotFoundError(
        f"CLIP directory {path} has neither {_HF_SAFE_WEIGHTS} nor {_HF_FLAX_WEIGHTS} "
        "(pickled pytorch_model.bin is not read: convert it with save_pretrained("
        "safe_serialization=True)).")
  return module, config, _check_and_unflatten(flat, shapes, source)


def _image_features(module, pixel_values):
  pooled = module.vision_model(pixel_values=pixel_values, deterministic=True)[1]
  return module.visual_projection(pooled)


def _text_features(module, input_ids, attention_mask):
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  pooled = module.text_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions, deterministic=True)[1]
  return module.text_projection(pooled)


def make_clip_image_fn(module: nn.Module) -> losses.ClipApplyFn:
  """(params, pixels [B, S, S, 3] NHWC, preprocessed) -> projected features [B, E]."""

  def apply(params, pixels):
    return module.apply({"params": params}, pixels, method=_image_features)

  return apply


def make_clip_text_fn(module: nn.Module) -> ClipTextApplyFn:
  """(params, input_ids [N, L], attention_mask [N, L]) -> projected features [N, E]."""

  def apply(params, input_ids, attention_mask):
    return module.apply({"params": params}, input_ids.astype(jnp.int32),
                        attention_mask.astype(jnp.int32), method=_text_features)

  return apply


def _load_tokenizer(path: str):
  try:
    return transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(
        f"CLIP directory {path} has no readable tokenizer (vocab.json, merges.txt): pass "
        "tokenizer=... to load_loss_models (Stable Diffusion's tokenizer is CLIP's).") from e


# ------------------------------------------------------------------------------------------
# Both


@library_logs.quietly
def load_loss_models(cfg: LossModelConfig = LossModelConfig(), tokenizer=None) -> LossModels:
  """Builds CLIP and VGG16 from cfg (local files, or tiny random networks when paths are None).

  Args:
    cfg: where the weights come from.
    tokenizer: a Hugging Face-style tokenizer (callable, len(), eos_token_id). Required for
      the tiny CLIP (its vocabulary is sized to it); for a real CLIP directory it defaults to
      the tokenizer stored there.
  """
  if cfg.clip_path is not None:
    clip_module, clip_config, clip_params = load_clip(cfg.clip_path)
    if tokenizer is None:
      tokenizer = _load_tokenizer(cfg.clip_path)
  else:
    if tokenizer is None:
      raise ValueError(
          "the tiny random CLIP (loss_models.clip_path=None) needs a tokenizer to size its "
          "vocabulary: pass tokenizer=... (e.g. the Stable Diffusion tokenizer).")
    clip_module, clip_config, clip_params = init_tiny_clip(tokenizer, cfg.tiny_seed)
  vocab = clip_config.text_config.vocab_size
  if len(tokenizer) > vocab:
    raise ValueError(
        f"the tokenizer has {len(tokenizer)} tokens but the CLIP text tower only {vocab}: "
        "use the tokenizer that belongs to this CLIP.")

  if cfg.vgg_path is not None:
    widths = VGG16_WIDTHS
    vgg_params = load_vgg_params(cfg.vgg_path, allow_pickle=cfg.allow_pickle, widths=widths)
    vgg_size = cfg.vgg_input_size or losses.VGG_INPUT_SIZE
  else:
    widths = tuple(cfg.tiny_vgg_widths)
    vgg_size = cfg.vgg_input_size or TINY_VGG_INPUT_SIZE
    vgg_params = init_tiny_vgg(cfg.tiny_seed, widths)

  return LossModels(
      clip_image_apply=make_clip_image_fn(clip_module),
      clip_text_apply=make_clip_text_fn(clip_module),
      vgg_apply=make_vgg_fn(VGG16Features(widths)),
      params={"clip": clip_params, "vgg": vgg_params},
      clip_image_size=clip_config.vision_config.image_size,
      clip_max_tokens=clip_config.text_config.max_position_embeddings,
      vgg_input_size=vgg_size,
      tokenizer=tokenizer,
  )


def encode_texts(lm: LossModels, texts: Sequence[str]) -> jax.Array:
  """Projected CLIP text features [N, E] of N prompts (computed once; no gradient needed)."""
  if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
    raise ValueError(f"texts must be a non-empty list of strings; got {texts!r}.")
  tokens = lm.tokenizer(list(texts), padding="max_length", max_length=lm.clip_max_tokens,
                        truncation=True, return_tensors="np")
  ids = np.asarray(tokens["input_ids"])
  mask = np.asarray(tokens.get("attention_mask", np.ones_like(ids)))
  return jax.jit(lm.clip_text_apply)(lm.params["clip"], ids, mask)
