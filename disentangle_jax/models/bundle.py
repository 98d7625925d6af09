"""A loaded model (``StableDiffusion``: static modules + one params pytree) and its prompts.

Shapes: N prompts, L tokens (77 for SD), D text width. A prompt's conditioning is [L, D] for
SD 1.x / 2.x and {"tokens": [L, D], "pooled": [1, P]} for SDXL (family.py); code outside this
package treats it as an opaque pytree (mixing.mix, mixing.select).
"""
from __future__ import annotations

import logging
import re
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors, mixing
from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models import apply
from disentangle_jax.models import family as family_lib
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
    family: family.Family (SD1, SD2, SDXL): what conditions the UNet (programs never look).
    text_encoder_2, tokenizer_2: SDXL's second text encoder (FlaxCLIPTextModelWithProjection)
      and tokenizer; None otherwise (params then has no "text_encoder_2").
    flow: SD 3.x / Flux.1 (flow_bundle.py): the flow_folder.FlowModel (without weights) whose
      encoders, tokenizers and schedule the bundle runs; ``unet`` is then a flow_bundle.FlowNet
      and params["unet"] the transformer's weights. None for the UNet families.
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
  family: family_lib.Family = family_lib.SD1
  text_encoder_2: Any = None
  tokenizer_2: Any = None
  flow: Any = None


# Jitted text encoders, one per loaded text encoder object (so encode_prompts compiles once).
_JITTED_TEXT_FNS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


_JITTED_HIDDEN_FNS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


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
  return _ids(tokenizer, prompts)


def _ids(tokenizer, prompts: Sequence[str]) -> np.ndarray:
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return ids.astype(np.int32)


def _jitted_hidden_fn(text_encoder, layer: int) -> Callable:
  fns = _JITTED_HIDDEN_FNS.setdefault(text_encoder, {})  # one jitted fn per encoder and layer
  if layer not in fns:
    fns[layer] = jax.jit(apply.make_hidden_fn(text_encoder, layer))
  return fns[layer]


def encode_prompts(model: StableDiffusion, prompts: Sequence[str]):
  """Text conditioning of ``prompts``: [N, L, D] (L = 77 for SD); for SDXL {"tokens": [N, L,
  D1 + D2], "pooled": [N, 1, P]} (family.py). "" gives the CFG unconditional."""
  fam = model.family
  if model.flow is not None:  # SD 3.x / Flux.1: CLIP(s) + T5 (flow_bundle.py)
    from disentangle_jax.models import flow_bundle  # noqa: PLC0415 (imports the samplers)
    return flow_bundle.encode_prompts(model, prompts)
  if not fam.pooled:
    ids = tokenize(model.tokenizer, prompts)
    return _jitted_text_fn(model.text_encoder)(model.params["text_encoder"], ids)
  hidden, pooled = [], None
  for encoder, tokenizer in zip(fam.text_encoders, fam.tokenizers):
    ids = tokenize(getattr(model, tokenizer), prompts)
    h, pooled = _jitted_hidden_fn(getattr(model, encoder), fam.hidden_layer)(
        model.params[encoder], ids)
    hidden.append(h)
  return {"tokens": jnp.concatenate(hidden, axis=-1), "pooled": pooled[:, None, :]}


def check_pairs(model: StableDiffusion, prompts: Sequence[str]) -> None:
  """Refuses (errors.UserError, one line naming both prompts and the cause) a pair (c0, c1) =
  (prompts[2k], prompts[2k + 1]) whose token ids are equal in every text encoder: mixing two
  equal embeddings changes nothing, so every edit, grid column and metric would be void.

  The cause named: words the tokenizer has no token for (``unknown_words``), when they fill
  the text encoder's tokens before the prompts differ; else the token limit; else a difference
  the tokenizer drops (case, spacing). Tokenizing only: nothing is computed.
  """
  tokenizers = [getattr(model, name) for name in model.family.tokenizers]
  for c0, c1 in zip(prompts[0::2], prompts[1::2]):
    if all(np.array_equal(*_ids(tok, [c0, c1])) for tok in tokenizers):
      raise errors.UserError(
          f"c0 {c0!r} and c1 {c1!r} encode to the same tokens, so mixing them changes nothing: "
          f"{_same_tokens_cause(tokenizers[0], c0, c1)}")


def unknown_words(tokenizer, text: str) -> list[str]:
  """The words of ``text`` the tokenizer's vocabulary does not hold: broken into pieces of
  which at least half are single letters (a word-level vocabulary such as the toy world's
  spells an unknown word letter by letter; a real CLIP vocabulary splits rare words into a few
  syllables, which does not count)."""
  out = []
  for word in re.findall(r"[^\W\d_]+", text.lower()):
    pieces = [p.replace("</w>", "") for p in tokenizer.tokenize(word)]
    if len(pieces) > 1 and 2 * sum(len(p) == 1 for p in pieces) >= len(pieces) and (
        word not in out):
      out.append(word)
  return out


def _same_tokens_cause(tokenizer, c0: str, c1: str) -> str:
  limit = tokenizer.model_max_length - 2  # start and end tokens
  longest = max(len(tokenizer.tokenize(p)) for p in (c0, c1))
  unknown = unknown_words(tokenizer, f"{c0} {c1}")
  if longest > limit and unknown:
    return (f"the words {', '.join(repr(w) for w in unknown)} are unknown to this model's "
            f"tokenizer (spelled letter by letter), which fills its {limit} prompt tokens "
            "before the prompts differ. Use words the model knows.")
  if longest > limit:
    return (f"the text encoder reads {limit} prompt tokens and the prompts differ only after "
            f"them (the longer one has {longest}). Shorten the prompts.")
  return ("they differ only in what the tokenizer drops (letter case, spacing, accents). Make "
          "c1 differ from c0 in words.")


def encode_with_negative(model: StableDiffusion, prompts: Sequence[str], negative_prompt: str,
                         pairs: bool = False):
  """(conditioning of ``prompts`` [N, ...], the CFG unconditional one [...]) in one encoder call.

  The unconditional conditioning is ``negative_prompt``'s; "" is encoded like any prompt,
  except for a family whose pipeline conditions on zeros then (SDXL's
  force_zeros_for_empty_prompt). ``pairs=True``: ``prompts`` are (c0, c1) pairs in turn, and a
  pair that encodes to the same tokens is refused before anything is computed
  (``check_pairs``); every program encodes its prompts here.
  """
  if pairs:
    check_pairs(model, prompts)
  emb = encode_prompts(model, list(prompts) + [negative_prompt])
  uncond = mixing.select(emb, -1)
  if negative_prompt == "" and model.family.zero_empty_negative:
    uncond = jax.tree.map(jnp.zeros_like, uncond)
  return mixing.select(emb, slice(0, -1)), uncond
