"""Parity of the loss networks and losses with PyTorch on identical random weights.

VGG16: a torch nn.Sequential laid out like torchvision's vgg16().features[:23] (torchvision is
not a dependency), saved as safetensors / .pth and loaded through loss_models' converter.
CLIP: transformers' PyTorch CLIPModel saved with save_pretrained(safe_serialization=True) and
loaded through loss_models.load_loss_models (PyTorch names converted in numpy).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import loss_models, losses
from tests import test_losses

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install torch==2.13.0")
F = torch.nn.functional
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

B = 2
VGG_SIZE = 32  # small VGG input (the real network uses 224) keeps the full-width net fast
TAP_INDICES = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3 in vgg16().features


def _torch_vgg16_features(widths=loss_models.VGG16_WIDTHS):
  """torchvision.models.vgg16().features[:23], written out (same module indices 0..22)."""
  layers, cin = [], 3
  for block, (width, depth) in enumerate(zip(widths, loss_models.VGG16_BLOCK_DEPTHS)):
    if block > 0:
      layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
    for _ in range(depth):
      layers += [torch.nn.Conv2d(cin, width, kernel_size=3, padding=1), torch.nn.ReLU()]
      cin = width
  return torch.nn.Sequential(*layers)


def _torch_taps(net, x):
  taps = []
  for i, layer in enumerate(net):
    x = layer(x)
    if i in TAP_INDICES:
      taps.append(x)
  return taps


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def torch_vgg(tmp_path_factory):
  torch.manual_seed(0)
  net = _torch_vgg16_features().eval()
  assert len(net) == 23 and isinstance(net[21], torch.nn.Conv2d)
  state = {f"features.{k}": v.contiguous() for k, v in net.state_dict().items()}
  path = str(tmp_path_factory.mktemp("vgg") / "vgg16_features.safetensors")
  safetensors_torch.save_file(state, path)
  return net, state, path


def test_vgg16_features_match_torch(torch_vgg):
  net, _, path = torch_vgg
  params = loss_models.load_vgg_params(path)
  x = np.random.default_rng(0).normal(size=(B, VGG_SIZE, VGG_SIZE, 3)).astype(np.float32)
  got = jax.jit(loss_models.make_vgg_fn(loss_models.VGG16Features()))(params, jnp.asarray(x))
  with torch.no_grad():
    want = [_nhwc(t) for t in _torch_taps(net, _nchw(x))]
  for g, w in zip(got, want):
    assert g.shape == w.shape
    err, scale = np.abs(np.asarray(g) - w).max(), np.abs(w).max()
    assert err <= 1e-5 * scale, (err, scale)  # measured ~4e-7 relative at every tap


def test_vgg_pickle_path_equals_safetensors(torch_vgg, tmp_path):
  _, state, path = torch_vgg
  pth = str(tmp_path / "vgg16.pth")
  torch.save(state, pth)
  from_pickle = loss_models.load_vgg_params(pth, allow_pickle=True)
  from_safe = loss_models.load_vgg_params(path)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, from_pickle, from_safe)))


@pytest.mark.parametrize("in_size", [48, 24])  # bilinear down- and upsampling to 32
def test_vgg_perceptual_loss_matches_torch(torch_vgg, in_size):
  net, _, path = torch_vgg
  params = loss_models.load_vgg_params(path)
  apply = loss_models.make_vgg_fn(loss_models.VGG16Features())
  rng = np.random.default_rng(1)
  a, b = (rng.uniform(size=(B, in_size, in_size, 3)).astype(np.float32) for _ in range(2))
  got = jax.jit(losses.vgg_perceptual_loss, static_argnums=(0, 4))(
      apply, params, jnp.asarray(a), jnp.asarray(b), VGG_SIZE)
  mean = torch.tensor(losses.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(losses.IMAGENET_STD).view(1, 3, 1, 1)

  def prep(x):
    x = F.interpolate(_nchw(x), size=(VGG_SIZE, VGG_SIZE), mode="bilinear", align_corners=False)
    return (x - mean) / std

  with torch.no_grad():
    want = sum((fa - fb).abs().mean(dim=(1, 2, 3))
               for fa, fb in zip(_torch_taps(net, prep(a)), _torch_taps(net, prep(b))))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  tokenizer = test_losses.tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
  torch.manual_seed(0)
  pt = transformers.CLIPModel(loss_models.tiny_clip_config(tokenizer)).eval()
  directory = str(tmp_path_factory.mktemp("clip"))
  pt.save_pretrained(directory, safe_serialization=True)
  lm = loss_models.load_loss_models(loss_models.LossModelConfig(clip_path=directory), tokenizer)
  return pt, lm


def test_clip_features_match_torch(clip_pair):
  pt, lm = clip_pair
  size = lm.clip_image_size
  pixels = np.random.default_rng(2).normal(size=(B, size, size, 3)).astype(np.float32)
  got = jax.jit(lm.clip_image_apply)(lm.params["clip"], jnp.asarray(pixels))
  texts = ["a photo of person", "a photo of person, smiling"]
  got_text = loss_models.encode_texts(lm, texts)
  tokens = lm.tokenizer(texts, padding="max_length", max_length=lm.clip_max_tokens,
                        truncation=True, return_tensors="pt")
  with torch.no_grad():
    want = pt.get_image_features(pixel_values=_nchw(pixels)).numpy()
    want_text = pt.get_text_features(input_ids=tokens["input_ids"],
                                     attention_mask=tokens["attention_mask"]).numpy()
  assert got.shape == want.shape == (B, loss_models.TINY_CLIP_PROJECTION)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_text), want_text, atol=1e-5)


@pytest.mark.parametrize("preprocess", losses.PREPROCESS_MODES)
def test_directional_loss_matches_torch_reference(clip_pair, preprocess):
  """Whole L_dir from images: the reference code's preprocessing written in torch."""
  pt, lm = clip_pair
  size = lm.clip_image_size
  in_size = size * 16 // 7  # 64 -> nearest x7 -> 448 -> avg pool 16 -> 28
  rng = np.random.default_rng(3)
  orig, edit = (rng.uniform(size=(B, in_size, in_size, 3)).astype(np.float32) for _ in range(2))
  t0, t1 = loss_models.encode_texts(lm, ["a photo of person", "a photo of person, smiling"])

  def loss_fn(params, o, e):
    fo = losses.clip_image_features(lm.clip_image_apply, params, o, preprocess, size)
    fe = losses.clip_image_features(lm.clip_image_apply, params, e, preprocess, size)
    return losses.directional_clip_loss(fo, fe, t0, t1)

  got = jax.jit(loss_fn)(lm.params["clip"], jnp.asarray(orig), jnp.asarray(edit))

  def torch_prep(x):
    x = _nchw(x)
    if preprocess == "release":
      return F.avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), 16)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(losses.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(losses.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std

  np.testing.assert_allclose(
      np.asarray(losses.clip_preprocess(jnp.asarray(orig), preprocess, size)),
      _nhwc(torch_prep(orig)), atol=1e-5)
  with torch.no_grad():
    d_img = pt.get_image_features(pixel_values=torch_prep(orig)) - pt.get_image_features(
        pixel_values=torch_prep(edit))
    d_txt = torch.from_numpy(np.array(t0 - t1))[None]
    want = 1 - F.cosine_similarity(d_img, d_txt, dim=-1)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
