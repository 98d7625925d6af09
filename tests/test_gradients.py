"""d(loss)/d(lambda) through sampler + VAE decoder equals central finite differences (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import models, noise, pipeline, sampler, schedule

NUM_STEPS = 4
FD_STEP = 1e-5


@pytest.fixture(scope="module")
def tiny64():
  with jax.enable_x64(True):
    model = models.build_tiny(models.ModelConfig(dtype="float64", tiny_latent_size=8))
    c0, c1, un = models.encode_prompts(model, ["a photo of person", "a photo of person, smiling",
                                               ""])
    yield model, pipeline.PromptPair(c0.astype(jnp.float64), c1.astype(jnp.float64),
                                     un.astype(jnp.float64))


# Without remat (DDIM, stochastic) and with step remat (PLMS). test_sampler.py checks that every
# remat policy gives the same gradients for both samplers; each case here costs ~30 s to compile.
@pytest.mark.parametrize("kind,remat,eta", [("ddim", "none", 0.5), ("plms", "full", 0.0)])
def test_lambda_gradient_matches_central_differences(tiny64, kind, remat, eta):
  model, prompts = tiny64
  with jax.enable_x64(True):
    tables = schedule.step_tables(model.schedule, NUM_STEPS, eta)
    rn = noise.draw(jax.random.key(0), [3], (8, 8, 4), tables.sigma, jnp.float64)
    weights = jax.random.uniform(jax.random.key(1), (1, 64, 64, 3), jnp.float64)
    render = pipeline.make_render_fn(models.make_eps_fn(model.unet),
                                     models.make_decode_fn(model.vae, model.scaling_factor),
                                     sampler.SamplerConfig(kind, remat))

    def loss(lam, params):
      images = render(params, rn.x_T, rn.noise, lam, prompts, 3.0, tables)
      return jnp.mean(weights * images)

    # One compiled program: its value serves the differences.
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    lam = jnp.asarray([0.1, 0.4, 0.9, 1.1], jnp.float64)
    grad = value_and_grad(lam, model.params)[1]
    fd = np.array([(value_and_grad(lam.at[i].add(FD_STEP), model.params)[0]
                    - value_and_grad(lam.at[i].add(-FD_STEP), model.params)[0]) / (2 * FD_STEP)
                   for i in range(NUM_STEPS)])
  assert grad.dtype == jnp.float64
  assert np.all(np.abs(fd) > 1e-9), f"degenerate test: finite differences {fd}"
  # Relative error of the gradient vector. Per component, central differences of a loss ~0.3
  # carry ~1e-12 of rounding noise, which is not small next to the smallest component (~1e-7).
  rel = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
  print(f"{kind} remat={remat}: |grad - fd| / |fd| = {rel:.2e}")
  assert rel <= 1e-5, f"relative error {rel:.2e}: grad {np.asarray(grad)} vs fd {fd}"
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-6 * np.abs(fd).max())
