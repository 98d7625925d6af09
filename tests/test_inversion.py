"""Real-image inversion: exact reconstruction, plain DDIM without injection, determinism, the
edit render, and the image-file checks (images drawn by the tests themselves)."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from disentangle_jax import inversion, mixing, models, noise, pipeline, real_images, sampler
from disentangle_jax import sampling, schedule

NUM_STEPS = 5
SEED = 42


@pytest.fixture(scope="module")
def setup(tiny_model):
  """(model, prompts, inverter, z0 [1, 8, 8, 4]) for the synthetic picture."""
  c0, c1, uncond = models.encode_prompts(tiny_model, ["a photo of church", "a photo of church, "
                                                      "snow", ""])
  prompts = pipeline.PromptPair(c0, c1, uncond)
  inverter = inversion.make_inverter(tiny_model, "next")
  image = real_images.synthetic(tiny_model.latent_size * tiny_model.vae_scale_factor)[None]
  z0 = inverter.encode(tiny_model.params["vae"], jnp.asarray(image))
  return tiny_model, prompts, inverter, z0


@pytest.fixture(scope="module")
def sample_fn(tiny_model):
  """The sampler, jitted once for the module: (params, x_T, noise, cond, uncond, tables)."""
  eps_fn = models.make_eps_fn(tiny_model.unet)
  return jax.jit(lambda p, x_T, nz, cond, un, tb: sampler.sample(eps_fn, p, x_T, nz, cond, un,
                                                                 7.5, tb))


def _invert(setup, inject_steps, seed=SEED, pin="next", inverter=None):
  model, prompts, default_inverter, z0 = setup
  cfg = inversion.InversionConfig(sampling.SamplingConfig(num_steps=NUM_STEPS),
                                  inject_steps=inject_steps, pin=pin)
  tables = schedule.step_tables(model.schedule, NUM_STEPS, 0.0)
  eps = noise.target_noise(jax.random.key(0), [seed], NUM_STEPS, z0.shape[1:])
  run = (inverter or default_inverter).invert(
      model.params["unet"], z0, eps, prompts.c0, prompts.uncond, jnp.float32(cfg.sampling.guidance),
      tables, jnp.int32(inject_steps))
  return run, tables


def _sample(setup, sample_fn, run, tables):
  """The lambda = 0 run (c_i = c0 at every step) of the ordinary sampler."""
  model, prompts, _, _ = setup
  cond = mixing.mix(np.zeros(NUM_STEPS, np.float32), prompts.c0, prompts.c1)
  return sample_fn(model.params["unet"], run.x_T, run.noise, cond, prompts.uncond, tables)


def test_full_injection_with_next_pinning_reconstructs_z0(setup, sample_fn):
  z0 = setup[3]
  run, tables = _invert(setup, inject_steps=NUM_STEPS)
  assert run.x_T.shape == z0.shape and run.noise.shape == (NUM_STEPS,) + z0.shape
  z_rec = _sample(setup, sample_fn, run, tables)
  scale = float(jnp.max(jnp.abs(z0)))
  np.testing.assert_allclose(z_rec, z0, atol=1e-5 * scale, rtol=0)
  # The inversion is not trivial: the residuals do real work.
  assert float(jnp.max(jnp.abs(run.noise))) > 1e-2 * scale


def test_current_pinning_is_the_releases_noisier_target(setup, sample_fn):
  model, _, _, z0 = setup
  tables = schedule.step_tables(model.schedule, NUM_STEPS, 0.0)
  eps = noise.target_noise(jax.random.key(0), [SEED], NUM_STEPS, z0.shape[1:])
  cur = inversion.pinning_targets(z0, eps, tables, "current")
  nxt = inversion.pinning_targets(z0, eps, tables, "next")
  a = tables.alpha[:, None, None, None, None]
  np.testing.assert_allclose(cur, np.sqrt(a) * z0 + np.sqrt(1 - a) * eps, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nxt[:-1], cur[1:], rtol=1e-6, atol=1e-6)  # xf_{i+1}
  np.testing.assert_array_equal(nxt[-1], z0)
  # With the release's pinning the lambda = 0 run ends one noise level away from z0.
  run, _ = _invert(setup, NUM_STEPS, pin="current",
                   inverter=inversion.make_inverter(model, "current"))
  z_rec = _sample(setup, sample_fn, run, tables)
  np.testing.assert_allclose(z_rec, cur[-1], atol=1e-4, rtol=0)
  assert float(jnp.max(jnp.abs(z_rec - z0))) > 1e-3


def test_no_injection_is_plain_ddim_inversion_and_sampling(setup, sample_fn):
  run, tables = _invert(setup, inject_steps=0)
  assert not np.any(np.asarray(run.noise))
  # x_T is the DDIM inversion whatever K is (ddim_invert's math: the analytic test below).
  np.testing.assert_array_equal(run.x_T, _invert(setup, inject_steps=NUM_STEPS)[0].x_T)
  plain = _sample(setup, sample_fn, noise.RunNoise(run.x_T, jnp.zeros_like(run.noise)), tables)
  np.testing.assert_array_equal(_sample(setup, sample_fn, run, tables), plain)
  assert float(jnp.max(jnp.abs(plain - setup[3]))) > 1e-3  # plain DDIM does not reconstruct


def test_partial_injection_zeroes_the_late_steps_without_recompiling(setup):
  inverter = setup[2]
  run, _ = _invert(setup, inject_steps=2)
  assert np.all(np.any(np.asarray(run.noise[:2]) != 0, axis=(1, 2, 3, 4)))
  assert not np.any(np.asarray(run.noise[2:]))
  _invert(setup, inject_steps=1)
  assert inverter.invert._cache_size() == 1  # pylint: disable=protected-access


def test_ddim_inversion_inverts_sampling_exactly_for_an_x_independent_predictor():
  def eps_fn(params, x, t, emb):  # ignores x: DDIM inversion is then exact
    c = jnp.mean(emb, axis=(1, 2))[:, None, None, None]
    return params * jnp.ones_like(x) * (t / 1000.0) + jnp.tanh(c)

  tables = schedule.step_tables(schedule.ScheduleConfig(), 6, 0.0)
  rng = np.random.default_rng(0)
  z0 = jnp.asarray(rng.standard_normal((2, 3, 3, 2)), jnp.float32)
  c0, un = (jnp.asarray(rng.standard_normal((4, 5)), jnp.float32) for _ in range(2))
  x_T = inversion.ddim_invert(eps_fn, 0.7, z0, c0, un, 7.5, tables)
  back = sampler.sample(eps_fn, 0.7, x_T, jnp.zeros((6,) + z0.shape), jnp.stack([c0] * 6), un,
                        7.5, tables)
  np.testing.assert_allclose(back, z0, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(x_T - z0))) > 0.5


def test_inversion_is_deterministic_per_seed_and_batch_independent(setup):
  a, _ = _invert(setup, NUM_STEPS)
  b, _ = _invert(setup, NUM_STEPS)
  c, _ = _invert(setup, NUM_STEPS, seed=SEED + 1)
  np.testing.assert_array_equal(a.noise, b.noise)
  np.testing.assert_array_equal(a.x_T, b.x_T)
  assert not np.allclose(a.noise, c.noise)
  key = jax.random.key(0)
  both = noise.target_noise(key, [7, SEED], NUM_STEPS, (8, 8, 4))
  np.testing.assert_array_equal(both[:, 1:], noise.target_noise(key, [SEED], NUM_STEPS,
                                                                    (8, 8, 4)))
  drawn = noise.draw(key, [SEED], (8, 8, 4), np.ones(NUM_STEPS))
  assert not np.allclose(both[:, 1:], drawn.noise)  # its own stream, not noise.draw's


def test_edit_with_given_weights_equals_pipeline_render(setup, sample_fn):
  model, prompts, _, z0 = setup
  run, tables = _invert(setup, inject_steps=3)
  eps_fn = models.make_eps_fn(model.unet)
  decode_fn = models.make_decode_fn(model.vae, model.scaling_factor)
  lam = mixing.hard_switch(NUM_STEPS, 2, 1.1)
  out = inversion.make_edit_fn(eps_fn, decode_fn)(model.params, z0, run, lam, prompts, 7.5,
                                                  tables)
  render = pipeline.make_render_fn(eps_fn, decode_fn, sampler.SamplerConfig())
  tol = dict(rtol=0, atol=1e-5)
  np.testing.assert_allclose(out.edited, render(model.params, run.x_T, run.noise, lam, prompts,
                                                7.5, tables), **tol)
  np.testing.assert_allclose(out.reconstruction,
                             render(model.params, run.x_T, run.noise, np.zeros(NUM_STEPS),
                                    prompts, 7.5, tables), **tol)
  np.testing.assert_allclose(out.z_rec, _sample(setup, sample_fn, run, tables), **tol)
  assert not np.allclose(out.edited, out.reconstruction)


def test_inversion_config_errors():
  with pytest.raises(ValueError, match="inject_steps=33 must be an integer in \\[0, num_steps=4"):
    inversion.InversionConfig(sampling.SamplingConfig(num_steps=4), inject_steps=33)
  with pytest.raises(ValueError, match="pin='later'"):
    inversion.InversionConfig(pin="later")


# ------------------------------------------------------------------------------------------
# Image files.


def _png(tmp_path, name, array, mode=None):
  path = tmp_path / name
  Image.fromarray(array, mode).save(path)
  return str(path)


def test_load_converts_modes_and_fit_crops(tmp_path):
  rgba = np.zeros((20, 40, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
  loaded = real_images.load(_png(tmp_path, "a.png", rgba))
  assert loaded.pixels.shape == (20, 40, 3) and loaded.mode == "RGBA"
  np.testing.assert_array_equal(loaded.pixels[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(loaded.pixels[0, -1], [255, 255, 255])  # onto white
  grey = real_images.load(_png(tmp_path, "g.png", np.full((9, 9), 77, np.uint8)))
  np.testing.assert_array_equal(grey.pixels, np.full((9, 9, 3), 77))
  pal = Image.new("P", (10, 10))
  pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  pal.putpixel((0, 0), 1)
  pal.save(tmp_path / "p.gif")
  np.testing.assert_array_equal(real_images.load(str(tmp_path / "p.gif")).pixels[0, 0],
                                [10, 20, 30])
  pixels, note = real_images.fit(loaded.pixels, 16)
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
  assert 0 <= pixels.min() and pixels.max() <= 1
  assert note == "resized 40x20 -> 32x16 and centre-cropped to 16x16 px"
  assert real_images.fit(np.zeros((16, 16, 3), np.uint8), 16)[1] is None


def _truncated(fmt):
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.mark.parametrize("name,content,error,message", [
    ("missing.png", None, FileNotFoundError, "does not exist"),
    ("notes.png", b"just some text, not pixels\n", ValueError, "not an image file"),
    ("cut.png", _truncated("PNG"), ValueError, "truncated or corrupt"),
    ("cut.jpg", _truncated("JPEG"), ValueError, "truncated or corrupt"),
])
def test_load_refuses_bad_files(tmp_path, name, content, error, message):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(error, match=message) as e:
    real_images.load(str(path))
  assert str(path) in str(e.value)


def test_load_refuses_bad_sizes_before_decoding(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="is 1x1 px, smaller than the minimum of 8"):
    real_images.load(_png(tmp_path, "dot.png", np.zeros((1, 1, 3), np.uint8)))
  wide = _png(tmp_path, "wide.png", np.zeros((10, 9000, 3), np.uint8))
  decoded = []
  monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
  monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: decoded.append(1))
  with pytest.raises(ValueError, match="9000x10 px, larger than the maximum of 8192"):
    real_images.load(wide)
  assert not decoded  # refused from the header alone


def test_truncated_images_cannot_be_silently_accepted(tmp_path, monkeypatch):
  monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(ValueError, match="LOAD_TRUNCATED_IMAGES"):
    real_images.load(_png(tmp_path, "ok.png", np.zeros((9, 9, 3), np.uint8)))


def test_synthetic_image():
  img = real_images.synthetic(64)
  assert img.shape == (64, 64, 3) and img.dtype == np.float32
  assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.05
  np.testing.assert_array_equal(img, real_images.synthetic(64))
