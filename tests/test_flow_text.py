"""models/flow_text.py against StableDiffusion3Pipeline.encode_prompt and
FluxPipeline.encode_prompt on tiny random CLIP and T5 encoders (PyTorch, saved as safetensors,
converted without torch) and offline tiny tokenizers."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from disentangle_jax.models import dit_convert, flow_text, tiny

PROMPTS = ["a photo of person, smiling", "a lake"]
T5_LENGTH = 10  # max_sequence_length (256 / 512 in the real pipelines)


def _t5_tokenizer():
  """A tiny T5TokenizerFast built offline (Unigram, "</s>" appended as T5's)."""
  words = ["a", "photo", "of", "person", "smiling", "lake"]
  vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
           + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,"] + [("\u2581", -2.0)])
  tok = Tokenizer(models.Unigram(vocab, unk_id=2))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", extra_ids=0)


def _t5_config(vocab_size):
  # T5 v1.1's gated GELU, as SD3's and Flux's T5-XXL encoders.
  return dict(vocab_size=vocab_size, d_model=96, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def _saved(model, folder):
  """(config dict, Flax-ready state dict) of a transformers model saved as safetensors."""
  model.save_pretrained(folder, safe_serialization=True)
  return (model.config.to_dict(),
          dit_convert.read_safetensors(os.path.join(folder, "model.safetensors")))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("text")
  tiny.write_tiny_tokenizer(root / "clip_tokenizer")
  clip_tok = transformers.CLIPTokenizer.from_pretrained(str(root / "clip_tokenizer"),
                                                        local_files_only=True)
  t5_tok = _t5_tokenizer()
  torch.manual_seed(0)
  made = {}
  for name, cfg, cls in (
      ("clip_l", tiny.tiny_text_config(clip_tok, "sdxl", 0), transformers.CLIPTextModelWithProjection),
      ("clip_g", tiny.tiny_text_config(clip_tok, "sdxl", 1), transformers.CLIPTextModelWithProjection),
      ("clip", tiny.tiny_text_config(clip_tok, "sd1"), transformers.CLIPTextModel),
  ):
    model = cls(transformers.CLIPTextConfig(**cfg)).eval()
    made[name] = (model,) + _saved(model, str(root / name))
  t5 = transformers.T5EncoderModel(transformers.T5Config(**_t5_config(len(t5_tok)))).eval()
  made["t5"] = (t5,) + _saved(t5, str(root / "t5"))
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
