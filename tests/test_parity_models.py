"""Parity of the loaded Flax models with diffusers / transformers PyTorch on identical weights.

The torch checkpoint (tests/conftest.py: torch_sd_dir) is read by ``models.load`` from
safetensors, converted in numpy (no torch in our code path), then every component is compared in
float32.
"""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install torch==2.13.0")

from disentangle_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from disentangle_jax import schedule  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPTS = ["A photo of person, smiling", "", "a photo of the church exterior, covered by snow"]


@pytest.fixture(scope="module")
def loaded(torch_sd_dir):
  path, modules = torch_sd_dir
  return models.load(models.ModelConfig(path=str(path))), modules


def _max_rel_diff(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  return np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12)


def test_schedule_and_constants(loaded):
  model, _ = loaded
  assert model.schedule == schedule.ScheduleConfig()
  assert (model.latent_channels, model.latent_size, model.vae_scale_factor) == (4, 8, 8)
  assert model.scaling_factor == pytest.approx(0.18215)


def test_tokenizer_ids_match(loaded):
  model, modules = loaded
  ours = models.tokenize(model.tokenizer, PROMPTS)
  theirs = modules["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True,
                                return_tensors="np").input_ids
  np.testing.assert_array_equal(ours, theirs)
  # The hand-written BPE files also convert to the fast (Rust) tokenizer with the same ids.
  import transformers  # pylint: disable=g-import-not-at-top
  fast = transformers.CLIPTokenizerFast.from_pretrained(modules["tokenizer"].name_or_path)
  fast_ids = fast(PROMPTS, padding="max_length", max_length=77, truncation=True,
                  return_tensors="np").input_ids
  np.testing.assert_array_equal(ours, fast_ids)


def test_unet_parity(loaded):
  model, modules = loaded
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  emb = rng.standard_normal((2, 77, 32)).astype(np.float32)
  ours = jax.jit(models.make_eps_fn(model.unet))(model.params["unet"], x, jnp.int32(321), emb)
  with torch.no_grad():
    theirs = modules["unet"](torch.from_numpy(x).permute(0, 3, 1, 2), 321,
                             torch.from_numpy(emb)).sample.permute(0, 2, 3, 1).numpy()
  assert _max_rel_diff(ours, theirs) <= 1e-4


def test_unet_torch_numerics_matches_pytorch_exactly(torch_sd_dir):
  """diffusers' Flax UNet differs from its PyTorch UNet (tanh GELU in GEGLU, GroupNorm eps 1e-5 in
  Transformer2D): ~5e-5 relative even in float64. model.torch_numerics removes the difference."""
  import copy  # pylint: disable=g-import-not-at-top
  path, modules = torch_sd_dir
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4))
  emb = rng.standard_normal((2, 77, 32))
  with torch.no_grad():
    theirs = copy.deepcopy(modules["unet"]).double()(
        torch.from_numpy(x).permute(0, 3, 1, 2), 321,
        torch.from_numpy(emb)).sample.permute(0, 2, 3, 1).numpy()
  errors = {}
  with jax.enable_x64(True):
    for exact in (False, True):
      config = models.ModelConfig(path=str(path), dtype="float64", torch_numerics=exact)
      model = models.load(config)
      ours = jax.jit(models.make_eps_fn(model.unet, config))(model.params["unet"], x,
                                                             jnp.int32(321), emb)
      errors[exact] = _max_rel_diff(ours, theirs)
  print(f"float64 UNet vs PyTorch: Flax numerics {errors[False]:.1e}, torch_numerics "
        f"{errors[True]:.1e}")
  # 3.7e-5 (the upstream difference) -> 3e-15 at XLA's default level, 1.6e-8 at the suite's -O0
  # (conftest.py: its float64 transcendentals are less exact).
  assert errors[False] > 1e-6
  assert errors[True] <= 1e-7


def test_vae_parity(loaded):
  model, modules = loaded
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  images = rng.uniform(size=(1, 64, 64, 3)).astype(np.float32)
  decode = models.make_decode_fn(model.vae, model.scaling_factor)
  encode = models.make_encode_fn(model.vae, model.scaling_factor)
  decoded, encoded = jax.jit(lambda p, z, x: (decode(p, z), encode(p, x)))(
      model.params["vae"], latents, images)
  vae = modules["vae"]
  with torch.no_grad():
    dec = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2) / 0.18215).sample
    dec = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    enc = vae.encode(torch.from_numpy(images * 2 - 1).permute(0, 3, 1, 2)).latent_dist.mean
    enc = (enc * 0.18215).permute(0, 2, 3, 1).numpy()
  assert 0.01 < decoded.mean() < 0.99  # not all clipped
  assert np.abs(np.asarray(decoded) - dec).max() <= 1e-4
  assert _max_rel_diff(encoded, enc) <= 1e-4


def test_text_encoder_parity(loaded):
  model, modules = loaded
  ours = models.encode_prompts(model, PROMPTS)
  ids = models.tokenize(model.tokenizer, PROMPTS)
  with torch.no_grad():
    theirs = modules["text_encoder"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
  assert ours.shape == (3, 77, 32)
  assert _max_rel_diff(ours, theirs) <= 1e-5


def test_pickle_bin_loads_with_opt_in(torch_sd_dir, loaded, tmp_path):
  path, modules = torch_sd_dir
  shutil.copytree(path, tmp_path / "sd")
  (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
  modules["unet"].save_pretrained(tmp_path / "sd" / "unet", safe_serialization=False)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    models.load(models.ModelConfig(path=str(tmp_path / "sd")))
  from_bin = models.load(models.ModelConfig(path=str(tmp_path / "sd"), allow_pickle=True))
  same = jax.tree.map(np.array_equal, from_bin.params, loaded[0].params)
  assert all(jax.tree.leaves(same))
