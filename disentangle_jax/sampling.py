"""The sampling settings every program shares, as one frozen value validated once.

Built from a program's config (the fields ``configs/common.py: add_sampling`` adds, read by
``launch/common.py: sampling``) and carried whole by ``disentangle.EditSpec``,
``switch_grid.GridSpec``, ``study.StudySpec`` and ``inversion.InversionConfig``: none of them
restates or re-validates a sampling field.
"""
from __future__ import annotations

import dataclasses

from disentangle_jax import errors, sampler, schedule


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the images are sampled (validated on construction; errors name the config field)."""

  num_steps: int = 50  # sampling steps T (one mixing weight per step)
  kind: str = "ddim"  # "ddim" | "plms" (the reference release's sampler)
  eta: float = 0.0  # DDIM stochasticity; 0 = deterministic
  guidance: float = 7.5  # classifier-free guidance scale
  rng_seed: int = 0  # base key; each seed's key is fold_in(key(rng_seed), seed)
  # The CFG unconditional prompt of every program ("" = none, the paper's); never mixed.
  negative_prompt: str = ""

  def __post_init__(self):
    sampler.check_settings(self.num_steps, self.kind, self.eta, self.guidance)
    if not isinstance(self.negative_prompt, str):
      raise errors.UserError(f"negative_prompt={self.negative_prompt!r} must be a string "
                             "('' = no negative prompt).")

  def sampler_config(self, remat: str = "none") -> sampler.SamplerConfig:
    """The static part the compiled sampler needs (kind, and the caller's remat policy)."""
    return sampler.SamplerConfig(kind=self.kind, remat=remat)

  def tables(self, schedule_config: schedule.ScheduleConfig) -> schedule.StepTables:
    """The per-step coefficient tables of these settings under a model's noise schedule."""
    return schedule.step_tables(schedule_config, self.num_steps, self.eta, self.kind)
