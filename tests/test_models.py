"""The models package and convert.py on the tiny built-in model: no torch, no network, no real weights."""
import contextlib
import logging
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from disentangle_jax import models
from disentangle_jax import schedule


def _trees_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))))


@pytest.fixture(scope="module")
def saved_dir(tiny_model, tmp_path_factory):
  """The tiny model saved in diffusers layout with Flax msgpack weights."""
  path = tmp_path_factory.mktemp("saved") / "sd"
  models.save(tiny_model, path)
  return path


@pytest.fixture
def sd_copy(saved_dir, tmp_path):
  """A scratch copy of saved_dir that a test may break."""
  return pathlib.Path(shutil.copytree(saved_dir, tmp_path / "sd"))


@pytest.fixture(scope="module")
def eps_case(tiny_model):
  """(jitted eps_fn, x, emb, eps) of the tiny UNet at t = 500, computed once."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  emb = rng.standard_normal((2, 77, 32)).astype(np.float32)
  eps_fn = jax.jit(models.make_eps_fn(tiny_model.unet))
  return eps_fn, x, emb, np.asarray(eps_fn(tiny_model.params["unet"], x, 500, emb))


def _load(path, **kwargs):
  return models.load(models.ModelConfig(path=str(path), **kwargs))


# ---------------------------------------------------------------------------------------------
# The tiny model and the wrappers.


def test_tiny_build_is_deterministic(tiny_model):
  again = models.build_tiny(models.ModelConfig(tiny_seed=0))
  other = models.build_tiny(models.ModelConfig(tiny_seed=1))
  assert _trees_equal(tiny_model.params, again.params)
  assert not np.array_equal(tiny_model.params["unet"]["conv_in"]["kernel"],
                            other.params["unet"]["conv_in"]["kernel"])


def test_init_shapes_are_traced_once_per_module_configuration():
  """models.build.init_shapes: an equal module reads the shapes traced before (no trace);
  another configuration traces its own; every call gets its own containers."""
  from disentangle_jax.models import build  # pylint: disable=import-outside-toplevel
  traces = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traces.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = models.ModelConfig()
    vae = models.build_vae(models.tiny_vae_config(64), config)
    first = build.init_shapes(vae)
    traced = traces.count("init_weights")
    again = build.init_shapes(models.build_vae(models.tiny_vae_config(64), config))
    assert traces.count("init_weights") == traced  # read back, not traced
    assert again == first and again is not first
    again.clear()  # a caller's change stays its own
    assert build.init_shapes(vae) == first
    wider = build.init_shapes(models.build_vae(
        dict(models.tiny_vae_config(64), block_out_channels=[8, 8, 16, 32]), config))
    assert traces.count("init_weights") == traced + 1
    assert wider != first
    assert build.init_shapes(vae) == jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_tiny_constants(tiny_model):
  m = tiny_model
  assert (m.latent_channels, m.latent_size, m.vae_scale_factor) == (4, 8, 8)
  assert m.scaling_factor == pytest.approx(0.18215)
  assert m.schedule == schedule.ScheduleConfig()
  assert set(m.params) == {"unet", "vae", "text_encoder"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(m.params))


def test_tiny_tokenizer_merges_common_words(tiny_model):
  tokens = tiny_model.tokenizer.tokenize("A photo of person, smiling")
  assert tokens == ["a</w>", "photo</w>", "of</w>", "person</w>", ",</w>", "smiling</w>"]
  assert tiny_model.tokenizer.model_max_length == 77


def test_eps_fn_shapes_and_dtype(tiny_model):
  eps_fn = models.make_eps_fn(tiny_model.unet)
  x = jax.ShapeDtypeStruct((3, 8, 8, 4), jnp.float32)
  emb = jax.ShapeDtypeStruct((3, 77, 32), jnp.float32)
  out = jax.eval_shape(eps_fn, tiny_model.params["unet"], x, jnp.int32(981), emb)
  assert (out.shape, out.dtype) == ((3, 8, 8, 4), jnp.float32)
  # A non-square latent and a per-sample timestep vector also work.
  x = jax.ShapeDtypeStruct((2, 8, 16, 4), jnp.float32)
  emb = jax.ShapeDtypeStruct((2, 77, 32), jnp.float32)
  out = jax.eval_shape(eps_fn, tiny_model.params["unet"], x, jnp.array([1, 2]), emb)
  assert out.shape == (2, 8, 16, 4)
  with pytest.raises(ValueError, match="same N"):
    jax.eval_shape(eps_fn, tiny_model.params["unet"], x, jnp.int32(1),
                   jax.ShapeDtypeStruct((3, 77, 32), jnp.float32))


def test_decode_and_encode(tiny_model):
  params = tiny_model.params["vae"]
  decode = models.make_decode_fn(tiny_model.vae, tiny_model.scaling_factor)
  encode = models.make_encode_fn(tiny_model.vae, tiny_model.scaling_factor)

  @jax.jit
  def run(params, latents, key):  # one compile for the three calls
    images = decode(params, latents)
    return images, encode(params, images), encode(params, images, key)

  latents = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  images, z, z_sample = run(params, latents, jax.random.PRNGKey(1))
  assert (images.shape, images.dtype) == ((2, 64, 64, 3), jnp.float32)
  assert float(images.min()) >= 0 and float(images.max()) <= 1
  assert (z.shape, z.dtype) == ((2, 8, 8, 4), jnp.float32)
  assert z_sample.shape == z.shape and not np.allclose(z_sample, z)
  with pytest.raises(ValueError, match="divisible by 8"):
    jax.eval_shape(encode, params, jnp.zeros((1, 60, 64, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(decode, params, jnp.zeros((1, 4, 8, 8)))


def test_upsampler_is_bit_identical_to_diffusers(tiny_model):
  """models.upsample (always active): the values and the gradient of jax.image.resize's nearest
  2x, bit for bit, alone and through the tiny VAE decoder (two upsamplers)."""
  from disentangle_jax.models import upsample  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 14, 3))

  @jax.jit  # one program (eagerly, every op would be compiled apart)
  def values_and_vjps(x, g):
    outs = [jax.vjp(f, x) for f in (upsample.nearest_2x,
                                    lambda x: jax.image.resize(x, g.shape, "nearest"))]
    return [(y, vjp(g)[0]) for y, vjp in outs]
  (ours, vjp_ours), (resized, vjp_resize) = values_and_vjps(x, g)
  np.testing.assert_array_equal(ours, resized)
  np.testing.assert_array_equal(vjp_ours, vjp_resize)

  vae, params = tiny_model.vae, tiny_model.params["vae"]

  def decode(z, options: bool):
    options = models.run_options(models.ModelConfig(conv="xla")) if options else None
    with options or contextlib.nullcontext():
      return vae.apply({"params": params}, z, method="decode").sample

  z = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 4))
  weights = jax.random.normal(jax.random.PRNGKey(3), (1, 3, 64, 64))
  grad_fns = [jax.grad(lambda z, o=o: jnp.sum(decode(z, o) * weights)) for o in (True, False)]
  # The interceptor did replace diffusers' resize: no gather / scatter-add left.
  assert ["gather" in str(jax.make_jaxpr(f)(z)) for f in grad_fns] == [False, True]
  grads = jax.jit(lambda z: [f(z) for f in grad_fns])(z)
  np.testing.assert_array_equal(*grads)

def test_encode_prompts(tiny_model):
  emb = models.encode_prompts(tiny_model, ["a photo of person", "", "a photo of person"])
  assert (emb.shape, emb.dtype) == ((3, 77, 32), jnp.float32)
  np.testing.assert_array_equal(emb[0], emb[2])
  assert not np.allclose(emb[0], emb[1])
  alone = models.encode_prompts(tiny_model, [""])
  np.testing.assert_allclose(alone[0], emb[1], atol=1e-6)
  with pytest.raises(ValueError, match="list of strings"):
    models.encode_prompts(tiny_model, "a photo of person")


def test_long_prompt_is_truncated_with_a_warning(tiny_model, caplog):
  long_prompt = " ".join(["photo"] * 100)  # 100 tokens; 75 fit between start and end
  with caplog.at_level(logging.WARNING, logger=models.bundle.__name__):
    ids = models.tokenize(tiny_model.tokenizer, [long_prompt, "a photo"])
  messages = [r.getMessage() for r in caplog.records if r.name == models.bundle.__name__]
  assert len(messages) == 1
  assert long_prompt in messages[0] and "last 25 token(s) are dropped" in messages[0]
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[0, -1] == tiny_model.tokenizer.eos_token_id
  # Same ids (hence embedding) as the prompt cut to 75 words by hand.
  np.testing.assert_array_equal(
      ids[0], models.tokenize(tiny_model.tokenizer, [" ".join(["photo"] * 75)])[0])


def test_chunked_attention_matches_standard(eps_case):
  _, x, emb, standard = eps_case
  chunked = models.build_tiny(models.ModelConfig(attention="chunked"))
  assert chunked.unet.use_memory_efficient_attention
  out = jax.jit(models.make_eps_fn(chunked.unet))(chunked.params["unet"], x, 500, emb)
  np.testing.assert_allclose(out, standard, atol=1e-5, rtol=1e-5)


def test_bfloat16_model():
  model = models.build_tiny(models.ModelConfig(dtype="bfloat16"))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
  emb = models.encode_prompts(model, ["a photo"])
  assert emb.dtype == jnp.bfloat16
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16)
  out = jax.eval_shape(models.make_eps_fn(model.unet), model.params["unet"], x, 1,
                       jnp.zeros((2, 77, 32), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


def test_config_validation():
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    models.ModelConfig(dtype="float16")
  with pytest.raises(ValueError, match="model.attention='flash'"):
    models.ModelConfig(attention="flash")
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="jax_enable_x64"):
      models.build_tiny(models.ModelConfig(dtype="float64"))


# ---------------------------------------------------------------------------------------------
# Loading a folder.


def test_save_load_round_trip(tiny_model, saved_dir, eps_case):
  loaded = _load(saved_dir)
  assert _trees_equal(loaded.params, tiny_model.params)
  assert loaded.schedule == tiny_model.schedule
  assert (loaded.latent_size, loaded.vae_scale_factor, loaded.scaling_factor) == (
      tiny_model.latent_size, tiny_model.vae_scale_factor, tiny_model.scaling_factor)
  prompts = ["a photo of person, smiling", ""]
  np.testing.assert_array_equal(models.encode_prompts(loaded, prompts),
                                models.encode_prompts(tiny_model, prompts))
  # Equal modules (same config) and equal params give the same outputs.
  assert loaded.unet == tiny_model.unet and loaded.vae == tiny_model.vae
  eps_fn, x, emb, eps = eps_case
  np.testing.assert_array_equal(eps_fn(loaded.params["unet"], x, 500, emb), eps)
  with pytest.raises(FileExistsError, match="exists"):
    models.save(tiny_model, saved_dir)


def _as_torch_state_dict(flax_params, naming: str) -> dict:
  """Inverse of convert.torch_to_flax for the VAE and the text encoder (test helper)."""
  state = {}
  for path, value in traverse_util.flatten_dict(flax_params).items():
    value = np.asarray(value)
    *parts, leaf = path
    if naming == "diffusers":
      parts = [re.sub(r"_(\d+)$", r".\1", p) for p in parts]
    if leaf == "kernel":
      value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    if leaf in ("kernel", "scale", "embedding"):
      leaf = "weight"
    state[".".join(parts + [leaf])] = np.ascontiguousarray(value)
  return state


def test_safetensors_load_without_torch(tiny_model, sd_copy, caplog):
  """VAE (convs, attention, norms) and CLIP (embeddings, layers) from safetensors, fp16 too."""
  (sd_copy / "vae" / "diffusion_flax_model.msgpack").unlink()
  (sd_copy / "text_encoder" / "flax_model.msgpack").unlink()
  vae = _as_torch_state_dict(tiny_model.params["vae"], "diffusers")
  vae["encoder.extra.weight"] = np.zeros(3, np.float32)  # ignored with a warning
  safetensors.numpy.save_file(vae, sd_copy / "vae" / "diffusion_pytorch_model.safetensors")
  text = _as_torch_state_dict(tiny_model.params["text_encoder"], "transformers")
  text["text_model.embeddings.position_ids"] = np.arange(77)[None]  # a buffer: ignored
  text = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in text.items()}
  safetensors.numpy.save_file(text, sd_copy / "text_encoder" / "model.fp16.safetensors")
  with caplog.at_level(logging.WARNING):
    loaded = _load(sd_copy)
  assert ("1 weight(s) have no place in the model and are ignored, e.g. "
          "['encoder.extra.weight']") in caplog.text
  assert _trees_equal(loaded.params["vae"], tiny_model.params["vae"])
  assert loaded.params["text_encoder"]["text_model"]["final_layer_norm"]["scale"].dtype == (
      jnp.float32)
  fp16 = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32),
                      tiny_model.params["text_encoder"])
  assert _trees_equal(loaded.params["text_encoder"], fp16)


def test_error_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory.*diffusers layout"):
    _load(tmp_path / "nowhere")


def test_error_missing_model_index(sd_copy):
  (sd_copy / "model_index.json").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(sd_copy / "model_index.json"))):
    _load(sd_copy)


def test_error_missing_component_config(sd_copy):
  (sd_copy / "unet" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(sd_copy / "unet" / "config.json"))):
    _load(sd_copy)


def test_error_no_weights(sd_copy):
  (sd_copy / "vae" / "diffusion_flax_model.msgpack").unlink()
  with pytest.raises(FileNotFoundError, match="vae has no weight file; looked for .*"
                     "diffusion_flax_model.msgpack.*diffusion_pytorch_model.safetensors"):
    _load(sd_copy)


def test_error_pickle_without_opt_in(sd_copy):
  (sd_copy / "unet" / "diffusion_flax_model.msgpack").unlink()
  (sd_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(ValueError, match="pickle.*arbitrary code.*allow_pickle=True"):
    _load(sd_copy)


def test_error_corrupt_file(sd_copy):
  (sd_copy / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"\x00truncated")
  with pytest.raises(ValueError, match="could not be read as msgpack.*is the file complete"):
    _load(sd_copy)


def test_error_unknown_format(sd_copy):
  (sd_copy / "unet" / "diffusion_flax_model.msgpack").rename(sd_copy / "unet" / "unet.ckpt")
  with pytest.raises(ValueError, match=r"unknown weight format \['unet.ckpt'\]"):
    _load(sd_copy)


def test_error_missing_tokenizer(sd_copy):
  (sd_copy / "tokenizer" / "merges.txt").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer files \\['merges.txt'\\]"):
    _load(sd_copy)


def test_error_weights_do_not_match_config(sd_copy):
  config = sd_copy / "vae" / "config.json"
  config.write_text(config.read_text().replace('"latent_channels": 4', '"latent_channels": 8'))
  (sd_copy / "unet" / "config.json").write_text(
      (sd_copy / "unet" / "config.json").read_text().replace('"in_channels": 4',
                                                             '"in_channels": 8'))
  with pytest.raises(ValueError, match="wrong shape.*do not belong together"):
    _load(sd_copy)
