"""The flow-matching schedule of SD 3.x and Flux.1 (pure numpy, computed once on the host).

diffusers' ``FlowMatchEulerDiscreteScheduler`` as its pipelines drive it, to the bit:

  construction   sigmas_train = shift(linspace(1, N, N)[::-1] / N) in float32 (N = 1000 training
                 steps; no shift with ``use_dynamic_shifting``); sigma_max / sigma_min are its
                 first / last values.
  SD 3.x         ``set_timesteps(T)``: linspace(sigma_max N, sigma_min N, T) / N in float64,
                 shifted again (yes, twice: the scheduler shifts its own shifted bounds), or
                 time-shifted with mu when the config asks for dynamic shifting.
  Flux.1         FluxPipeline passes sigmas = linspace(1, 1/T, T) and mu = calculate_shift(
                 image_seq_len) (linear between (256, 0.5) and (4096, 1.15) tokens); they are
                 cast to float32 and time-shifted in float32: e^mu / (e^mu + (1/s - 1)).
  both           sigmas are float32, timesteps = sigmas * N in float32, and a terminal sigma 0
                 is appended; Euler: x_next = x + (sigma_next - sigma) v.

``shift`` maps s -> shift s / (1 + (shift - 1) s) (SD 3.x: 3.0). The timestep a transformer sees
is the float ``timesteps[i]`` (SD3) or ``timesteps[i] / 1000`` (Flux, which multiplies it back).

Float32 arithmetic is done in numpy float32 where diffusers does it in torch float32 (the same
IEEE operations), so tables equal diffusers' exactly (tests/test_flow_sampler.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from disentangle_jax import errors

PIPELINES = ("sd3", "flux")


@dataclasses.dataclass(frozen=True)
class FlowScheduleConfig:
  """The fields of a FlowMatchEulerDiscreteScheduler scheduler_config.json that this port runs."""

  num_train_timesteps: int = 1000
  shift: float = 1.0  # SD 3.x: 3.0 (Flux's 3.0 is unused: it shifts dynamically)
  use_dynamic_shifting: bool = False  # Flux.1: True (mu from the image token count)
  base_shift: float = 0.5  # mu at base_image_seq_len tokens
  max_shift: float = 1.15  # mu at max_image_seq_len tokens
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  time_shift_type: str = "exponential"  # "exponential" | "linear"

  def __post_init__(self):
    if self.time_shift_type not in ("exponential", "linear"):
      raise errors.UserError(f"scheduler time_shift_type={self.time_shift_type!r} is unknown; "
                             "use 'exponential' (Flux.1) or 'linear'.")
    if self.shift <= 0:
      raise errors.UserError(f"scheduler shift={self.shift} must be > 0 (3.0 for SD 3.x).")
    if self.num_train_timesteps < 1:
      raise errors.UserError(
          f"scheduler num_train_timesteps={self.num_train_timesteps} must be >= 1.")

  @classmethod
  def from_diffusers_config(cls, config: dict) -> "FlowScheduleConfig":
    """From scheduler/scheduler_config.json; options this port does not run are refused."""
    cls_name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls_name != "FlowMatchEulerDiscreteScheduler":
      raise errors.UserError(f"scheduler _class_name={cls_name!r} is not supported; the flow "
                             "sampler runs 'FlowMatchEulerDiscreteScheduler'.")
    for name in ("invert_sigmas", "shift_terminal", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling",
                 "use_flow_sigmas"):
      if config.get(name):
        raise errors.UserError(f"scheduler {name}={config[name]!r} is not supported by the flow "
                               f"sampler; set {name} to false/null.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


class FlowTables(NamedTuple):
  """Per-step values of a T-step flow sampler, in denoising order (index 0 = pure noise).

  Attributes (all float32 [T]):
    timesteps: the scheduler's timestep t_i = sigma_i * N (what SD3 sees; Flux sees t_i / N).
    sigma: sigma_i.
    sigma_next: sigma_{i+1} (0 after the last step).
  """

  timesteps: np.ndarray
  sigma: np.ndarray
  sigma_next: np.ndarray


def calculate_shift(image_seq_len: int, cfg: FlowScheduleConfig) -> float:
  """mu for ``image_seq_len`` image tokens (the pipelines' ``calculate_shift``, float64)."""
  m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
  b = cfg.base_shift - m * cfg.base_image_seq_len
  return image_seq_len * m + b


def shift_sigmas(s, shift: float):
  """shift s / (1 + (shift - 1) s), in s's dtype."""
  return shift * s / (1 + (shift - 1) * s)


def time_shift(mu: float, s, cfg: FlowScheduleConfig):
  """The dynamic shift of sigmas s (in s's dtype): e^mu / (e^mu + (1/s - 1)) (exponential) or
  mu / (mu + (1/s - 1)) (linear)."""
  if cfg.time_shift_type == "exponential":
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
  return mu / (mu + (1 / s - 1) ** 1.0)


def train_sigmas(cfg: FlowScheduleConfig) -> np.ndarray:
  """The scheduler's construction-time sigmas, float32 [N] (descending)."""
  n = cfg.num_train_timesteps
  t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
  s = t / np.float32(n)
  return s if cfg.use_dynamic_shifting else shift_sigmas(s, cfg.shift).astype(np.float32)


def image_seq_len(height: int, width: int, patch: int = 2) -> int:
  """Image tokens of latents H x W in patch x patch tokens (SD3's patch_size; Flux packs 2 x 2)."""
  return (height // patch) * (width // patch)


def sigmas(cfg: FlowScheduleConfig, num_steps: int, pipeline: str = "sd3",
           seq_len: int | None = None, mu: float | None = None) -> np.ndarray:
  """The sigmas of ``set_timesteps`` as ``pipeline`` calls it, float32 [T + 1] (last = 0).

  ``seq_len``: the image token count (``image_seq_len``), which sets mu for dynamic shifting
  (``mu`` overrides it).
  """
  errors.check_number("num_steps", num_steps, low=1, integer=True, hint="28 for SD 3.5, "
                      "50 for Flux.1-dev, 4 for Flux.1-schnell.")
  if pipeline not in PIPELINES:
    raise errors.UserError(f"pipeline={pipeline!r} is unknown; use one of {PIPELINES}.")
  if cfg.use_dynamic_shifting and mu is None:
    if seq_len is None:
      raise errors.UserError("this scheduler shifts dynamically (use_dynamic_shifting): pass "
                             "the image token count seq_len (or mu).")
    mu = calculate_shift(seq_len, cfg)
  n = cfg.num_train_timesteps
  if pipeline == "flux":  # FluxPipeline's sigmas, cast to float32 by set_timesteps.
    s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
  else:
    train = train_sigmas(cfg)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    s = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n  # float64
  s = time_shift(mu, s, cfg) if cfg.use_dynamic_shifting else shift_sigmas(s, cfg.shift)
  return np.concatenate([np.asarray(s).astype(np.float32), np.zeros((1,), np.float32)])


def tables(cfg: FlowScheduleConfig, num_steps: int, pipeline: str = "sd3",
           seq_len: int | None = None, mu: float | None = None) -> FlowTables:
  """The sampler's per-step tables (``sigmas`` plus the scheduler's float32 timesteps)."""
  s = sigmas(cfg, num_steps, pipeline, seq_len, mu)
  return FlowTables(timesteps=s[:-1] * np.float32(cfg.num_train_timesteps), sigma=s[:-1],
                    sigma_next=s[1:])
