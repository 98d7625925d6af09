"""Noise schedule and per-step coefficient tables (pure numpy, computed once on the host).

Stable Diffusion v1.x trains with a "scaled_linear" beta schedule over 1000 steps and samples
with "leading" timestep spacing plus an offset of 1 and ``set_alpha_to_one=False``: for 50
steps the timesteps are 981, 961, ..., 1 and the "previous" alpha of the last step is
``alphas_cumprod[0]``. These functions reproduce diffusers' DDIMScheduler / PNDMScheduler
built from SD v1's scheduler_config.json: identical timesteps, alphas equal to float32 rounding
(tests/test_schedule.py).

SD 2.x / SDXL scheduler options follow diffusers' DDIMScheduler exactly: ``prediction_type``
("epsilon" | "v_prediction", what the UNet outputs; the sampler converts), ``timestep_spacing``
(leading / trailing / linspace, Table 2 of arXiv 2305.08891), ``steps_offset`` (added to
"leading" timesteps only) and ``rescale_betas_zero_snr`` (betas rescaled to zero terminal SNR,
Algorithm 1 of 2305.08891; alphas_cumprod[-1] = 0, so it needs v-prediction). In every spacing
the "previous" level of step i is ``t_i - num_train_timesteps // T``, as in diffusers' step().

PLMS is diffusers' PNDMScheduler (skip_prk_steps), whose step size is always
``num_train_timesteps // T`` and whose first step combines the UNet outputs at t_0 and t_1 and
moves from the level of ``t_1 + num_train_timesteps // T`` to t_1. Where t_1 is not
``t_0 - num_train_timesteps // T`` ("linspace" spacing; "trailing" with T not dividing
num_train_timesteps) that first step is not a step between two of the run's levels, and PNDM
has no zero-terminal-SNR option (it ignores ``rescale_betas_zero_snr``): ``step_tables(...,
sampler="plms")`` refuses both in one line (``check_plms``) rather than run something that only
resembles PNDM. "leading" spacing (SD's) and "trailing" with T dividing it match PNDM exactly.

Everything here is float64 numpy; the sampler casts the tables to its compute dtype. Tables are
passed to jitted code as *arguments*, so a change of eta never recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from disentangle_jax import errors

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The training noise schedule and the inference timestep spacing (SD v1 defaults)."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear"
  timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
  steps_offset: int = 1  # added to the "leading" timesteps (diffusers ignores it otherwise)
  set_alpha_to_one: bool = False
  prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" | "v_prediction"
  rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR (needs v-prediction)

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(
          f"scheduler prediction_type={self.prediction_type!r} is not supported; use one of "
          f"{PREDICTION_TYPES} (SD v1 / SDXL predict 'epsilon', SD 2.x 768 px 'v_prediction').")
    if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
      raise ValueError(
          "scheduler rescale_betas_zero_snr=True needs prediction_type='v_prediction': with zero "
          "terminal SNR alphas_cumprod[-1] = 0 and the epsilon formula divides by sqrt(0).")
    if self.beta_schedule not in ("scaled_linear", "linear"):
      raise ValueError(
          f"schedule.beta_schedule={self.beta_schedule!r} is not supported; "
          "use 'scaled_linear' (SD v1) or 'linear'.")
    if self.timestep_spacing not in ("leading", "trailing", "linspace"):
      raise ValueError(
          f"schedule.timestep_spacing={self.timestep_spacing!r} is not supported; "
          "use 'leading' (SD v1), 'trailing' or 'linspace'.")
    if self.num_train_timesteps < 1:
      raise ValueError(f"schedule.num_train_timesteps={self.num_train_timesteps} must be >= 1.")

  @classmethod
  def from_diffusers_config(cls, config: dict) -> "ScheduleConfig":
    """Builds the schedule from a diffusers scheduler_config.json dict (unknown keys ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if config.get("trained_betas") is not None:
      raise ValueError("scheduler 'trained_betas' are not supported; use beta_start/beta_end.")
    for name in ("clip_sample", "thresholding"):  # x0 clipping / dynamic thresholding
      if config.get(name):
        raise ValueError(f"scheduler {name}={config[name]!r} is not supported (the sampler never "
                         f"clips x0; latent diffusion models set it false): set {name} to false.")
    return cls(**kwargs)


class StepTables(NamedTuple):
  """Per-step coefficients of a T-step sampler, in denoising order (index 0 = noisiest).

  Attributes (all shape [T]):
    timesteps: integer UNet timestep t_i.
    alpha: alphas_cumprod[t_i].
    alpha_prev: alphas_cumprod of the next (less noisy) timestep; for the last step
      alphas_cumprod[0] (or 1.0 with set_alpha_to_one).
    sigma: DDIM noise scale, eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev).
    next_timesteps: t_{i+1} (for the last step, the timestep that alpha_prev belongs to,
      which may be negative); PLMS evaluates the UNet there on its first step.
  """

  timesteps: np.ndarray
  alpha: np.ndarray
  alpha_prev: np.ndarray
  sigma: np.ndarray
  next_timesteps: np.ndarray


def betas(cfg: ScheduleConfig) -> np.ndarray:
  """Training betas, float64 [num_train_timesteps]."""
  n = cfg.num_train_timesteps
  if cfg.beta_schedule == "scaled_linear":
    return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float64) ** 2
  return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
  """diffusers' ``rescale_zero_terminal_snr``: betas whose sqrt(alphas_cumprod) is shifted to
  end at 0 and scaled to keep its first value (arXiv 2305.08891, Algorithm 1)."""
  sqrt_ac = np.sqrt(np.cumprod(1.0 - b))
  first, last = sqrt_ac[0], sqrt_ac[-1]
  sqrt_ac = (sqrt_ac - last) * (first / (first - last))
  ac = sqrt_ac**2
  return 1.0 - np.concatenate([ac[:1], ac[1:] / ac[:-1]])


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
  """Cumulative product of (1 - beta), float64 [num_train_timesteps].

  diffusers' PyTorch schedulers compute this in float32 (torch.linspace, cumprod accumulated
  in double); the float64 values here agree with theirs to float32 rounding (<= 1e-6 relative).
  """
  b = betas(cfg)
  if cfg.rescale_betas_zero_snr:
    b = rescale_zero_terminal_snr(b)
  return np.cumprod(1.0 - b)


def timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
  """Inference timesteps [T] int64 in denoising order (981, 961, ..., 1 for SD v1 at T=50)."""
  check_num_steps(num_steps, cfg)
  n = cfg.num_train_timesteps
  if cfg.timestep_spacing == "leading":
    ratio = n // num_steps
    ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
  elif cfg.timestep_spacing == "trailing":
    ratio = n / num_steps
    ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
  else:  # linspace
    ts = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
  return ts


def check_num_steps(num_steps: int, cfg: ScheduleConfig) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise errors.UserError(
        f"num_steps={num_steps!r} must be an integer >= 1 (50 in the paper).")
  if num_steps > cfg.num_train_timesteps:  # a scheduler trained on fewer than 1000 timesteps
    raise errors.UserError(
        f"num_steps={num_steps} exceeds the model's {cfg.num_train_timesteps} training "
        f"timesteps (its scheduler's num_train_timesteps); set num_steps <= "
        f"{cfg.num_train_timesteps}.")


def check_plms(cfg: ScheduleConfig, num_steps: int) -> None:
  """Raises ValueError (one line) where PLMS would not equal diffusers' PNDMScheduler under
  ``cfg`` at ``num_steps`` steps (the module docstring); returns otherwise."""
  if cfg.rescale_betas_zero_snr:
    raise ValueError(
        "sampler='plms' with a rescale_betas_zero_snr=True schedule: diffusers' PNDMScheduler "
        "has no zero-terminal-SNR option (it ignores it and samples the schedule the model was "
        "not trained on), so PLMS is refused here; use sampler='ddim'.")
  ts = timesteps(cfg, num_steps)
  ratio = cfg.num_train_timesteps // num_steps
  if num_steps >= 2 and ts[0] - ratio != ts[1]:
    raise ValueError(
        f"sampler='plms' with timestep_spacing={cfg.timestep_spacing!r} at {num_steps} steps: "
        f"diffusers' PNDMScheduler steps by num_train_timesteps // T = {ratio}, so its first "
        f"step runs from the level of t={ts[1] + ratio}, not t={ts[0]}, to t={ts[1]}; that is "
        "not reproduced, so PLMS is refused. Use sampler='ddim', 'leading' spacing, or (for "
        f"'trailing') a step count that divides {cfg.num_train_timesteps}.")


def step_tables(cfg: ScheduleConfig, num_steps: int, eta: float = 0.0,
                sampler: str = "ddim") -> StepTables:
  """Coefficient tables for a ``num_steps``-step DDIM/PLMS run (float64 numpy); with
  ``sampler="plms"`` the combinations PNDM runs differently are refused (``check_plms``)."""
  if sampler == "plms":
    check_plms(cfg, num_steps)
  if not np.isfinite(eta) or eta < 0:
    raise ValueError(f"eta={eta!r} must be a finite number >= 0 (0 = deterministic DDIM).")
  ac = alphas_cumprod(cfg)
  ts = timesteps(cfg, num_steps)
  # diffusers: prev_timestep = t - num_train_timesteps // num_inference_steps.
  prev_ts = ts - cfg.num_train_timesteps // num_steps
  final = 1.0 if cfg.set_alpha_to_one else ac[0]
  alpha = ac[ts]
  alpha_prev = np.where(prev_ts >= 0, ac[np.clip(prev_ts, 0, None)], final)
  variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
  sigma = eta * np.sqrt(variance)
  return StepTables(
      timesteps=ts, alpha=alpha, alpha_prev=alpha_prev, sigma=sigma, next_timesteps=prev_ts)
