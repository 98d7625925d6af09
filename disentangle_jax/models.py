"""Stable Diffusion v1.x for this library: loading, a tiny random stand-in, and pure wrappers.

The only module that imports diffusers and transformers. It returns the Flax modules (static
objects) and their weights as one params pytree, and wraps the modules as functions that take
the weights as an argument, so jitted code never captures weights:

  eps_fn(params["unet"], x [N,H,W,C], t [], emb [N,L,D]) -> eps [N,H,W,C]
  decode(params["vae"], latents [B,H,W,C]) -> images [B,8H,8W,3] in [0, 1]
  encode(params["vae"], images [B,h,w,3] in [0, 1], key=None) -> latents [B,h/8,w/8,C]
  text_fn(params["text_encoder"], ids [N,L] int32) -> embeddings [N,L,D]

Weights come from a local folder in diffusers layout (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/); each component is read, in this order of preference,
from Flax msgpack, safetensors (converted in numpy by ``convert``, no torch), or, only with
``allow_pickle=True``, a PyTorch pickle ``.bin``. ``path`` may also be one file in the
CompVis/LDM single-file layout (``.safetensors``; ``.ckpt`` with ``allow_pickle``), mapped by
``single_file``, with its tokenizer from ``tokenizer_path``. Nothing is ever downloaded.
``path=None`` builds a tiny random model with the same structure (tests, smoke runs).

Shapes: B batch, N UNet batch (2B under CFG), H W C latent (NHWC), L tokens, D text width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import tempfile
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import diffusers
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import transformers
from transformers.models.clip import tokenization_clip

from disentangle_jax import attention as attention_lib
from disentangle_jax import convert, library_logs
from disentangle_jax import fast_conv
from disentangle_jax import remat as remat_lib
from disentangle_jax import schedule as schedule_lib
from disentangle_jax import noise, single_file

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
ATTENTIONS = ("standard", "chunked", "dot_product")
CONVS = ("fast", "xla")

# Weight files of each component, in order of preference: (kind, file name).
_DIFFUSERS_WEIGHTS = (
    ("msgpack", "diffusion_flax_model.msgpack"),
    ("safetensors", "diffusion_pytorch_model.safetensors"),
    ("safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    ("pickle", "diffusion_pytorch_model.bin"),
    ("pickle", "diffusion_pytorch_model.fp16.bin"),
)
_TRANSFORMERS_WEIGHTS = (
    ("msgpack", "flax_model.msgpack"),
    ("safetensors", "model.safetensors"),
    ("safetensors", "model.fp16.safetensors"),
    ("pickle", "pytorch_model.bin"),
    ("pickle", "pytorch_model.fp16.bin"),
)
# Files that look like weights in a format this loader does not read.
_OTHER_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".onnx", ".pb", ".h5", ".gguf", ".msgpack",
                          ".safetensors", ".bin", ".index.json")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")

# SD v1 constants used when a config does not name them.
_SD_SCALING_FACTOR = 0.18215
_SD_MAX_LENGTH = 77
# The Flax UNet of diffusers hard-codes GroupNorm(32).
_FLAX_UNET_GROUPS = 32

# Tiny model: words that get whole-word BPE merges in the tiny tokenizer.
_TINY_WORDS = ("a", "photo", "of", "person", "face", "smiling", "church", "the", "style", "lake")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which Stable Diffusion to load and how to run it."""

  path: str | None = None  # SD v1.x folder (diffusers) or one .safetensors/.ckpt file; None = tiny
  allow_pickle: bool = False  # opt-in to read PyTorch .bin (pickle) weights (needs torch)
  dtype: str = "float32"  # networks' weights/activations: float32 | bfloat16 (mixed) | float64
  attention: str = "standard"  # "standard" | "chunked" (memory-efficient) | "dot_product" (jax.nn)
  conv: str = "fast"  # "fast" (fast_conv: custom_vjp, fast backward in loops) | "xla" (plain)
  block_remat: str = "none"  # remat inside UNet / VAE: a key of remat.LEVELS
  tiny_seed: int = 0  # seed of the tiny random model's weights
  tiny_latent_size: int = 8  # default latent H = W of the tiny model (images 8x larger)
  tokenizer_path: str | None = None  # tokenizer folder (vocab.json, merges.txt) for a single file
  config_path: str | None = None  # single file: diffusers-layout config folder; None = SD v1's

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is unknown; use one of {tuple(DTYPES)}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(
          f"model.attention={self.attention!r} is unknown; use one of {ATTENTIONS}.")
    if self.conv not in CONVS:
      raise ValueError(f"model.conv={self.conv!r} is unknown; use one of {CONVS}.")
    if self.block_remat not in remat_lib.LEVELS:
      raise ValueError(f"model.block_remat={self.block_remat!r} is unknown; use one of "
                       f"{remat_lib.LEVELS}.")
    if self.tiny_latent_size < 1:
      raise ValueError(f"model.tiny_latent_size={self.tiny_latent_size} must be >= 1.")


class StableDiffusion(NamedTuple):
  """A loaded model: static modules, one params pytree, and the constants around them.

  Attributes:
    unet: diffusers ``FlaxUNet2DConditionModel`` (a linen module; NCHW interface).
    vae: diffusers ``FlaxAutoencoderKL``.
    text_encoder: transformers ``FlaxCLIPTextModel`` built with ``_do_init=False`` (holds no
      weights); ``text_encoder.module`` is the linen module, see ``make_text_fn``.
    tokenizer: transformers ``CLIPTokenizer``.
    params: {"unet": ..., "vae": ..., "text_encoder": ...} nested dicts of jax arrays.
    schedule: the training noise schedule.
    latent_channels: C (4).
    latent_size: default latent H = W (64 for SD v1 at 512 px).
    vae_scale_factor: image pixels per latent pixel (8).
    scaling_factor: latent scale of the VAE (0.18215).
    config: the ModelConfig it was built from (its run options reach the make_*_fn wrappers).
  """

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  params: dict
  schedule: schedule_lib.ScheduleConfig
  latent_channels: int
  latent_size: int
  vae_scale_factor: int
  scaling_factor: float
  config: ModelConfig = ModelConfig()


# ----------------------------------------------------------------------------------------------
# Pure wrappers.


@contextlib.contextmanager
def run_options(config: ModelConfig):
  """Applies ``config``'s conv / block_remat / attention options to diffusers' Flax modules.

  Flax method interceptors (fast_conv, remat, attention modules) active while the wrapped
  ``apply`` traces; parameter trees are untouched.
  """
  interceptors = [remat_lib.interceptor(config.block_remat),
                  attention_lib.intercept if config.attention == "dot_product" else None,
                  fast_conv.intercept if config.conv == "fast" else None]
  with contextlib.ExitStack() as stack:
    for interceptor in interceptors:
      if interceptor is not None:
        stack.enter_context(nn.intercept_methods(interceptor))
    yield


def make_eps_fn(unet, config: ModelConfig = ModelConfig()) -> Callable:
  """Wraps the UNet as eps_fn(params, x [N,H,W,C], t [] or [N] int, emb [N,L,D]) -> [N,H,W,C].

  Closes over the module and the static ``config`` (its conv / block_remat / attention run
  options) only. The output has the module's compute dtype.
  """
  @library_logs.quietly
  def eps_fn(params, x, t, emb):
    if x.ndim != 4 or emb.ndim != 3 or emb.shape[0] != x.shape[0]:
      raise ValueError(f"eps_fn needs x [N, H, W, C] and emb [N, L, D] with the same N; got x "
                       f"{tuple(x.shape)} and emb {tuple(emb.shape)}.")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    with run_options(config):
      out = unet.apply({"params": params}, jnp.transpose(x, (0, 3, 1, 2)), t, emb).sample
    return jnp.transpose(out, (0, 2, 3, 1))
  return eps_fn


def make_decode_fn(vae, scaling_factor: float, config: ModelConfig = ModelConfig()) -> Callable:
  """Wraps the VAE decoder as decode(params, latents [B,H,W,C]) -> images [B,8H,8W,3] in [0, 1].

  images = clip(VAE.decode(latents / scaling_factor) / 2 + 0.5, 0, 1), returned in float32 (or
  float64 for a float64 model) whatever the compute dtype: the losses stay in float32.
  """
  channels = vae.config.latent_channels

  @library_logs.quietly
  def decode(params, latents):
    if latents.ndim != 4 or latents.shape[-1] != channels:
      raise ValueError(f"decode needs latents [B, H, W, {channels}] (NHWC); got shape "
                       f"{tuple(latents.shape)}.")
    # FlaxAutoencoderKL.decode takes NHWC when the last axis has latent_channels entries.
    with run_options(config):
      x = vae.apply({"params": params}, latents / scaling_factor, method="decode").sample
    images = jnp.clip(jnp.transpose(x, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)
    return images.astype(jnp.promote_types(images.dtype, jnp.float32))
  return decode


def make_encode_fn(vae, scaling_factor: float, config: ModelConfig = ModelConfig()) -> Callable:
  """Wraps the VAE encoder as encode(params, images [B,h,w,3] in [0,1], key=None) -> latents.

  Returns [B, h/8, w/8, C] in float32 (float64 for a float64 model): the posterior mean (a
  posterior sample when ``key`` is given) times ``scaling_factor``. h and w must be multiples of
  the VAE scale factor (8).
  """
  factor = vae_scale_factor(vae.config)

  @library_logs.quietly
  def encode(params, images, key=None):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"encode needs images [B, h, w, 3] in [0, 1]; got shape "
                       f"{tuple(images.shape)}.")
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"encode needs image height and width divisible by {factor}; got "
                       f"{tuple(images.shape[1:3])}: resize or crop the image first.")
    x = jnp.transpose(images * 2 - 1, (0, 3, 1, 2))
    with run_options(config):
      dist = vae.apply({"params": params}, x, method="encode").latent_dist
    z = dist.mean
    if key is not None:
      z = z + dist.std * jax.random.normal(key, z.shape, z.dtype)
    z = z * scaling_factor
    return z.astype(jnp.promote_types(z.dtype, jnp.float32))
  return encode


def make_text_fn(text_encoder) -> Callable:
  """Wraps the CLIP text encoder as text_fn(params, ids [N,L] int32) -> last hidden state [N,L,D].

  No attention mask, as in Stable Diffusion's pipelines (CLIP's causal mask does the work).
  """
  module = text_encoder.module

  @library_logs.quietly
  def text_fn(params, ids):
    ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = module.apply({"params": params}, ids, jnp.ones_like(ids), positions)
    return out.last_hidden_state
  return text_fn


# Jitted text encoders, one per loaded text encoder object (so encode_prompts compiles once).
_JITTED_TEXT_FNS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def _jitted_text_fn(text_encoder) -> Callable:
  fn = _JITTED_TEXT_FNS.get(text_encoder)
  if fn is None:
    fn = _JITTED_TEXT_FNS[text_encoder] = jax.jit(make_text_fn(text_encoder))
  return fn


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
  """Token ids [N, L] int32, padded to ``tokenizer.model_max_length``; warns on truncation.

  A prompt longer than L - 2 tokens keeps its first L - 2 (plus start and end tokens), as
  Stable Diffusion's pipelines do, with a logged warning naming the prompt and the drop.
  """
  if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f"prompts must be a list of strings; got {prompts!r} (wrap a single "
                     "prompt in a list).")
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt ('' is the unconditional one).")
  max_length = tokenizer.model_max_length
  for p in prompts:
    dropped = len(tokenizer.tokenize(p)) - (max_length - 2)
    if dropped > 0:
      logger.warning("Prompt %r is longer than the text encoder's %d tokens: its last %d "
                     "token(s) are dropped. Shorten the prompt.", p, max_length, dropped)
  ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np").input_ids
  return ids.astype(np.int32)


def encode_prompts(model: StableDiffusion, prompts: Sequence[str]) -> jax.Array:
  """Text embeddings [N, L, D] of ``prompts`` (L = 77 for SD); "" gives the CFG unconditional."""
  ids = tokenize(model.tokenizer, prompts)
  return _jitted_text_fn(model.text_encoder)(model.params["text_encoder"], ids)


# ----------------------------------------------------------------------------------------------
# Building modules from configs.


def _compute_dtype(config: ModelConfig):
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                     "jax.config.update('jax_enable_x64', True) in the entry point).")
  return DTYPES[config.dtype]


def vae_scale_factor(vae_config) -> int:
  """Image pixels per latent pixel: 2 ** (number of VAE blocks - 1) (8 for SD)."""
  channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else (
      vae_config.block_out_channels)
  return 2 ** (len(channels) - 1)


def _build_unet(cfg: dict, config: ModelConfig, source: str):
  groups = cfg.get("norm_num_groups", _FLAX_UNET_GROUPS)
  if groups != _FLAX_UNET_GROUPS:
    raise ValueError(f"{source}: norm_num_groups={groups}, but diffusers' Flax UNet only "
                     f"supports {_FLAX_UNET_GROUPS} (Stable Diffusion v1.x uses 32).")
  return diffusers.FlaxUNet2DConditionModel.from_config(
      _drop_private(cfg), dtype=_compute_dtype(config),
      use_memory_efficient_attention=config.attention == "chunked")  # "dot_product": run_options


def _build_vae(cfg: dict, config: ModelConfig):
  return diffusers.FlaxAutoencoderKL.from_config(_drop_private(cfg), dtype=_compute_dtype(config))


def _build_text_encoder(cfg: dict, config: ModelConfig):
  if cfg.get("model_type") == "clip" and "text_config" in cfg:  # a full CLIPConfig
    cfg = cfg["text_config"]
  text_config = transformers.CLIPTextConfig.from_dict(cfg)
  return transformers.FlaxCLIPTextModel(
      text_config, input_shape=(1, 1), dtype=_compute_dtype(config), _do_init=False)


def _drop_private(cfg: dict) -> dict:
  return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _shape_trees(unet, vae, text_encoder) -> dict:
  key = jax.random.PRNGKey(0)
  return {
      "unet": jax.eval_shape(unet.init_weights, key),
      "vae": jax.eval_shape(vae.init_weights, key),
      "text_encoder": text_encoder.params_shape_tree,
  }


def _to_device(params, dtype) -> dict:
  return jax.tree.map(jnp.asarray, convert.cast_floating(params, dtype))


# ----------------------------------------------------------------------------------------------
# The tiny random model.


def tiny_unet_config(latent_size: int = 8) -> dict:
  """diffusers config of the tiny UNet (valid for the Flax and the PyTorch class)."""
  return {
      "sample_size": latent_size,
      "in_channels": 4,
      "out_channels": 4,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "block_out_channels": [32, 64],
      "layers_per_block": 1,
      "attention_head_dim": 8,  # the number of heads, as in SD v1's config
      "cross_attention_dim": 32,
      "norm_num_groups": _FLAX_UNET_GROUPS,
      "flip_sin_to_cos": True,
      "freq_shift": 0,
  }


def tiny_vae_config(image_size: int = 64) -> dict:
  """diffusers config of the tiny VAE: 4 blocks, so the scale factor is 8 as in SD."""
  return {
      "sample_size": image_size,
      "in_channels": 3,
      "out_channels": 3,
      "down_block_types": ["DownEncoderBlock2D"] * 4,
      "up_block_types": ["UpDecoderBlock2D"] * 4,
      "block_out_channels": [8, 8, 16, 16],
      "layers_per_block": 1,
      "latent_channels": 4,
      "norm_num_groups": 4,
      "act_fn": "silu",
      "scaling_factor": _SD_SCALING_FACTOR,
  }


def tiny_text_config(tokenizer) -> dict:
  """transformers CLIPTextConfig dict of the tiny text encoder, sized to ``tokenizer``."""
  return {
      "vocab_size": len(tokenizer),
      "hidden_size": 32,
      "intermediate_size": 37,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "max_position_embeddings": _SD_MAX_LENGTH,
      "hidden_act": "quick_gelu",
      "layer_norm_eps": 1e-5,
      "projection_dim": 32,
      "bos_token_id": tokenizer.bos_token_id,
      "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
  }


def _tiny_merges() -> list[tuple[str, str]]:
  """Left-to-right merges that make each of _TINY_WORDS a single token."""
  merges = []
  for word in _TINY_WORDS:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pair = (symbols[0], symbols[1])
      if pair not in merges:
        merges.append(pair)
      symbols = ["".join(pair)] + symbols[2:]
  return merges


def write_tiny_tokenizer(directory, merges: Sequence[tuple[str, str]] | None = None,
                         max_length: int = _SD_MAX_LENGTH) -> None:
  """Writes the tiny byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

  The vocabulary has CLIP's layout: the 256 byte symbols, the same with "</w>", one token per
  merge, then <|startoftext|> and <|endoftext|>. ``CLIPTokenizer.from_pretrained(directory)``
  loads it offline. ``merges`` replaces the tiny words' merges (the toy world's vocabulary);
  ``max_length`` is the context length written to tokenizer_config.json.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  symbols = list(tokenization_clip.bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = _tiny_merges() if merges is None else list(merges)
  vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
  (directory / "vocab.json").write_text(
      json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer",
      "model_max_length": max_length,
      "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>",
  }, indent=2))


def _tiny_tokenizer():
  with tempfile.TemporaryDirectory() as tmp:
    write_tiny_tokenizer(tmp)
    return transformers.CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


@library_logs.quietly
def build_tiny(config: ModelConfig = ModelConfig()) -> StableDiffusion:
  """A tiny random Stable Diffusion, deterministic in ``config.tiny_seed``; no files read.

  UNet: channels (32, 64), 1 layer per block, cross-attention width 32, 8 heads. VAE: 4 blocks
  of (8, 8, 16, 16) channels (scale factor 8), 4 latent channels. Text encoder: CLIP with width
  32, 2 layers, 4 heads, 77 positions, the tiny tokenizer's vocabulary.
  """
  dtype = _compute_dtype(config)
  tokenizer = _tiny_tokenizer()
  unet = _build_unet(tiny_unet_config(config.tiny_latent_size), config, "tiny unet")
  vae_cfg = tiny_vae_config(config.tiny_latent_size * 8)
  vae = _build_vae(vae_cfg, config)
  text_encoder = _build_text_encoder(tiny_text_config(tokenizer), config)
  trees = _shape_trees(unet, vae, text_encoder)
  params = {name: noise.random_params(tree, [config.tiny_seed, i])
            for i, (name, tree) in enumerate(sorted(trees.items()))}
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
      params={k: _to_device(v, dtype) for k, v in params.items()},
      schedule=schedule_lib.ScheduleConfig(),
      latent_channels=4, latent_size=config.tiny_latent_size,
      vae_scale_factor=vae_scale_factor(vae_cfg), scaling_factor=_SD_SCALING_FACTOR,
      config=config)


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint folder.


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: a Stable Diffusion folder in diffusers layout "
                            "has model_index.json and a config.json in unet/, vae/ and "
                            "text_encoder/.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from None


def _find_weights(component: pathlib.Path, candidates, allow_pickle: bool):
  """Returns (kind, path) of the preferred weight file of one component."""
  for kind, name in candidates:
    path = component / name
    if not path.is_file():
      continue
    if kind == "pickle" and not allow_pickle:  # only reached when nothing safer exists
      raise ValueError(
          f"{path} is a PyTorch pickle file; it is refused because unpickling can run arbitrary "
          "code. Convert it to safetensors, or, if you trust the file, set "
          "--config.model.allow_pickle=True (reading .bin needs torch).")
    return kind, path
  looked_for = [name for _, name in candidates]
  others = sorted(p.name for p in component.iterdir() if p.name.endswith(_OTHER_WEIGHT_SUFFIXES))
  if others:
    raise ValueError(f"{component}: unknown weight format {others}; this loader reads "
                     f"{looked_for} (Flax msgpack, safetensors, or PyTorch .bin with "
                     "allow_pickle). Convert the weights to safetensors.")
  raise FileNotFoundError(f"{component} has no weight file; looked for {looked_for}.")


def _import_torch_for(path: pathlib.Path):
  return convert.import_torch(f"reading the PyTorch .bin file {path}",
                              "or convert it to safetensors.")


def _read_pickle(path: pathlib.Path, torch) -> dict[str, np.ndarray]:
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items() if hasattr(v, "numpy")}


def _load_component(component: pathlib.Path, candidates, naming: str, shape_tree,
                    allow_pickle: bool) -> dict:
  """Reads one component's weights as a nested numpy dict matching ``shape_tree``."""
  kind, path = _find_weights(component, candidates, allow_pickle)
  logger.info("Reading %s", path)
  torch = _import_torch_for(path) if kind == "pickle" else None
  try:
    if kind == "msgpack":
      state = flax.serialization.msgpack_restore(path.read_bytes())
    elif kind == "safetensors":
      state = safetensors.numpy.load_file(str(path))
    else:
      state = _read_pickle(path, torch)
  except Exception as e:  # pylint: disable=broad-except  # any reader's error: one message
    raise ValueError(f"{path} could not be read as {kind} ({type(e).__name__}: {e}); is the "
                     "file complete? Download or convert it again.") from None
  if kind == "msgpack":
    return convert.check_tree(state, shape_tree, str(path))
  return convert.torch_to_flax(state, shape_tree, naming, str(path))


def _load_tokenizer(directory: pathlib.Path, max_positions: int):
  missing = [n for n in _TOKENIZER_FILES if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"{directory} lacks the tokenizer files {missing}: a Stable "
                            "Diffusion folder has tokenizer/vocab.json and tokenizer/merges.txt.")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
  if tokenizer.model_max_length > max_positions:  # no tokenizer_config.json: unbounded
    tokenizer.model_max_length = max_positions
  return tokenizer


def _load_dir(config: ModelConfig) -> StableDiffusion:
  root = pathlib.Path(os.path.expanduser(config.path))
  if not root.is_dir():
    raise FileNotFoundError(
        f"model.path={config.path!r} is not a directory. Point --config.model.path at a local "
        "Stable Diffusion v1.x folder in diffusers layout (model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/), or leave it None for the tiny random model.")
  _read_json(root / "model_index.json")
  unet_cfg = _read_json(root / "unet" / "config.json")
  vae_cfg = _read_json(root / "vae" / "config.json")
  text_cfg = _read_json(root / "text_encoder" / "config.json")
  dtype = _compute_dtype(config)
  unet = _build_unet(unet_cfg, config, str(root / "unet" / "config.json"))
  vae = _build_vae(vae_cfg, config)
  text_encoder = _build_text_encoder(text_cfg, config)
  if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
    raise ValueError(f"{root}: unet cross_attention_dim={unet.config.cross_attention_dim} but "
                     f"the text encoder's hidden_size={text_encoder.config.hidden_size}.")
  if unet.config.in_channels != vae.config.latent_channels:
    raise ValueError(f"{root}: unet in_channels={unet.config.in_channels} but the VAE's "
                     f"latent_channels={vae.config.latent_channels}.")
  tokenizer = _load_tokenizer(root / "tokenizer", text_encoder.config.max_position_embeddings)

  trees = _shape_trees(unet, vae, text_encoder)
  params = {}
  for name, candidates, naming in (("unet", _DIFFUSERS_WEIGHTS, "diffusers"),
                                   ("vae", _DIFFUSERS_WEIGHTS, "diffusers"),
                                   ("text_encoder", _TRANSFORMERS_WEIGHTS, "transformers")):
    params[name] = _to_device(
        _load_component(root / name, candidates, naming, trees[name], config.allow_pickle), dtype)

  scheduler_file = root / "scheduler" / "scheduler_config.json"
  if scheduler_file.is_file():
    schedule = schedule_lib.ScheduleConfig.from_diffusers_config(_read_json(scheduler_file))
  else:
    logger.warning("%s is missing; using the SD v1 schedule.", scheduler_file)
    schedule = schedule_lib.ScheduleConfig()
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
      schedule=schedule, latent_channels=int(vae.config.latent_channels),
      latent_size=int(unet.config.sample_size), vae_scale_factor=vae_scale_factor(vae.config),
      scaling_factor=float(vae_cfg.get("scaling_factor", _SD_SCALING_FACTOR)), config=config)


@library_logs.quietly
def load(config: ModelConfig) -> StableDiffusion:
  """Loads the model at ``config.path`` (a diffusers-layout folder or a single file), or builds
  the tiny one if None."""
  path = None if config.path is None else os.path.expanduser(config.path)
  if path is not None and (os.path.isfile(path) or
                           (single_file.is_single_file(path) and not os.path.isdir(path))):
    return _load_single_file(config)
  if config.tokenizer_path is not None or config.config_path is not None:
    raise ValueError("model.tokenizer_path and model.config_path are only for a single-file "
                     f"model.path (.safetensors / .ckpt); model.path={config.path!r} is not one. "
                     "Unset them (a diffusers folder has its own tokenizer/ and configs).")
  if config.path is None:
    return build_tiny(config)
  return _load_dir(config)


def _single_file_base_configs(config: ModelConfig) -> dict:
  """The configs whose non-shape fields a single file uses (see single_file's docstring)."""
  if config.config_path is None:
    return single_file.SD_V1_CONFIGS
  root = pathlib.Path(os.path.expanduser(config.config_path))
  if not root.is_dir():
    raise FileNotFoundError(f"model.config_path={config.config_path!r} is not a directory: give "
                            "a diffusers-layout folder (unet/, vae/, text_encoder/ config.json; "
                            "weights not needed), or unset it for SD v1's standard config.")
  base = {name: _read_json(root / name / "config.json")
          for name in ("unet", "vae", "text_encoder")}
  if base["text_encoder"].get("model_type") == "clip" and "text_config" in base["text_encoder"]:
    base["text_encoder"] = base["text_encoder"]["text_config"]
  scheduler_file = root / "scheduler" / "scheduler_config.json"
  base["scheduler"] = (_read_json(scheduler_file) if scheduler_file.is_file()
                       else single_file.SD_V1_CONFIGS["scheduler"])
  return base


def _load_single_file(config: ModelConfig) -> StableDiffusion:
  """A CompVis/LDM single file (``single_file``) -> the same model as its diffusers folder."""
  path = pathlib.Path(os.path.expanduser(config.path))
  if config.tokenizer_path is None:  # checked first: before reading gigabytes
    raise ValueError(
        f"model.path={config.path!r} is a single-file checkpoint, which holds no tokenizer: set "
        "--config.model.tokenizer_path to a folder with vocab.json and merges.txt (SD v1.x uses "
        "CLIP ViT-L/14's tokenizer, e.g. the tokenizer/ folder of any SD v1.x diffusers "
        "checkpoint).")
  tokenizer_dir = pathlib.Path(os.path.expanduser(config.tokenizer_path))
  if not tokenizer_dir.is_dir():
    raise FileNotFoundError(f"model.tokenizer_path={config.tokenizer_path!r} is not a directory: "
                            "give a folder with vocab.json and merges.txt.")
  dtype = _compute_dtype(config)
  base = _single_file_base_configs(config)
  state = single_file.read(path, config.allow_pickle)
  source = str(path)
  single_file.detect_family(state, source)
  cfgs = single_file.infer_configs(state, base, source)
  schedule = schedule_lib.ScheduleConfig.from_diffusers_config(cfgs["scheduler"])
  unet = _build_unet(cfgs["unet"], config, source)
  vae = _build_vae(cfgs["vae"], config)
  text_encoder = _build_text_encoder(cfgs["text_encoder"], config)
  if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
    raise ValueError(f"{path}: the UNet's cross-attention width {unet.config.cross_attention_dim} "
                     f"differs from the text encoder's width {text_encoder.config.hidden_size}: "
                     "the file mixes components of different models.")
  tokenizer = _load_tokenizer(tokenizer_dir, text_encoder.config.max_position_embeddings)
  if len(tokenizer) > text_encoder.config.vocab_size:
    raise ValueError(f"model.tokenizer_path={config.tokenizer_path!r} has {len(tokenizer)} "
                     f"tokens but {path} embeds {text_encoder.config.vocab_size}: it is not this "
                     "model's tokenizer.")
  parts = single_file.split(state, unet.config.layers_per_block,
                            len(vae.config.block_out_channels), source)
  del state
  trees = _shape_trees(unet, vae, text_encoder)
  params = {name: _to_device(convert.torch_to_flax(parts.pop(name), trees[name], naming,
                                                   f"{source} ({name})"), dtype)
            for name, naming in (("unet", "diffusers"), ("vae", "diffusers"),
                                 ("text_encoder", "transformers"))}
  return StableDiffusion(
      unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
      schedule=schedule, latent_channels=int(vae.config.latent_channels),
      latent_size=int(unet.config.sample_size), vae_scale_factor=vae_scale_factor(vae.config),
      scaling_factor=float(cfgs["vae"].get("scaling_factor", _SD_SCALING_FACTOR)), config=config)


def save(model: StableDiffusion, directory) -> None:
  """Writes ``model`` as a diffusers-layout folder with Flax msgpack weights.

  ``load`` reads it back exactly (the fast way to reuse a converted safetensors checkpoint).
  Written to a temporary sibling folder and renamed; ``directory`` must not exist yet.
  """
  final = pathlib.Path(directory)
  if final.exists():
    raise FileExistsError(f"{final} exists; save writes a new folder: pick another path.")
  tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
  params = jax.device_get(model.params)
  model.unet.save_pretrained(tmp / "unet", params=params["unet"])
  model.vae.save_pretrained(tmp / "vae", params=params["vae"])
  model.text_encoder.save_pretrained(tmp / "text_encoder", params=params["text_encoder"])
  model.tokenizer.save_pretrained(tmp / "tokenizer")
  (tmp / "scheduler").mkdir()
  scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "clip_sample": False,
               "prediction_type": "epsilon", **dataclasses.asdict(model.schedule)}
  (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
  (tmp / "model_index.json").write_text(json.dumps({
      "_class_name": "FlaxStableDiffusionPipeline",
      "_diffusers_version": diffusers.__version__,
      "unet": ["diffusers", "FlaxUNet2DConditionModel"],
      "vae": ["diffusers", "FlaxAutoencoderKL"],
      "text_encoder": ["transformers", "FlaxCLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "FlaxPNDMScheduler"],
  }, indent=2))
  os.rename(tmp, final)
