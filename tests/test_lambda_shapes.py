"""The lambda shapes mixing accepts (per step [T] / [T, B], per token [T, L] / [T, B, L]), the
per-token lambda's gradient, weights files and the learned per-token run of launch.disentangle."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import errors, mixing, sampler, schedule, weights_file
from tests import analytic
from tests.conftest import DISENTANGLE

T, B, L, D, P = 3, 2, 4, 5, 3
FD_STEP = 1e-5


def _pair(batch=None, pooled=False, seed=0):
  rng = np.random.default_rng(seed)
  shape = (L, D) if batch is None else (batch, L, D)
  c0, c1 = (jnp.asarray(rng.standard_normal(shape)) for _ in range(2))
  if not pooled:
    return c0, c1
  p = (1, P) if batch is None else (batch, 1, P)
  return ({"tokens": c0, "pooled": jnp.asarray(rng.standard_normal(p))},
          {"tokens": c1, "pooled": jnp.asarray(rng.standard_normal(p))})


@pytest.mark.parametrize("lam,batch,shape", [
    (np.zeros(T), None, (T, L, D)),  # one schedule
    (np.zeros((T, B)), None, (T, B, L, D)),  # one per seed, shared prompts
    (np.zeros((T, B)), B, (T, B, L, D)),  # one per seed, per-seed prompts
    (mixing.PerToken(np.zeros((T, L))), None, (T, L, D)),
    (mixing.PerToken(np.zeros((T, L))), B, (T, B, L, D)),
    (mixing.PerToken(np.zeros((T, B, L))), None, (T, B, L, D)),
    (mixing.PerToken(np.zeros((T, B, L))), B, (T, B, L, D)),
])
def test_accepted_shapes(lam, batch, shape):
  c0, c1 = _pair(batch)
  assert mixing.mix(lam, c0, c1).shape == shape


@pytest.mark.parametrize("lam,batch,given", [
    (np.zeros((T, B, L)), None, "(3, 2, 4)"),  # per token without the wrapper
    (np.zeros((T, 3)), B, "(3, 3)"),  # per seed, but not this batch
    (np.zeros(()), None, "()"),
    (mixing.PerToken(np.zeros((T, L + 1))), None, "PerToken((3, 5))"),  # not the token count
    (mixing.PerToken(np.zeros(T)), None, "PerToken((3,))"),
    (mixing.PerToken(np.zeros((T, 3, L))), B, "PerToken((3, 3, 4))"),
])
def test_a_wrong_shape_is_one_error_naming_lambda_the_shape_and_the_accepted_ones(lam, batch,
                                                                                 given):
  c0, c1 = _pair(batch)
  with pytest.raises(errors.UserError) as e:
    mixing.mix(lam, c0, c1)
  msg = str(e.value)
  assert msg.startswith(f"lambda has shape {given},"), msg
  assert "[T] or [T, " in msg and f"PerToken([T, {L}])" in msg, msg


def test_the_wrapper_not_the_shape_decides_when_tokens_equal_seeds():
  """[T, N] with N = L = B: a plain array is one lambda per seed, PerToken one per token."""
  c0, c1 = _pair(batch=L)
  lam = np.zeros((T, L), np.float32)
  lam[:, 1] = 1.0  # seed 1 (plain) / token 1 (wrapped) takes c1
  per_seed = mixing.mix(jnp.asarray(lam), c0, c1)
  np.testing.assert_array_equal(per_seed[:, 1], jnp.broadcast_to(c1[1], (T, L, D)))
  np.testing.assert_array_equal(per_seed[:, 0], jnp.broadcast_to(c0[0], (T, L, D)))
  per_token = mixing.mix(mixing.PerToken(jnp.asarray(lam)), c0, c1)
  np.testing.assert_array_equal(per_token[:, :, 1], jnp.broadcast_to(c1[:, 1], (T, L, D)))
  np.testing.assert_array_equal(per_token[:, :, 0], jnp.broadcast_to(c0[:, 0], (T, L, D)))


def test_per_token_weights_mix_each_token_and_the_pooled_vector_with_the_token_mean():
  c0, c1 = _pair(pooled=True)
  lam = jnp.asarray(np.random.default_rng(1).uniform(-0.2, 1.2, (T, L)))
  out = mixing.mix(mixing.PerToken(lam), c0, c1)
  np.testing.assert_allclose(
      out["tokens"], lam[..., None] * c1["tokens"] + (1 - lam[..., None]) * c0["tokens"],
      rtol=1e-12)
  mean = jnp.mean(lam, axis=1)[:, None, None]
  np.testing.assert_allclose(out["pooled"], mean * c1["pooled"] + (1 - mean) * c0["pooled"],
                             rtol=1e-12)
  # Equal weights over the tokens are the per-step mix, bit for bit.
  step = jnp.asarray([0.0, 0.4, 1.1])
  equal = mixing.mix(mixing.PerToken(jnp.repeat(step[:, None], L, 1)), c0, c1)
  jax.tree.map(np.testing.assert_array_equal, equal, mixing.mix(step, c0, c1))


def _tree_eps(params, x, t, emb):
  """Analytic predictor that weighs every token differently (so each token's weight steers the
  latents its own way) plus a pooled term."""
  w = jnp.arange(1, L + 1, dtype=x.dtype) / L
  tok = jnp.einsum("nld,l->n", emb["tokens"], w)[:, None, None, None] / D
  pooled = jnp.mean(emb["pooled"], axis=(1, 2))[:, None, None, None]
  return (analytic.eps_fn(params, x, t, emb["tokens"]) + 0.3 * jnp.tanh(tok + 0.1 * x)
          + 0.2 * jnp.sin(pooled + x))


def test_per_token_gradient_equals_central_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    tables = schedule.step_tables(schedule.ScheduleConfig(), T, 0.0)
    x_T = jnp.asarray(rng.standard_normal((B, 3, 3, 2)))
    c0, c1 = _pair(pooled=True, seed=2)
    un = jax.tree.map(jnp.zeros_like, c0)
    weights = jnp.asarray(rng.standard_normal((B, 3, 3, 2)))

    @jax.jit
    def loss(lam):
      cond = mixing.mix(mixing.PerToken(lam), c0, c1)
      out = sampler.sample(_tree_eps, {"a": 0.3, "b": 0.5}, x_T, jnp.zeros((T,) + x_T.shape),
                           cond, un, 3.0, tables, sampler.SamplerConfig("plms", "full"))
      return jnp.sum(weights * out)

    lam = jnp.asarray(rng.uniform(0.0, 1.1, (T, L)))
    grad = jax.jit(jax.grad(loss))(lam)
    fd = np.zeros((T, L))
    for i in range(T):
      for l in range(L):
        fd[i, l] = (loss(lam.at[i, l].add(FD_STEP)) - loss(lam.at[i, l].add(-FD_STEP))) / (
            2 * FD_STEP)
  assert grad.shape == (T, L) and grad.dtype == jnp.float64
  assert np.all(np.abs(fd) > 1e-9), f"degenerate test: finite differences {fd}"
  assert len({round(float(v), 6) for v in fd[0]}) == L, "tokens must not steer alike"
  rel = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
  assert rel <= 1e-7, f"relative error {rel:.2e}: grad {np.asarray(grad)} vs fd {fd}"


def test_weights_file_round_trip_per_token(tmp_path):
  lam = np.float32([[0.0, 0.1], [1.0, 1.1], [1.2, 0.9]])
  w = weights_file.LearnedWeights(lam=weights_file.as_tuple(lam), prompt="a",
                                  target_prompt="a, b",
                                  num_steps=3, sampler="ddim", eta=0.0, guidance=7.5,
                                  schedule={}, lambda_shape="per_token")
  path = str(tmp_path / "weights.json")
  weights_file.write(path, w)
  back = weights_file.read(path)
  assert back.lambda_shape == "per_token"
  np.testing.assert_array_equal(np.asarray(back.lam, np.float32), lam)
  with pytest.raises(ValueError, match="holds a per_token lambda"):
    weights_file.check_compatible(back, 3, "ddim")
  data = json.loads(open(path).read())
  data["lambda"][1] = [1.0]  # ragged
  (tmp_path / "ragged.json").write_text(json.dumps(data))
  with pytest.raises(errors.UserError, match="not a rectangular"):
    weights_file.read(str(tmp_path / "ragged.json"))
  per_step = weights_file.LearnedWeights(lam=(0.0, 1.0, 1.0), prompt="a", target_prompt="a, b",
                                         num_steps=3, sampler="ddim", eta=0.0, guidance=7.5,
                                         schedule={})
  assert "lambda_shape" not in per_step.to_json()  # per-step files are unchanged


@pytest.mark.slow
def test_per_token_lambda_is_learned_by_the_program(cli, tmp_path):
  out = cli.run("disentangle", tmp_path / "run", *DISENTANGLE[:3],
                "--config.optimizer.iterations=2", "--config.lambda_shape=per_token")
  assert out.returncode == 0, out.stderr[-3000:]
  path = tmp_path / "run" / "weights.json"
  learned = weights_file.read(str(path))
  lam = np.asarray(learned.lam)
  assert learned.lambda_shape == "per_token" and lam.shape[0] == 4 and lam.shape[1] > 1
  init = np.repeat(np.asarray(learned.init_lambda)[:, None], lam.shape[1], axis=1)
  assert not np.allclose(lam, init), "the per-token lambda did not move"
  assert len(learned.loss_history) == 2
