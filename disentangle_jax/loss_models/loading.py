"""``load_loss_models``: CLIP and VGG16 from local files or tiny random stand-ins; CLIP text features."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from disentangle_jax import library_logs, losses, param_sharding
from disentangle_jax.loss_models import clip, vgg
from disentangle_jax.loss_models.config import (TINY_VGG_INPUT_SIZE, LossModelConfig,
                                                LossModels)


@library_logs.quietly
def load_loss_models(cfg: LossModelConfig = LossModelConfig(), tokenizer=None,
                     mesh=None) -> LossModels:
  """Builds CLIP and VGG16 from cfg (local files, or tiny random networks when paths are None).

  Args:
    cfg: where the weights come from.
    tokenizer: a Hugging Face-style tokenizer (callable, len(), eos_token_id). Required for
      the tiny CLIP (its vocabulary is sized to it); for a real CLIP directory it defaults to
      the tokenizer stored there.
    mesh: with a model axis > 1, the weights go from host memory straight onto the devices of
      their param_sharding rule; None (or model axis 1): whole on the default device.
  """
  if cfg.clip_path is not None:
    clip_module, clip_config, clip_params = clip.load_clip(cfg.clip_path)
    if tokenizer is None:
      tokenizer = clip.load_tokenizer(cfg.clip_path)
  else:
    if tokenizer is None:
      raise ValueError(
          "the tiny random CLIP (loss_models.clip_path=None) needs a tokenizer to size its "
          "vocabulary: pass tokenizer=... (e.g. the Stable Diffusion tokenizer).")
    clip_module, clip_config, clip_params = clip.init_tiny_clip(tokenizer, cfg.tiny_seed)
  vocab = clip_config.text_config.vocab_size
  if len(tokenizer) > vocab:
    raise ValueError(
        f"the tokenizer has {len(tokenizer)} tokens but the CLIP text tower only {vocab}: "
        "use the tokenizer that belongs to this CLIP.")

  if cfg.vgg_path is not None:
    vgg_params = vgg.load_vgg_params(cfg.vgg_path, allow_pickle=cfg.allow_pickle)
    widths = vgg.params_widths(vgg_params)  # VGG16's, or a narrower VGG16-shaped network's
    vgg_size = cfg.vgg_input_size or losses.VGG_INPUT_SIZE
  else:
    widths = tuple(cfg.tiny_vgg_widths)
    vgg_size = cfg.vgg_input_size or TINY_VGG_INPUT_SIZE
    vgg_params = vgg.init_tiny_vgg(cfg.tiny_seed, widths)

  return LossModels(
      clip_image_apply=clip.make_clip_image_fn(clip_module),
      clip_text_apply=clip.make_clip_text_fn(clip_module),
      vgg_apply=vgg.make_vgg_fn(vgg.VGG16Features(widths)),
      params=param_sharding.put({"clip": clip_params, "vgg": vgg_params}, mesh),
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
