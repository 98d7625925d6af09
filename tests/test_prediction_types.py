"""SD 2.x / SDXL scheduler options: v-prediction, timestep spacings, steps_offset and zero
terminal SNR, against diffusers' own DDIMScheduler / PNDMScheduler on an analytic predictor."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import errors, inversion, sampler, schedule
from tests import analytic

torch = pytest.importorskip("torch", reason="scheduler parity needs torch: pip install torch==2.13.0")
import diffusers  # noqa: E402  (diffusers' PyTorch schedulers need torch)

PARAMS = {"a": 0.3, "b": 0.5}
B, H, W, C, L, D = 2, 3, 3, 2, 4, 5
SD2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                     prediction_type="v_prediction")
V_FN = sampler.Predictor(analytic.eps_fn, "v_prediction")
# (timestep_spacing, steps_offset, rescale_betas_zero_snr) combinations SD 2.x-era configs use.
OPTIONS = [("leading", 1, False), ("trailing", 0, True), ("linspace", 0, False),
           ("leading", 0, True)]


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _config(spacing, offset, rescale, **kw):
  return dict(SD2_SCHEDULER, timestep_spacing=spacing, steps_offset=offset,
              rescale_betas_zero_snr=rescale, **kw)


def _inputs(tb):
  rng = np.random.default_rng(1)
  num_steps = len(tb.timesteps)
  x_T = rng.standard_normal((B, H, W, C))
  z = rng.standard_normal((num_steps, B, H, W, C))
  c0, c1, un = (rng.standard_normal((L, D)) for _ in range(3))
  lam = np.linspace(-0.2, 1.2, num_steps)
  cond = np.stack([l * c1 + (1 - l) * c0 for l in lam])
  return x_T, z, cond, un


def _cfg_np(x, t, c, un, g=7.5):
  emb = np.concatenate([np.broadcast_to(un, (B, L, D)), np.broadcast_to(c, (B, L, D))])
  e = analytic.eps_np(PARAMS, np.concatenate([x, x]), t, emb)
  return e[:B] + g * (e[B:] - e[:B])


@pytest.mark.parametrize("spacing,offset,rescale", OPTIONS)
@pytest.mark.parametrize("num_steps", [7, 20])
def test_tables_equal_diffusers_ddim(spacing, offset, rescale, num_steps):
  ref = diffusers.DDIMScheduler(**_config(spacing, offset, rescale, clip_sample=False))
  ref.set_timesteps(num_steps)
  cfg = schedule.ScheduleConfig.from_diffusers_config(_config(spacing, offset, rescale))
  tb = schedule.step_tables(cfg, num_steps)
  np.testing.assert_array_equal(tb.timesteps, ref.timesteps.numpy())
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  np.testing.assert_allclose(schedule.alphas_cumprod(cfg), ac, rtol=2e-6, atol=1e-7)
  if rescale:
    assert schedule.alphas_cumprod(cfg)[-1] == 0 and ac[-1] == 0


@pytest.mark.parametrize("spacing,offset,rescale", OPTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_v_prediction_ddim_equals_diffusers(spacing, offset, rescale, eta):
  """DDIMScheduler.step with prediction_type='v_prediction', the same per-step Gaussian z."""
  num_steps = 10
  ref = diffusers.DDIMScheduler(**_config(spacing, offset, rescale, clip_sample=False))
  ref.set_timesteps(num_steps)
  cfg = schedule.ScheduleConfig.from_diffusers_config(_config(spacing, offset, rescale))
  tb = schedule.step_tables(cfg, num_steps, eta)
  x_T, z, cond, un = _inputs(tb)
  x = torch.from_numpy(x_T)
  for i, t in enumerate(ref.timesteps):
    v = torch.from_numpy(_cfg_np(x.numpy(), int(t), cond[i], un))
    x = ref.step(v, t, x, eta=eta, variance_noise=torch.from_numpy(z[i])).prev_sample
  nz = tb.sigma[:, None, None, None, None] * z
  out = sampler.sample(V_FN, PARAMS, jnp.asarray(x_T), jnp.asarray(nz), jnp.asarray(cond),
                       jnp.asarray(un), 7.5, tb)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 12])
def test_v_prediction_plms_equals_diffusers_pndm(num_steps):
  """PNDM combines the raw v outputs, then converts with the current sample (as we do)."""
  ref = diffusers.PNDMScheduler(**SD2_SCHEDULER, skip_prk_steps=True)
  ref.set_timesteps(num_steps)
  tb = schedule.step_tables(schedule.ScheduleConfig.from_diffusers_config(SD2_SCHEDULER),
                            num_steps)
  x_T, _, cond, un = _inputs(tb)
  x = torch.from_numpy(x_T)
  cond_per_call = [cond[0]] + list(cond) if num_steps > 1 else list(cond)
  for k, t in enumerate(ref.timesteps):
    v = torch.from_numpy(_cfg_np(x.numpy(), int(t), cond_per_call[k], un))
    x = ref.step(v, t, x).prev_sample
  out = sampler.sample(V_FN, PARAMS, jnp.asarray(x_T), jnp.zeros((num_steps, B, H, W, C)),
                       jnp.asarray(cond), jnp.asarray(un), 7.5, tb, sampler.SamplerConfig("plms"))
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-5, atol=1e-5)


def test_v_prediction_inverse_step_equals_diffusers_ddim_inverse():
  """One DDIM inversion step (x at step i's next level -> its own level) vs DDIMInverseScheduler,
  which converts v with the current (less noisy) level, as ``inversion.ddim_invert`` does."""
  num_steps = 10
  ref = diffusers.DDIMInverseScheduler(**SD2_SCHEDULER, clip_sample=False)
  ref.set_timesteps(num_steps)
  tb = schedule.step_tables(schedule.ScheduleConfig.from_diffusers_config(SD2_SCHEDULER),
                            num_steps)
  x0, _, cond, un = _inputs(tb)
  i = 4  # an inner step: x sits at level alpha_prev_i = alphas_cumprod[t_i - 100]
  t = int(tb.timesteps[i])
  v = _cfg_np(x0, t, cond[0], un)
  want = ref.step(torch.from_numpy(v), t, torch.from_numpy(x0)).prev_sample.numpy()
  one = schedule.StepTables(*(np.asarray(a)[i:i + 1] for a in tb))
  got = inversion.ddim_invert(V_FN, PARAMS, jnp.asarray(x0), jnp.asarray(cond[0]),
                              jnp.asarray(un), 7.5, one)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_v_prediction_inversion_reconstructs_exactly():
  """Full injection with next pinning ends at z0 for a v-predictor too (residuals every step)."""
  tb = schedule.step_tables(schedule.ScheduleConfig.from_diffusers_config(SD2_SCHEDULER), 8)
  z0, eps, cond, un = _inputs(tb)
  run = inversion.invert(V_FN, PARAMS, jnp.asarray(z0), jnp.asarray(eps), jnp.asarray(cond[0]),
                         jnp.asarray(un), 7.5, tb, 8)
  out = sampler.sample(V_FN, PARAMS, run.x_T, run.noise,
                       jnp.broadcast_to(jnp.asarray(cond[0]), (8, L, D)), jnp.asarray(un), 7.5, tb)
  np.testing.assert_allclose(out, z0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("field,value", [
    ("prediction_type", "sample"), ("timestep_spacing", "karras"), ("clip_sample", True),
    ("thresholding", True), ("beta_schedule", "squaredcos_cap_v2")])
def test_unsupported_scheduler_options_are_refused_by_name(field, value):
  with pytest.raises(ValueError, match=field) as info:
    schedule.ScheduleConfig.from_diffusers_config(dict(SD2_SCHEDULER, **{field: value}))
  assert "\n" not in str(info.value)


def test_zero_snr_needs_v_prediction():
  with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
    schedule.ScheduleConfig(rescale_betas_zero_snr=True)
  with pytest.raises(errors.UserError, match="prediction_type"):
    sampler.Predictor(analytic.eps_fn, "x0")


@pytest.mark.parametrize("spacing,offset,rescale,num_steps,refused", [
    ("leading", 1, False, 7, None),
    ("trailing", 0, False, 10, None),  # 10 divides 1000: t_1 = t_0 - 100, as PNDM steps
    ("trailing", 0, False, 7, "timestep_spacing='trailing' at 7 steps"),
    ("linspace", 0, False, 10, "timestep_spacing='linspace' at 10 steps"),
    ("leading", 0, True, 10, "rescale_betas_zero_snr"),
])
def test_plms_equals_pndm_per_step_or_is_refused(spacing, offset, rescale, num_steps, refused):
  """PLMS against diffusers' PNDMScheduler (skip_prk_steps) + the same predictor, step by step
  (<= 1e-4 relative): equal in every spacing it runs, refused in one line where PNDM's first
  step is not a step between two of the run's levels, and on a zero-terminal-SNR config (PNDM
  ignores the option)."""
  cfg = schedule.ScheduleConfig.from_diffusers_config(_config(spacing, offset, rescale))
  if refused:
    with pytest.raises(ValueError, match=re.escape(refused)) as info:
      schedule.step_tables(cfg, num_steps, sampler="plms")
    assert "\n" not in str(info.value) and "sampler='ddim'" in str(info.value)
    return
  tb = schedule.step_tables(cfg, num_steps, sampler="plms")
  ref = diffusers.PNDMScheduler.from_config(_config(spacing, offset, rescale,
                                                    skip_prk_steps=True))
  ref.set_timesteps(num_steps)
  x_T, _, cond, un = _inputs(tb)
  x = torch.from_numpy(x_T)
  cond_per_call = [cond[0]] + list(cond)
  steps = []
  for k, t in enumerate(ref.timesteps):
    v = torch.from_numpy(_cfg_np(x.numpy(), int(t), cond_per_call[k], un))
    x = ref.step(v, t, x).prev_sample
    if k:  # call 0 is the first step's intermediate sample
      steps.append(x.numpy())
  traj = sampler.sample(V_FN, PARAMS, jnp.asarray(x_T), jnp.zeros((num_steps, B, H, W, C)),
                        jnp.asarray(cond), jnp.asarray(un), 7.5, tb,
                        sampler.SamplerConfig("plms"), trajectory=True)
  for i, want in enumerate(steps):
    rel = np.linalg.norm(np.asarray(traj[i]) - want) / np.linalg.norm(want)
    assert rel <= 1e-4, (i, rel)
