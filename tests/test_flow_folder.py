"""models/flow_folder.py: SD3 / Flux folders in diffusers layout, detected from model_index.json,
with their transformer converted and every unsupported part refused by name."""
import json
import os

import jax
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from disentangle_jax import errors, flow_schedule
from disentangle_jax.models import dit_convert, flow_folder
from tests import flow_tiny

SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.39.0",
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
FLUX_INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.39.0",
              "transformer": ["diffusers", "FluxTransformer2DModel"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"],
              "text_encoder_2": ["transformers", "T5EncoderModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"],
              "tokenizer_2": ["transformers", "T5TokenizerFast"]}


def _write_json(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)


def _folder(root, index, transformer, scheduler, encoders):
  """A pipeline folder: model_index.json, the transformer, scheduler, VAE and ``encoders``
  ({component: (torch model, tokenizer component, tokenizer)})."""
  _write_json(os.path.join(root, "model_index.json"), index)
  flow_tiny.torch_vae(latent_channels=16).save_pretrained(os.path.join(root, "vae"),
                                                          safe_serialization=True)
  transformer.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
  FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(os.path.join(root, "scheduler"))
  for name, (model, tokenizer_name, tokenizer) in encoders.items():
    model.save_pretrained(os.path.join(root, name), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(root, tokenizer_name))
  return root


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  return (flow_tiny.clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer")),
          flow_tiny.t5_tokenizer())


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, tokenizers):
  clip_tok, t5_tok = tokenizers
  model = flow_tiny.torch_sd3(in_channels=16, out_channels=16)
  encoders = {"text_encoder": (flow_tiny.torch_clip(clip_tok, "sdxl", 0), "tokenizer", clip_tok),
              "text_encoder_2": (flow_tiny.torch_clip(clip_tok, "sdxl", 1), "tokenizer_2",
                                 clip_tok),
              "text_encoder_3": (flow_tiny.torch_t5(len(t5_tok)), "tokenizer_3", t5_tok)}
  return _folder(str(tmp_path_factory.mktemp("sd3")), SD3_INDEX, model, {"shift": 3.0},
                 encoders)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, tokenizers):
  clip_tok, t5_tok = tokenizers
  model = flow_tiny.torch_flux(in_channels=64)
  encoders = {"text_encoder": (flow_tiny.torch_clip(clip_tok, "sd1", projection=False),
                               "tokenizer", clip_tok),
              "text_encoder_2": (flow_tiny.torch_t5(len(t5_tok)), "tokenizer_2", t5_tok)}
  return _folder(str(tmp_path_factory.mktemp("flux")), FLUX_INDEX, model,
                 {"shift": 3.0, "use_dynamic_shifting": True}, encoders)


def test_sd3_folder_loads(sd3_folder):
  model = flow_folder.load(sd3_folder)
  assert model.family == "sd3"
  assert model.transformer_config.qk_norm == "rms_norm"
  assert (model.vae_scaling_factor, model.vae_shift_factor) == (1.5305, 0.0609)
  assert sorted(model.params) == ["text_encoder", "text_encoder_2", "text_encoder_3",
                                  "transformer", "vae"]
  _, direct = dit_convert.load_transformer(os.path.join(sd3_folder, "transformer"))
  jax.tree.map(np.testing.assert_array_equal, model.params["transformer"], direct)
  expected = flow_schedule.tables(flow_schedule.FlowScheduleConfig(shift=3.0), 4, "sd3")
  jax.tree.map(np.testing.assert_array_equal, model.tables(4, 16, 16), expected)
  ids_l, ids_g, ids_t5 = model.token_ids(["a photo of person"], max_sequence_length=12)
  assert ids_l.shape == ids_g.shape == (1, 77) and ids_t5.shape == (1, 12)
  assert callable(model.velocity_fn(remat=True)) and callable(model.encode_fn())
  assert callable(model.decode_fn())
  quick = flow_folder.load(sd3_folder, with_encoders=False)
  assert sorted(quick.params) == ["transformer"]


def test_flux_folder_loads(flux_folder):
  model = flow_folder.load(flux_folder)
  assert model.family == "flux" and model.transformer_config.guidance_embeds
  assert sorted(model.params) == ["text_encoder", "text_encoder_2", "transformer", "vae"]
  assert [ids.shape for ids in model.token_ids(["a lake"])] == [(1, 77), (1, 512)]
  # mu from the packed 2 x 2 patches: 128 x 96 latents (1024 x 768 px) are 3072 tokens.
  expected = flow_schedule.tables(model.schedule, 4, "flux", seq_len=3072)
  jax.tree.map(np.testing.assert_array_equal, model.tables(4, 128, 96), expected)


def _edited(src, dst, path, edit):
  """A copy of folder ``src`` at ``dst`` (links to the weights) with the JSON at ``path`` edited."""
  for root, _, files in os.walk(src):
    for name in files:
      target = os.path.join(dst, os.path.relpath(os.path.join(root, name), src))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.symlink(os.path.join(root, name), target)
  file = os.path.join(dst, path)
  with open(file, encoding="utf-8") as f:
    value = json.load(f)
  os.remove(file)
  _write_json(file, edit(value))
  return str(dst)


@pytest.mark.parametrize("path,edit,named", [
    ("model_index.json", lambda c: {**c, "text_encoder_3": [None, None]}, "text_encoder_3"),
    ("model_index.json", lambda c: {**c, "_class_name": "StableDiffusion3Img2ImgPipeline"},
     "image-to-image"),
    ("model_index.json", lambda c: {**c, "_class_name": "WuerstchenPipeline"},
     "WuerstchenPipeline"),
    ("model_index.json", lambda c: {**c, "image_encoder": ["transformers", "SiglipVisionModel"]},
     "image_encoder"),
    ("transformer/config.json", lambda c: {**c, "use_new_thing": True}, "use_new_thing"),
    ("transformer/config.json", lambda c: {**c, "qk_norm": "layer_norm"}, "qk_norm"),
    ("vae/config.json", lambda c: {**c, "latent_channels": 4}, "latent_channels"),
    ("vae/config.json", lambda c: {k: v for k, v in c.items() if k != "shift_factor"},
     "shift_factor"),
    ("scheduler/scheduler_config.json", lambda c: {**c, "use_karras_sigmas": True},
     "use_karras_sigmas"),
    ("text_encoder_3/config.json", lambda c: {**c, "feed_forward_proj": "relu"},
     "feed_forward_proj"),
])
def test_bad_folders_are_one_named_user_error(sd3_folder, tmp_path, path, edit, named):
  folder = _edited(sd3_folder, tmp_path / "bad", path, edit)
  with pytest.raises(errors.UserError, match=named) as info:
    flow_folder.load(folder)
  assert "\n" not in str(info.value)
