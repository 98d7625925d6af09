"""Loss math, preprocessing, tiny loss networks and weight-loading errors (no torch, no network)."""
import json
import os
import string

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

from disentangle_jax import loss_models, losses

B = 2
IMAGE = 64  # 64 * 7 / 16 = 28 = the tiny CLIP's image size: the release resize is exact.


def _hand_written_tokenizer(directory):
  """A minimal CLIPTokenizer (letters, comma, specials) written by hand."""
  letters = list(string.ascii_lowercase) + [","]
  vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  return transformers.CLIPTokenizer(os.path.join(directory, "vocab.json"),
                                    os.path.join(directory, "merges.txt"))


def tiny_tokenizer(directory):
  """The project's tiny tokenizer (models.write_tiny_tokenizer), else a hand-written one."""
  try:
    from disentangle_jax import models  # pylint: disable=import-outside-toplevel
    write = models.write_tiny_tokenizer
  except (ImportError, AttributeError):
    return _hand_written_tokenizer(directory)
  write(directory)
  return transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def lm(tokenizer):
  return loss_models.load_loss_models(loss_models.LossModelConfig(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.uniform(size=(B, IMAGE, IMAGE, 3)), jnp.float32) for _ in range(2)]


def _reference_release_resize(x, up=(7, 7), pool=(16, 16)):
  """Literal nearest upsample by `up` then average pooling by `pool` (rows, cols), NHWC."""
  x = np.repeat(np.repeat(x, up[0], axis=1), up[1], axis=2)
  b, h, w, c = x.shape
  return x.reshape(b, h // pool[0], pool[0], w // pool[1], pool[1], c).mean(axis=(2, 4))


# ---------------------------------------------------------------------------- preprocessing


def test_release_resize_512_matches_nearest7_avgpool16():
  x = np.random.default_rng(1).uniform(size=(1, 512, 512, 1)).astype(np.float32)
  got = np.asarray(losses.release_resize(jnp.asarray(x), 224))
  assert got.shape == (1, 224, 224, 1)
  np.testing.assert_allclose(got, _reference_release_resize(x), atol=1e-6)


def test_release_resize_small_case_and_identity():
  x = np.random.default_rng(2).uniform(size=(2, 64, 48, 3))
  got = np.asarray(losses.release_resize(jnp.asarray(x, jnp.float32), 28))
  assert got.shape == (2, 28, 28, 3)
  # 64 -> 28: nearest x7, pool 16 (the reference factors); 48 -> 28: nearest x7, pool 12.
  np.testing.assert_allclose(got, _reference_release_resize(x, (7, 7), (16, 12)), atol=1e-6)
  m = losses.box_resample_matrix(48, 28)
  np.testing.assert_allclose(m.sum(axis=1), 1.0)  # an average: constants are preserved
  np.testing.assert_array_equal(losses.box_resample_matrix(28, 28), np.eye(28))


def test_clip_preprocess_modes(lm):
  x = jnp.full((B, IMAGE, IMAGE, 3), 0.5)
  release = losses.clip_preprocess(x, "release", lm.clip_image_size)
  standard = losses.clip_preprocess(x, "standard", lm.clip_image_size)
  size = lm.clip_image_size
  assert release.shape == standard.shape == (B, size, size, 3)
  np.testing.assert_allclose(release, 0.5, atol=1e-6)  # no normalisation
  expected = (0.5 - np.array(losses.CLIP_MEAN)) / np.array(losses.CLIP_STD)
  np.testing.assert_allclose(standard, np.broadcast_to(expected, standard.shape), atol=1e-5)


def test_preprocess_errors():
  with pytest.raises(ValueError, match="preprocess='bicubic' is unknown"):
    losses.clip_preprocess(jnp.zeros((1, 8, 8, 3)), "bicubic", 4)
  with pytest.raises(ValueError, match=r"images must be RGB images \[B, H, W, 3\]"):
    losses.clip_preprocess(jnp.zeros((1, 3, 8, 8)), "release", 4)


# ---------------------------------------------------------------------------- directional loss


def test_directional_loss_parallel_antiparallel_orthogonal():
  orig = jnp.array([[1.0, 2.0, 3.0]] * 3)
  t0, t1 = jnp.array([0.0, 1.0, 0.0]), jnp.array([0.0, -1.0, 0.0])  # d_txt = (0, 2, 0)
  edit = orig - jnp.array([[0.0, 5.0, 0.0], [0.0, -0.1, 0.0], [3.0, 0.0, 0.0]])
  loss = losses.directional_clip_loss(orig, edit, t0, t1)
  np.testing.assert_allclose(loss, [0.0, 2.0, 1.0], atol=1e-6)


def test_directional_loss_finite_when_edit_equals_original():
  feat = jnp.ones((B, 4))
  t0, t1 = jnp.arange(4.0), jnp.zeros(4)
  loss, grad = jax.value_and_grad(
      lambda e: losses.directional_clip_loss(feat, e, t0, t1).sum())(feat)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, B * 1.0)


def test_directional_loss_shape_errors():
  with pytest.raises(ValueError, match="img_feat_orig .* must both be"):
    losses.directional_clip_loss(jnp.zeros((2, 4)), jnp.zeros((3, 4)), jnp.zeros(4), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"txt_feat1 has shape \(3, 4\)"):
    losses.directional_clip_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros(4),
                                 jnp.zeros((3, 4)))


def test_directional_loss_takes_per_image_text_features():
  rng = np.random.default_rng(0)
  f0, f1 = (jnp.asarray(rng.standard_normal((2, 4)), jnp.float32) for _ in range(2))
  t0, t1 = (jnp.asarray(rng.standard_normal((2, 4)), jnp.float32) for _ in range(2))
  per_image = losses.directional_clip_loss(f0, f1, t0, t1)
  for i in range(2):
    np.testing.assert_allclose(per_image[i], losses.directional_clip_loss(
        f0[i:i + 1], f1[i:i + 1], t0[i], t1[i])[0], rtol=1e-6)


# ---------------------------------------------------------------------------- tiny networks


def test_tiny_models_shapes_and_determinism(lm, tokenizer, images):
  assert set(lm.params) == {"clip", "vgg"}
  text = loss_models.encode_texts(lm, ["a photo of person", "a photo of person, smiling"])
  assert text.shape == (2, loss_models.TINY_CLIP_PROJECTION)
  feats = jax.jit(losses.clip_image_features, static_argnums=(0, 3, 4))(
      lm.clip_image_apply, lm.params["clip"], images[0], "release", lm.clip_image_size)
  assert feats.shape == (B, loss_models.TINY_CLIP_PROJECTION)
  taps = lm.vgg_apply(lm.params["vgg"], jnp.zeros((1, 32, 32, 3)))
  assert [t.shape[1:] for t in taps] == [(32, 32, 4), (16, 16, 8), (8, 8, 16), (4, 4, 32)]
  again = loss_models.load_loss_models(loss_models.LossModelConfig(), tokenizer=tokenizer)
  other = loss_models.load_loss_models(loss_models.LossModelConfig(tiny_seed=1), tokenizer)
  same = jax.tree.map(np.array_equal, lm.params, again.params)
  assert all(jax.tree.leaves(same))
  k = lm.params["vgg"]["features_0"]["kernel"]
  assert not np.array_equal(k, other.params["vgg"]["features_0"]["kernel"])


def test_vgg_layout_matches_torchvision_indices():
  layout = loss_models.vgg_conv_layout()
  assert [i for i, _, _ in layout] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
  assert layout[-1] == (21, 512, 512)


def test_encode_texts_rejects_a_bare_string(lm):
  with pytest.raises(ValueError, match="texts must be a non-empty list of strings"):
    loss_models.encode_texts(lm, "a photo")


def test_vgg_loss_zero_for_identical_positive_otherwise(lm, images):
  loss = jax.jit(losses.vgg_perceptual_loss, static_argnums=(0, 4))
  a, b = images
  same = loss(lm.vgg_apply, lm.params["vgg"], a, a, lm.vgg_input_size)
  diff = loss(lm.vgg_apply, lm.params["vgg"], a, b, lm.vgg_input_size)
  assert same.shape == diff.shape == (B,)
  np.testing.assert_array_equal(same, 0.0)
  assert np.all(diff > 0)
  with pytest.raises(ValueError, match="must have the same shape"):
    losses.vgg_perceptual_loss(lm.vgg_apply, lm.params["vgg"], a, b[:1], 32)


def _edit_loss(clip_apply, vgg_apply, sizes, preprocess, params, orig, edit, t0, t1):
  """L_dir and L_perc of the edited images (the shape of the optimiser's objective)."""
  clip_size, vgg_size = sizes
  f_orig = losses.clip_image_features(clip_apply, params["clip"], orig, preprocess, clip_size)
  f_edit = losses.clip_image_features(clip_apply, params["clip"], edit, preprocess, clip_size)
  l_dir = losses.directional_clip_loss(f_orig, f_edit, t0, t1).mean()
  l_perc = losses.vgg_perceptual_loss(vgg_apply, params["vgg"], edit, orig, vgg_size).mean()
  return l_dir, l_perc


@pytest.mark.parametrize("preprocess", losses.PREPROCESS_MODES)
def test_gradients_flow_from_both_losses(lm, images, preprocess):
  t0, t1 = loss_models.encode_texts(lm, ["a photo of person", "a photo of person, smiling"])
  fn = jax.jit(jax.jacrev(_edit_loss, argnums=6), static_argnums=(0, 1, 2, 3))
  g_dir, g_perc = fn(lm.clip_image_apply, lm.vgg_apply, (lm.clip_image_size, lm.vgg_input_size),
                     preprocess, lm.params, images[0], images[1], t0, t1)
  for g in (g_dir, g_perc):
    assert g.shape == images[1].shape
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ---------------------------------------------------------------------------- weight loading


def _tiny_vgg_state(widths=loss_models.TINY_VGG_WIDTHS):
  rng = np.random.default_rng(0)
  state = {"classifier.0.weight": np.zeros((3, 3), np.float32)}  # ignored
  for index, cin, cout in loss_models.vgg_conv_layout(widths):
    state[f"features.{index}.weight"] = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
    state[f"features.{index}.bias"] = rng.normal(size=(cout,)).astype(np.float32)
  return state


def test_vgg_safetensors_roundtrip_without_torch(tmp_path):
  state = _tiny_vgg_state()
  path = str(tmp_path / "vgg.safetensors")
  safetensors.numpy.save_file(state, path)
  params = loss_models.load_vgg_params(path, widths=loss_models.TINY_VGG_WIDTHS)
  np.testing.assert_array_equal(params["features_19"]["kernel"],
                                state["features.19.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["features_19"]["bias"], state["features.19.bias"])
  assert len(params) == 10


def test_vgg_loading_errors(tmp_path):
  widths = loss_models.TINY_VGG_WIDTHS
  missing = str(tmp_path / "nope.safetensors")
  with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
    loss_models.load_vgg_params(missing)
  state = _tiny_vgg_state()
  del state["features.21.bias"]
  path = str(tmp_path / "missing_key.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError, match=r"missing_key.safetensors lacks VGG16 weights "
                     r"features.21.bias"):
    loss_models.load_vgg_params(path, widths=widths)
  path = str(tmp_path / "wrong_width.safetensors")
  safetensors.numpy.save_file(_tiny_vgg_state(), path)
  with pytest.raises(ValueError, match=r"wrong_width.safetensors: features.0.weight has shape "
                     r"\(4, 3, 3, 3\), expected \(64, 3, 3, 3\)"):
    loss_models.load_vgg_params(path, widths=loss_models.VGG16_WIDTHS)  # VGG16's demanded
  # Without widths they are read from the file: a narrower VGG16-shaped network loads...
  params = loss_models.load_vgg_params(path)
  assert params["features_21"]["kernel"].shape == (3, 3, widths[3], widths[3])
  state = _tiny_vgg_state()  # ... but one whose layers disagree with each other does not
  state["features.5.weight"] = state["features.5.weight"][:, :2]
  path = str(tmp_path / "inconsistent.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError, match=r"inconsistent.safetensors: features.5.weight has shape "
                     r"\(8, 2, 3, 3\), expected \(8, 4, 3, 3\)"):
    loss_models.load_vgg_params(path)
  pickle = tmp_path / "vgg16.pth"
  pickle.write_bytes(b"not really a pickle")
  with pytest.raises(ValueError, match="vgg16.pth is a pickle.*allow_pickle=True"):
    loss_models.load_vgg_params(str(pickle))
  other = tmp_path / "vgg16.npz"
  other.write_bytes(b"")
  with pytest.raises(ValueError, match="unknown VGG16 weights format"):
    loss_models.load_vgg_params(str(other))
  broken = tmp_path / "broken.safetensors"
  broken.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
    loss_models.load_vgg_params(str(broken))


def test_clip_flax_checkpoints_roundtrip_without_torch(tmp_path, tokenizer, lm):
  config = loss_models.tiny_clip_config(tokenizer)
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  for safe in (False, True):
    directory = tmp_path / f"clip_safe_{safe}"
    model.save_pretrained(str(directory), params=lm.params["clip"], safe_serialization=safe)
    _, _, params = loss_models.load_clip(str(directory))
    same = jax.tree.map(np.array_equal, lm.params["clip"], params)
    assert all(jax.tree.leaves(same))


def test_clip_loading_errors(tmp_path, tokenizer, lm):
  with pytest.raises(FileNotFoundError, match="CLIP directory .*absent does not exist"):
    loss_models.load_clip(str(tmp_path / "absent"))
  config = loss_models.tiny_clip_config(tokenizer)
  empty = tmp_path / "no_weights"
  config.save_pretrained(str(empty))
  with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor"):
    loss_models.load_clip(str(empty))
  partial = tmp_path / "partial"
  config.save_pretrained(str(partial))
  params = dict(lm.params["clip"])
  del params["visual_projection"]
  with open(partial / "flax_model.msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  with pytest.raises(ValueError, match="flax_model.msgpack lacks CLIP weights "
                     "visual_projection.kernel"):
    loss_models.load_clip(str(partial))
  wrong = tmp_path / "wrong_shape"
  transformers.CLIPConfig(text_config=config.text_config.to_dict(),
                          vision_config=config.vision_config.to_dict(),
                          projection_dim=8).save_pretrained(str(wrong))
  with open(wrong / "flax_model.msgpack", "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, lm.params["clip"])))
  with pytest.raises(ValueError, match=r"wrong_shape/flax_model.msgpack: CLIP weight "
                     r"text_projection.kernel has shape \(32, 16\), expected \(32, 8\)"):
    loss_models.load_clip(str(wrong))
  with pytest.raises(ValueError, match="tiny random CLIP .* needs a tokenizer"):
    loss_models.load_loss_models(loss_models.LossModelConfig())
  with pytest.raises(ValueError, match="tiny_vgg_widths=.*must be 4 positive"):
    loss_models.LossModelConfig(tiny_vgg_widths=(4, 8))


def test_any_tokenizer_object_sizes_the_tiny_clip(tmp_path):
  tok = _hand_written_tokenizer(str(tmp_path))
  small = loss_models.load_loss_models(loss_models.LossModelConfig(), tokenizer=tok)
  assert small.params["clip"]["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[
      0] == len(tok)
  assert loss_models.encode_texts(small, ["a photo, smiling"]).shape == (
      1, loss_models.TINY_CLIP_PROJECTION)
