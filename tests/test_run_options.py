"""model.conv / block_remat / attention change results only by rounding (checked in float64).

Each option set is compared with the plain path (conv "xla", no block remat, standard
attention), whose parity with diffusers' PyTorch models tests/test_parity_models.py checks:
the value and the gradient w.r.t. lambda and x_T of a loss through the sampler's scan (step
remat "full", so block remat runs nested inside it), the CFG UNet calls and the VAE decoder.
In float64 a wrong gradient cannot hide behind float32 rounding. The fast conv alone is
checked in tests/test_fast_conv.py (values, VJPs incl. weights) and, as the default, by every
other test (tests/test_gradients.py: finite differences through the same pipeline).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import models, noise, pipeline, sampler, schedule

# Every program here, the plain path too, runs with torch_numerics (a UNet ~1e-5 away from
# diffusers' Flax numerics, tests/test_parity_models.py): block remat's recomputation is traced
# after the run options' context has exited and must re-enter them, or the gradient is ~1e-4 off.
PLAIN = dict(conv="xla")
# name: (options, max relative error). Each costs one compile of the gradient program (15-100 s;
# block remat's real recomputation makes it the dearest), so options that are exact to
# re-association share a program: a wrong one shows up in its combination.
# jax.nn.dot_product_attention computes its softmax in float32 whatever the input dtype, so
# "dot_product" is float32-accurate even in a float64 model.
# "dot_product" rides with the hoisted convolution and layer remat: a wrong conv or remat
# gradient is off by far more than its 1e-6 (a missed re-entry of the options: ~1e-4).
OPTIONS = {
    "blocks_chunked": (dict(block_remat="blocks", attention="chunked"), 1e-10),
    "hoisted_layers_dot_product": (dict(conv="fast_hoisted", block_remat="layers",
                                        attention="dot_product"), 1e-6),
}
STEPS = 2


@pytest.fixture(scope="module")
def tiny64():
  with jax.enable_x64(True):
    model = models.build_tiny(models.ModelConfig(dtype="float64"))
    emb = models.encode_prompts(model, ["a photo of person", "a smiling face", ""])
    yield model, pipeline.PromptPair(*(e.astype(jnp.float64) for e in emb))


def _value_and_grads(tiny64, options: dict):
  model, prompts = tiny64
  config = models.ModelConfig(dtype="float64", torch_numerics=True, **options)
  with jax.enable_x64(True):
    tables = schedule.step_tables(model.schedule, STEPS, 0.5)
    rn = noise.draw(jax.random.key(0), [1], (8, 8, 4), tables.sigma, jnp.float64)
    params = {"unet": model.params["unet"], "vae": model.params["vae"]}
    eps = models.make_eps_fn(model.unet, config)
    decode = models.make_decode_fn(model.vae, model.scaling_factor, config)

    def loss(lam, x_T):
      images = pipeline.render(eps, decode, params, x_T, rn.noise, lam, prompts, 7.5, tables,
                               sampler.SamplerConfig("ddim", "full"))
      return jnp.mean(jnp.sin(10 * images))
    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(
        jnp.asarray([0.3, 0.8], jnp.float64), rn.x_T)
    return float(value), [np.asarray(g) for g in grads]


@pytest.fixture(scope="module")
def plain(tiny64):
  return _value_and_grads(tiny64, PLAIN)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_equal_plain_path_float64(tiny64, plain, name):
  options, tolerance = OPTIONS[name]
  value, grads = _value_and_grads(tiny64, options)
  errors = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(grads, plain[1])]
  print(f"{name}: loss {value:.12g} vs {plain[0]:.12g}; grad rel err lambda {errors[0]:.1e}, "
        f"x_T {errors[1]:.1e}")
  assert grads[0].dtype == np.float64
  np.testing.assert_allclose(value, plain[0], rtol=tolerance)
  assert max(errors) <= tolerance


@pytest.mark.parametrize("level", ["blocks", "layers"])
def test_block_remat_is_in_the_program(tiny_model, level):
  eps = models.make_eps_fn(tiny_model.unet, models.ModelConfig(block_remat=level))
  x, emb = jnp.ones((2, 8, 8, 4)), jnp.ones((2, 77, 32))
  grad = jax.grad(lambda x: eps(tiny_model.params["unet"], x, 1, emb).sum())
  jaxpr = str(jax.make_jaxpr(grad)(x))
  assert jaxpr.count("optimization_barrier") >= 4  # one per remat.recompute_in_backward


def test_hoisted_eps_fn_prepares_and_accepts_both_trees(tiny_model):
  eps = models.make_eps_fn(tiny_model.unet, models.ModelConfig(conv="fast_hoisted"))
  params = tiny_model.params["unet"]
  prepared = sampler.prepare_params(eps, params)
  assert len(jax.tree.leaves(prepared)) > len(jax.tree.leaves(params))
  x, emb = jnp.ones((2, 8, 8, 4)), jnp.ones((2, 77, 32))
  eps = jax.jit(eps)  # one program per tree: eager calls would compile every op apart
  np.testing.assert_array_equal(eps(prepared, x, 1, emb), eps(params, x, 1, emb))
  assert sampler.prepare_params(models.make_eps_fn(tiny_model.unet), params) is params


@pytest.mark.parametrize("field,value", [("conv", "cudnn"), ("block_remat", "all"),
                                         ("attention", "flash")])
def test_unknown_option_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"model.{field}="):
    models.ModelConfig(**{field: value})


def test_recomputation_is_neither_merged_nor_hoisted_into_the_forward():
  """remat.recompute_in_backward really recomputes on XLA:CPU (jax.checkpoint does not: its
  optimisation barrier is expanded before CSE, which merges the recomputation back)."""
  from disentangle_jax import remat  # pylint: disable=g-import-not-at-top

  def block(x):
    return jnp.sin(jnp.sin(x) @ x)

  def dots(wrap) -> int:
    def loss(x):
      y = wrap(block)(x)
      return jnp.sum(jnp.cos(y @ y))
    text = jax.jit(jax.grad(loss)).lower(jnp.ones((16, 16))).compile().as_text()
    return text.count(" dot(")
  plain, ours = dots(lambda f: f), dots(remat.recompute_in_backward)
  print(f"dots: no remat {plain}, recompute_in_backward {ours}, "
        f"jax.checkpoint {dots(jax.checkpoint)}")
  assert ours == plain + 1  # the block's one forward dot, recomputed in the backward
  x = jnp.linspace(-1, 1, 256).reshape(16, 16)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(remat.recompute_in_backward(block)(x)))(x),
                             jax.grad(lambda x: jnp.sum(block(x)))(x), rtol=1e-6)
