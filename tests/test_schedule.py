"""The schedule equals diffusers' schedulers built from SD v1's scheduler_config.json.

Timesteps must be identical; alphas agree to float32 rounding (diffusers' float32 linspace and
cumprod vs our float64).
"""
import numpy as np
import pytest

from disentangle_jax import schedule

torch = pytest.importorskip("torch", reason="scheduler parity needs torch: pip install torch==2.13.0")
import diffusers  # noqa: E402  (diffusers' PyTorch schedulers need torch)

SD_V1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1,
                       clip_sample=False)


@pytest.mark.parametrize("num_steps", [1, 7, 10, 50])
def test_ddim_timesteps_and_alphas_equal_diffusers(num_steps):
  ref = diffusers.DDIMScheduler(**SD_V1_SCHEDULER)
  ref.set_timesteps(num_steps)
  cfg = schedule.ScheduleConfig()
  tb = schedule.step_tables(cfg, num_steps)
  np.testing.assert_array_equal(tb.timesteps, ref.timesteps.numpy())
  ac = ref.alphas_cumprod.numpy()
  # Timesteps are identical; alphas agree to float32 rounding: diffusers computes them with
  # torch's float32 linspace (a vectorised kernel whose rounding depends on the CPU), we in
  # float64.
  np.testing.assert_allclose(schedule.alphas_cumprod(cfg), ac, rtol=1.5e-6, atol=0)
  np.testing.assert_allclose(tb.alpha, ac[ref.timesteps.numpy()], rtol=1.5e-6, atol=0)
  prev = [ref.alphas_cumprod[t - 1000 // num_steps].item() if t - 1000 // num_steps >= 0
          else ref.final_alpha_cumprod.item() for t in ref.timesteps.numpy()]
  np.testing.assert_allclose(tb.alpha_prev, np.float32(prev), rtol=1.5e-6, atol=0)


def test_ddim_variance_equals_diffusers():
  ref = diffusers.DDIMScheduler(**SD_V1_SCHEDULER)
  ref.set_timesteps(20)
  tb = schedule.step_tables(schedule.ScheduleConfig(), 20, eta=0.7)
  for i, t in enumerate(ref.timesteps.numpy()):
    var = ref._get_variance(int(t), int(t) - 50).item()
    np.testing.assert_allclose(tb.sigma[i], 0.7 * np.sqrt(var), rtol=1e-5)


@pytest.mark.parametrize("num_steps", [2, 10, 50])
def test_plms_timesteps_equal_pndm(num_steps):
  ref = diffusers.PNDMScheduler(**{k: v for k, v in SD_V1_SCHEDULER.items() if k != "clip_sample"},
                                skip_prk_steps=True)
  ref.set_timesteps(num_steps)
  tb = schedule.step_tables(schedule.ScheduleConfig(), num_steps)
  # PNDM evaluates t_0, then t_1 twice (the pseudo improved Euler step), then t_2, ...
  expected = np.concatenate([tb.timesteps[:1], tb.next_timesteps[:1], tb.timesteps[1:]])
  np.testing.assert_array_equal(ref.timesteps.numpy(), expected)


def test_sd_v1_fifty_steps_golden():
  tb = schedule.step_tables(schedule.ScheduleConfig(), 50)
  np.testing.assert_array_equal(tb.timesteps, np.arange(981, 0, -20))
  assert tb.alpha_prev[-1] == schedule.alphas_cumprod(schedule.ScheduleConfig())[0]


def test_from_diffusers_config_reads_sd_v1_json():
  cfg = schedule.ScheduleConfig.from_diffusers_config(
      {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **SD_V1_SCHEDULER})
  assert cfg == schedule.ScheduleConfig()
  with pytest.raises(ValueError, match="prediction_type"):
    schedule.ScheduleConfig.from_diffusers_config({"prediction_type": "sample"})


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5])
def test_bad_step_count_is_refused(bad):
  with pytest.raises(ValueError, match="num_steps"):
    schedule.step_tables(schedule.ScheduleConfig(), bad)


def test_steps_past_a_short_schedule_are_a_user_error_naming_the_fix():
  # A model whose scheduler trained on fewer than 1000 timesteps: the programs' one error line
  # (errors.UserError), not a traceback.
  from disentangle_jax import errors  # pylint: disable=import-outside-toplevel
  short = schedule.ScheduleConfig(num_train_timesteps=100)
  with pytest.raises(errors.UserError, match=r"num_steps=200 exceeds the model's 100 training "
                     r"timesteps .*set num_steps <= 100"):
    schedule.step_tables(short, 200)
  assert len(schedule.timesteps(short, 100)) == 100


def test_bad_eta_is_refused():
  with pytest.raises(ValueError, match="eta"):
    schedule.step_tables(schedule.ScheduleConfig(), 10, eta=-1.0)
