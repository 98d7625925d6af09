"""flow_inversion.py with an analytic velocity (tests/analytic.py's spirit): the reverse Euler
steps against a numpy loop, and the residuals that make the sampler end exactly at z0."""
import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import flow_inversion, flow_sampler, flow_schedule, mixing

NUM_STEPS = 4


def _velocity(params, x, t, cond, embedded_guidance):
  """v(x, t, c) = w tanh(x) t / 1000 + mean(c tokens) + g / 10: smooth, depends on all inputs."""
  shift = cond["tokens"].mean(axis=(1, 2))[:, None, None, None]
  return params["w"] * jnp.tanh(x) * t / 1000 + shift + embedded_guidance / 10


def _inputs():
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  eps = rng.normal(size=z0.shape).astype(np.float32)
  c0 = {"tokens": rng.normal(size=(3, 5)).astype(np.float32)}
  neg = {"tokens": rng.normal(size=(3, 5)).astype(np.float32)}
  tables = flow_schedule.tables(flow_schedule.FlowScheduleConfig(shift=3.0), NUM_STEPS, "sd3")
  cond = mixing.mix(np.zeros(NUM_STEPS, np.float32), c0, c0)
  return z0, eps, c0, neg, tables, cond


def test_euler_inversion_is_the_reverse_loop():
  z0, _, c0, neg, tables, cond = _inputs()
  params, guidance = {"w": np.float32(0.7)}, 2.0
  got = jax.jit(lambda p: flow_inversion.euler_invert(_velocity, p, z0, cond, neg, guidance,
                                                      tables, embedded_guidance=3.5))(params)
  x = z0.astype(np.float64)
  shift_c, shift_u = c0["tokens"].mean(), neg["tokens"].mean()
  for i in reversed(range(NUM_STEPS)):
    t = float(tables.timesteps[i + 1]) if i + 1 < NUM_STEPS else 0.0
    base = 0.7 * np.tanh(x) * t / 1000 + 0.35
    v = (base + shift_u) + guidance * ((base + shift_c) - (base + shift_u))
    x = x + (float(tables.sigma[i]) - float(tables.sigma_next[i])) * v
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)


def test_residuals_pin_the_sampler_to_the_targets():
  """Injected at every step, the lambda = 0 run passes through xf(sigma_next_i) and ends at z0;
  with inject_steps = 2 the last steps are deterministic (zero residuals)."""
  z0, eps, _, neg, tables, cond = _inputs()
  params = {"w": np.float32(0.7)}

  @jax.jit
  def run(params, inject_steps):
    x_T, noise = flow_inversion.invert(_velocity, params, z0, eps, cond, neg, 2.0, tables,
                                       embedded_guidance=3.5, inject_steps=inject_steps)
    xs = flow_sampler.sample(_velocity, params, x_T, cond, neg, 2.0, tables,
                             embedded_guidance=3.5, noise=noise, trajectory=True)
    return noise, xs

  noise, xs = run(params, NUM_STEPS)
  targets = flow_inversion.pinning_targets(z0, eps, tables)
  np.testing.assert_allclose(xs, targets, rtol=0, atol=1e-5)
  np.testing.assert_allclose(xs[-1], z0, rtol=0, atol=1e-5)
  noise, _ = run(params, 2)  # traced inject_steps: the same program
  assert not np.asarray(noise[2:]).any() and np.asarray(noise[:2]).any()
  assert run._cache_size() == 1  # pylint: disable=protected-access
