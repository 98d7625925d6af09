"""models/flow_text.py against StableDiffusion3Pipeline.encode_prompt and
FluxPipeline.encode_prompt on tiny random CLIP and T5 encoders (PyTorch, saved as safetensors,
converted without torch) and offline tiny tokenizers."""
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from disentangle_jax.models import dit_convert, flow_text
from tests import flow_tiny

PROMPTS = ["a photo of person, smiling", "a lake"]
T5_LENGTH = 10  # max_sequence_length (256 / 512 in the real pipelines)


def _saved(model, folder):
  """(config dict, Flax-ready state dict) of a transformers model saved as safetensors."""
  model.save_pretrained(folder, safe_serialization=True)
  return (model.config.to_dict(),
          dit_convert.read_safetensors(os.path.join(folder, "model.safetensors")))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  clip_tok = flow_tiny.clip_tokenizer(root / "clip_tokenizer")
  t5_tok = flow_tiny.t5_tokenizer()
  made = {}
  for name, model in (("clip_l", flow_tiny.torch_clip(clip_tok, "sdxl", 0)),
                      ("clip_g", flow_tiny.torch_clip(clip_tok, "sdxl", 1)),
                      ("clip", flow_tiny.torch_clip(clip_tok, "sd1", projection=False)),
                      ("t5", flow_tiny.torch_t5(len(t5_tok)))):
    made[name] = (model,) + _saved(model, str(root / name))
  return clip_tok, t5_tok, made


def _flax(made, name, projection=None):
  _, cfg, state = made[name]
  encoder = (flow_text.build_t5(cfg) if name == "t5"
             else flow_text.build_clip(cfg, projection=projection))
  return encoder, flow_text.text_params(state, encoder, name)


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_sd3_encode_equals_pipeline(encoders):
  clip_tok, t5_tok, made = encoders
  pipe = StableDiffusion3Pipeline(
      transformer=None, scheduler=None, vae=None, text_encoder=made["clip_l"][0],
      tokenizer=clip_tok, text_encoder_2=made["clip_g"][0], tokenizer_2=clip_tok,
      text_encoder_3=made["t5"][0], tokenizer_3=t5_tok)
  with torch.no_grad():
    tokens, neg_tokens, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, negative_prompt="", max_sequence_length=T5_LENGTH)
  (clip_l, p_l), (clip_g, p_g), (t5, p_t5) = (_flax(made, "clip_l", True),
                                             _flax(made, "clip_g", True), _flax(made, "t5"))
  encode = jax.jit(flow_text.make_sd3_encode_fn(clip_l, clip_g, t5))
  params = {"text_encoder": p_l, "text_encoder_2": p_g, "text_encoder_3": p_t5}
  for prompts, want_tokens, want_pooled in ((PROMPTS, tokens, pooled),
                                            (["", ""], neg_tokens, neg_pooled)):
    got = encode(params, flow_text.tokenize(clip_tok, prompts, flow_text.CLIP_LENGTH),
                 flow_text.tokenize(clip_tok, prompts, flow_text.CLIP_LENGTH),
                 flow_text.tokenize(t5_tok, prompts, T5_LENGTH))
    assert got["tokens"].shape == tuple(want_tokens.shape) == (2, 77 + T5_LENGTH, 96)
    assert _rel(got["tokens"], want_tokens.numpy()) < 1e-4
    assert _rel(got["pooled"][:, 0], want_pooled.numpy()) < 1e-4


def test_flux_encode_equals_pipeline(encoders):
  clip_tok, t5_tok, made = encoders
  pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=made["clip"][0],
                      tokenizer=clip_tok, text_encoder_2=made["t5"][0], tokenizer_2=t5_tok,
                      transformer=None)
  with torch.no_grad():
    tokens, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LENGTH)
  assert not text_ids.any()  # Flux's text positions are all (0, 0, 0): flux.rope_for
  (clip, p_clip), (t5, p_t5) = _flax(made, "clip", False), _flax(made, "t5")
  got = jax.jit(flow_text.make_flux_encode_fn(clip, t5))(
      {"text_encoder": p_clip, "text_encoder_2": p_t5},
      flow_text.tokenize(clip_tok, PROMPTS, flow_text.CLIP_LENGTH),
      flow_text.tokenize(t5_tok, PROMPTS, T5_LENGTH))
  assert _rel(got["tokens"], tokens.numpy()) < 1e-4
  assert _rel(got["pooled"][:, 0], pooled.numpy()) < 1e-4
