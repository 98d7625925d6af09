"""A loaded model (``StableDiffusion``: static modules + one params pytree) and its prompts.

Shapes: N prompts, L tokens (77 for SD), D text width.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models import apply
from disentangle_jax.models.config import ModelConfig

logger = logging.getLogger(__name__)


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


# Jitted text encoders, one per loaded text encoder object (so encode_prompts compiles once).
_JITTED_TEXT_FNS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def _jitted_text_fn(text_encoder) -> Callable:
  fn = _JITTED_TEXT_FNS.get(text_encoder)
  if fn is None:
    fn = _JITTED_TEXT_FNS[text_encoder] = jax.jit(apply.make_text_fn(text_encoder))
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
