"""Prompt encoding of SD 3.x and Flux.1: transformers' Flax CLIP classes and the own T5 encoder
(models/t5.py).

What StableDiffusion3Pipeline.encode_prompt / FluxPipeline.encode_prompt compute, as pure
functions of the encoders' weights (clip_skip None):

  SD 3.x  tokens = [CLIP-L hidden_states[-2] | CLIP-G hidden_states[-2]] zero-padded to the T5
          width, followed by T5's last hidden state: [77 + L_t5, J]; pooled = [CLIP-L text_embeds
          | CLIP-G text_embeds] (the projections): [2 * 1024 -> P].
  Flux.1  tokens = T5's last hidden state [L_t5, J]; pooled = CLIP-L's pooler_output [768].

Both return {"tokens": [N, L, J], "pooled": [N, 1, P]}, the conditioning pytree flow_sampler.py
takes (mixing.mix mixes both leaves with the same lambda[i]). No attention masks, as the
pipelines. Token ids: ``tokenize`` pads to max_length and truncates, as the pipelines do
(CLIP: 77; T5: SD3's max_sequence_length 256, Flux's 512).

Shapes: N prompts, L tokens, J joint width (T5's d_model), P pooled width.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from disentangle_jax import convert, library_logs
from disentangle_jax.models import build
from disentangle_jax.models import t5 as t5_lib
from disentangle_jax.models.config import ModelConfig, compute_dtype

CLIP_LENGTH = 77  # the pipelines' tokenizer_max_length for the CLIP encoders
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default
FLUX_T5_LENGTH = 512  # FluxPipeline's max_sequence_length default
CLIP_SKIP_LAYER = -2  # hidden_states[-(clip_skip + 2)] with clip_skip None


def build_t5(cfg: dict, config: ModelConfig = ModelConfig()) -> t5_lib.T5Encoder:
  """The own Flax T5 encoder (models/t5.py: transformers' Flax T5 fails on jax 0.10) from a
  T5Config dict."""
  return t5_lib.T5Encoder(t5_lib.T5Config.from_dict(cfg), compute_dtype(config))


def text_params(state_dict: dict[str, np.ndarray], encoder, source: str) -> dict:
  """A transformers PyTorch state dict (CLIP or T5) -> the Flax encoder's tree (checked)."""
  if isinstance(encoder, t5_lib.T5Encoder):
    return t5_lib.convert_state_dict(state_dict, encoder.config, source)
  return convert.torch_to_flax(state_dict, encoder.params_shape_tree, "transformers", source)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
  """[N, max_length] int32 ids, padded to max_length and truncated (the pipelines' call)."""
  return np.asarray(tokenizer(list(prompts), padding="max_length", max_length=max_length,
                              truncation=True, return_tensors="np").input_ids, np.int32)


def _clip_out(encoder, params, ids, hidden: bool):
  module = encoder.module
  ids = jnp.asarray(ids, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
  return module.apply({"params": params}, ids, jnp.ones_like(ids), positions,
                      output_hidden_states=hidden)


def _t5_out(encoder, params, ids):
  return encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32))


def make_sd3_encode_fn(clip_l, clip_g, t5) -> Callable:
  """encode(params {"text_encoder", "text_encoder_2", "text_encoder_3"}, ids_l [N, 77],
  ids_g [N, 77], ids_t5 [N, L]) -> {"tokens": [N, 77 + L, J], "pooled": [N, 1, P]}."""

  @library_logs.quietly
  def encode(params, ids_l, ids_g, ids_t5):
    out_l = _clip_out(clip_l, params["text_encoder"], ids_l, True)
    out_g = _clip_out(clip_g, params["text_encoder_2"], ids_g, True)
    t5_tokens = _t5_out(t5, params["text_encoder_3"], ids_t5)
    clip_tokens = jnp.concatenate([out_l.hidden_states[CLIP_SKIP_LAYER],
                                   out_g.hidden_states[CLIP_SKIP_LAYER]], axis=-1)
    pad = t5_tokens.shape[-1] - clip_tokens.shape[-1]
    if pad < 0:
      raise ValueError(f"the CLIP token width {clip_tokens.shape[-1]} exceeds T5's "
                       f"{t5_tokens.shape[-1]}: these encoders do not belong together.")
    clip_tokens = jnp.pad(clip_tokens, ((0, 0), (0, 0), (0, pad)))
    tokens = jnp.concatenate([clip_tokens.astype(t5_tokens.dtype), t5_tokens], axis=-2)
    pooled = jnp.concatenate([out_l.text_embeds, out_g.text_embeds], axis=-1)
    return {"tokens": tokens, "pooled": pooled[:, None, :]}

  return encode


def make_flux_encode_fn(clip, t5) -> Callable:
  """encode(params {"text_encoder", "text_encoder_2"}, ids_clip [N, 77], ids_t5 [N, L]) ->
  {"tokens": [N, L, J], "pooled": [N, 1, 768]}."""

  @library_logs.quietly
  def encode(params, ids_clip, ids_t5):
    pooled = _clip_out(clip, params["text_encoder"], ids_clip, False).pooler_output
    tokens = _t5_out(t5, params["text_encoder_2"], ids_t5)
    return {"tokens": tokens, "pooled": pooled[:, None, :]}

  return encode


def build_clip(cfg: dict, projection: bool, config: ModelConfig = ModelConfig()):
  """transformers' FlaxCLIPTextModel(WithProjection) from its config dict (build.py's)."""
  return build.build_text_encoder(cfg, config, projection=projection)
