"""Sampler math against independent reference loops, diffusers' schedulers, and compile counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import mixing, noise, sampler, schedule
from tests import analytic

PARAMS = {"a": 0.3, "b": 0.5}
B, H, W, C, L, D = 2, 3, 3, 2, 4, 5


def _inputs(num_steps, eta=0.0, dtype=np.float64):
  rng = np.random.default_rng(0)
  tb = schedule.step_tables(schedule.ScheduleConfig(), num_steps, eta)
  x_T = rng.standard_normal((B, H, W, C)).astype(dtype)
  z = rng.standard_normal((num_steps, B, H, W, C)).astype(dtype)
  nz = tb.sigma.reshape(-1, 1, 1, 1, 1).astype(dtype) * z
  c0, c1, un = (rng.standard_normal((L, D)).astype(dtype) for _ in range(3))
  lam = np.linspace(-0.2, 1.2, num_steps).astype(dtype)
  cond = np.stack([l * c1 + (1 - l) * c0 for l in lam])
  return tb, x_T, nz, z, cond, un


def _cfg_np(x, t, c, un, g):
  emb = np.concatenate([np.broadcast_to(un, (B, L, D)), np.broadcast_to(c, (B, L, D))])
  e = analytic.eps_np(PARAMS, np.concatenate([x, x]), t, emb)
  return e[:B] + g * (e[B:] - e[:B])


def _ddim_reference(tb, x, nz, cond, un, g):
  for i in range(len(tb.timesteps)):
    e = _cfg_np(x, tb.timesteps[i], cond[i], un, g)
    a, ap, s = tb.alpha[i], tb.alpha_prev[i], tb.sigma[i]
    x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - s**2) * e + nz[i]
  return x


def _plms_reference(tb, x, cond, un, g):
  """The reference release's PLMSSampler loop (ldm/models/diffusion/plms.py), in numpy."""
  def x_prev(x, e, i):
    a, ap = tb.alpha[i], tb.alpha_prev[i]
    x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    return np.sqrt(ap) * x0 + np.sqrt(1 - ap) * e

  old_eps = []
  for i in range(len(tb.timesteps)):
    e_t = _cfg_np(x, tb.timesteps[i], cond[i], un, g)
    if not old_eps:
      e_next = _cfg_np(x_prev(x, e_t, i), tb.next_timesteps[i], cond[i], un, g)
      e_prime = (e_t + e_next) / 2
    elif len(old_eps) == 1:
      e_prime = (3 * e_t - old_eps[-1]) / 2
    elif len(old_eps) == 2:
      e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    else:
      e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    x = x_prev(x, e_prime, i)
    old_eps.append(e_t)
  return x


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("eta", [0.0, 0.8])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_ddim_matches_reference_loop(eta, remat):
  tb, x_T, nz, _, cond, un = _inputs(12, eta)
  out = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.asarray(nz),
                       jnp.asarray(cond), jnp.asarray(un), 7.5, tb,
                       sampler.SamplerConfig("ddim", remat))
  np.testing.assert_allclose(out, _ddim_reference(tb, x_T, nz, cond, un, 7.5), rtol=1e-12,
                             atol=1e-12)


@pytest.mark.parametrize("num_steps", [2, 3, 4, 11])
def test_plms_matches_reference_release_loop(num_steps):
  tb, x_T, nz, _, cond, un = _inputs(num_steps)
  out = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.zeros_like(nz),
                       jnp.asarray(cond), jnp.asarray(un), 7.5, tb,
                       sampler.SamplerConfig("plms", "full"))
  np.testing.assert_allclose(out, _plms_reference(tb, x_T, cond, un, 7.5), rtol=1e-12,
                             atol=1e-12)


TORCH_REASON = "scheduler parity needs torch: pip install torch==2.13.0"


def _sd_scheduler(cls, **kw):
  pytest.importorskip("torch", reason=TORCH_REASON)
  import diffusers
  return getattr(diffusers, cls)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 set_alpha_to_one=False, steps_offset=1, **kw)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_ddim_scheduler(eta):
  """diffusers' DDIMScheduler.step, fed the same per-step Gaussian z as variance_noise."""
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  tb, x_T, nz, z, cond, un = _inputs(15, eta)
  ref = _sd_scheduler("DDIMScheduler", clip_sample=False)
  ref.set_timesteps(15)
  x = torch.from_numpy(x_T)
  for i, t in enumerate(ref.timesteps):
    e = torch.from_numpy(_cfg_np(x.numpy(), int(t), cond[i], un, 7.5))
    x = ref.step(e, t, x, eta=eta, variance_noise=torch.from_numpy(z[i])).prev_sample
  out = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.asarray(nz),
                       jnp.asarray(cond), jnp.asarray(un), 7.5, tb)
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-5)


def test_plms_matches_diffusers_pndm_scheduler():
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  tb, x_T, nz, _, cond, un = _inputs(15)
  ref = _sd_scheduler("PNDMScheduler", skip_prk_steps=True)
  ref.set_timesteps(15)
  x = torch.from_numpy(x_T)
  # PNDM calls the model 16 times: step 0's extra call at t_1 uses step 0's embedding.
  cond_per_call = [cond[0]] + list(cond)
  for k, t in enumerate(ref.timesteps):
    e = torch.from_numpy(_cfg_np(x.numpy(), int(t), cond_per_call[k], un, 7.5))
    x = ref.step(e, t, x).prev_sample
  out = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.zeros_like(nz),
                       jnp.asarray(cond), jnp.asarray(un), 7.5, tb, sampler.SamplerConfig("plms"))
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-5)


def test_changing_lambda_guidance_noise_or_eta_does_not_recompile():
  traces = []

  def run(lam, guidance, x_T, nz, tb, c0, c1, un):
    traces.append(1)
    return sampler.sample(analytic.eps_fn, PARAMS, x_T, nz, mixing.mix(lam, c0, c1), un,
                          guidance, tb)

  run = jax.jit(run)
  for k, eta in enumerate([0.0, 0.3, 1.0]):
    tb, x_T, nz, _, cond, un = _inputs(6, eta)
    lam = np.full((6,), 0.1 * k)
    out = run(lam, 7.5 - k, x_T + k, nz, tb, cond[0], cond[-1], un)
    assert np.all(np.isfinite(out))
  assert len(traces) == 1
  run(np.zeros(7), 7.5, x_T, np.zeros((7,) + x_T.shape), schedule.step_tables(
      schedule.ScheduleConfig(), 7), cond[0], cond[-1], un)
  assert len(traces) == 2  # a new step count is a new program (the counter can fail)


@pytest.mark.parametrize("kind", ["ddim", "plms"])
def test_remat_policies_do_not_change_values_or_gradients(kind):
  tb, x_T, nz, _, cond, un = _inputs(5)

  def loss(lam, remat):
    c = mixing.mix(lam, jnp.asarray(cond[0]), jnp.asarray(cond[-1]))
    out = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.asarray(nz), c,
                         jnp.asarray(un), 7.5, tb, sampler.SamplerConfig(kind, remat))
    return jnp.sum(out**2)

  lam = jnp.linspace(0.0, 1.0, 5)
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # eagerly: per op
  ref = value_and_grad(lam, "none")
  for remat in sampler.REMAT_POLICIES:
    got = value_and_grad(lam, remat)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-10)
  assert np.all(np.abs(ref[1]) > 0)


def test_one_step_plms_is_a_ddim_step():
  tb, x_T, nz, _, cond, un = _inputs(1)
  args = (analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.zeros_like(nz), jnp.asarray(cond),
          jnp.asarray(un), 7.5, tb)
  np.testing.assert_allclose(sampler.sample(*args, sampler.SamplerConfig("plms")),
                             sampler.sample(*args, sampler.SamplerConfig("ddim")), rtol=1e-12)


def test_per_batch_embeddings_match_shared_embeddings():
  tb, x_T, nz, _, cond, un = _inputs(4)
  shared = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.asarray(nz),
                          jnp.asarray(cond), jnp.asarray(un), 7.5, tb)
  per_b = jnp.broadcast_to(jnp.asarray(cond)[:, None], (4, B, L, D))
  got = sampler.sample(analytic.eps_fn, PARAMS, jnp.asarray(x_T), jnp.asarray(nz), per_b,
                       jnp.asarray(un), 7.5, tb)
  np.testing.assert_allclose(got, shared, rtol=1e-12)


@pytest.mark.parametrize("what,match", [
    ("noise", "noise has shape"), ("cond", "cond has shape"), ("uncond", "uncond has shape"),
    ("x_T", "x_T must be"), ("cond_batch", "cond has batch")])
def test_shape_errors_name_the_input(what, match):
  tb, x_T, nz, _, cond, un = _inputs(4)
  args = dict(x_T=x_T, noise=nz, cond=cond, uncond=un)
  if what == "noise":
    args["noise"] = nz[:3]
  elif what == "cond":
    args["cond"] = cond[:3]
  elif what == "uncond":
    args["uncond"] = un[:, :2]
  elif what == "x_T":
    args["x_T"] = x_T[0]
  else:
    args["cond"] = np.broadcast_to(cond[:, None], (4, B + 1, L, D))
  with pytest.raises(ValueError, match=match):
    sampler.sample(analytic.eps_fn, PARAMS, guidance=7.5, tables=tb,
                   **{k: jnp.asarray(v) for k, v in args.items()})


def test_bad_sampler_config_is_refused():
  with pytest.raises(ValueError, match="sampler.kind"):
    sampler.SamplerConfig(kind="euler")
  with pytest.raises(ValueError, match="sampler.remat"):
    sampler.SamplerConfig(remat="sometimes")
