"""Conditioning as a pytree (SDXL: token embeddings + pooled embedding, mixed with one lambda)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import errors, mixing, sampler, schedule
from tests import analytic

PARAMS = {"a": 0.3, "b": 0.5}
B, H, W, C, L, D, P = 2, 3, 3, 2, 4, 5, 3


def tree_eps_fn(params, x, t, emb):
  """The analytic predictor plus a pooled term: emb = {"tokens": [N,L,D], "pooled": [N,1,P]}."""
  pooled = jnp.mean(emb["pooled"], axis=(1, 2)).astype(x.dtype)[:, None, None, None]
  return analytic.eps_fn(params, x, t, emb["tokens"]) + 0.2 * jnp.sin(pooled + x)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(num_steps=5):
  rng = np.random.default_rng(3)
  tb = schedule.step_tables(schedule.ScheduleConfig(), num_steps, 0.0)
  x_T = jnp.asarray(rng.standard_normal((B, H, W, C)))
  c0, c1, un = ({"tokens": jnp.asarray(rng.standard_normal((L, D))),
                 "pooled": jnp.asarray(rng.standard_normal((1, P)))} for _ in range(3))
  return tb, x_T, jnp.zeros((num_steps, B, H, W, C)), c0, c1, un


def test_mix_applies_the_same_lambda_to_every_leaf():
  _, _, _, c0, c1, _ = _inputs()
  lam = jnp.asarray([0.0, 0.5, 1.15])
  got = mixing.mix(lam, c0, c1)
  for k in c0:
    np.testing.assert_array_equal(got[k], mixing.mix(lam, c0[k], c1[k]))
  with pytest.raises(errors.UserError, match="c0 is"):
    mixing.mix(lam, c0, {"tokens": c1["tokens"]})


@pytest.mark.parametrize("kind", ["ddim", "plms"])
def test_tree_conditioning_samples_and_differentiates_through_both_leaves(kind):
  tb, x_T, nz, c0, c1, un = _inputs()

  def loss(lam, c1):
    out = sampler.sample(tree_eps_fn, PARAMS, x_T, nz, mixing.mix(lam, c0, c1), un, 7.5, tb,
                         sampler.SamplerConfig(kind))
    return jnp.sum(out**2)

  lam = jnp.linspace(0.0, 1.0, 5)
  grad = jax.jit(jax.grad(loss))  # one program for both calls (eagerly, one per op)
  g_tok = grad(lam, {"tokens": c1["tokens"], "pooled": c0["pooled"]})
  g_pool = grad(lam, {"tokens": c0["tokens"], "pooled": c1["pooled"]})
  assert np.all(np.abs(g_tok) > 0) and np.all(np.abs(g_pool) > 0)  # each leaf alone steers


def test_a_single_leaf_tree_equals_the_plain_array():
  tb, x_T, nz, c0, c1, un = _inputs()
  lam = jnp.linspace(0.0, 1.0, 5)
  plain = sampler.sample(analytic.eps_fn, PARAMS, x_T, nz, mixing.mix(lam, c0["tokens"],
                         c1["tokens"]), un["tokens"], 7.5, tb)
  tree = sampler.sample(lambda p, x, t, e: analytic.eps_fn(p, x, t, e["t"]), PARAMS, x_T, nz,
                        mixing.mix(lam, {"t": c0["tokens"]}, {"t": c1["tokens"]}),
                        {"t": un["tokens"]}, 7.5, tb)
  np.testing.assert_array_equal(tree, plain)


def test_tree_shape_errors_name_the_input():
  tb, x_T, nz, c0, c1, un = _inputs()
  cond = mixing.mix(jnp.zeros(5), c0, c1)
  with pytest.raises(ValueError, match="uncond is"):
    sampler.sample(tree_eps_fn, PARAMS, x_T, nz, cond, un["tokens"], 7.5, tb)
  with pytest.raises(ValueError, match="cond has shape"):
    sampler.sample(tree_eps_fn, PARAMS, x_T, nz, dict(cond, pooled=cond["pooled"][:3]), un,
                   7.5, tb)
