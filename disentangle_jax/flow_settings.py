"""What a flow-matching model (SD 3.x, Flux.1) honours of the programs' settings, known from
the config before the model loads, and how its runs are recorded in weights files.

The programs' sampling settings were made for the UNet families' DDIM / PLMS samplers. A flow
model samples with FlowMatchEulerDiscreteScheduler's deterministic Euler steps (flow_sampler.py)
and inverts real images with the Euler inversion (flow_inversion.py), so:

  family    ``family(tiny_family, path)``: "sd3" | "flux" for model.tiny_family, or for a folder
            whose model_index.json names their pipeline (models/flow_folder.py takes
            ``PIPELINES`` from here); None for every other model. Read from the config alone (no
            weights, no diffusers import), so launch/common.py's ``sampling`` refuses a setting
            within a second, before anything loads.
  refusals  ``check``: sampler='plms' (no PLMS for flow), eta > 0 (the Euler sampler adds no
            noise: eta would be silently ignored), pin='current' (DDIM's release pinning; the
            Euler inversion pins to the next level only), a negative prompt on Flux.1
            (guidance-distilled: no CFG, nothing would use it), model.torch_numerics (the
            diffusers UNet's numerics): each one message naming the field and the fix.
  guidance  SD 3.x: the CFG scale, as for the UNet families. Flux.1: FluxPipeline's
            ``guidance_scale`` (diffusers' naming), the distilled guidance fed to the
            transformer's guidance embedding (the ``,flux`` presets set Flux.1-dev's 3.5; the
            default 7.5 is the UNet families' CFG scale); a Flux model without that embedding
            (guidance_embeds=False, schnell-like) uses no guidance. Recorded in weights files as
            for every family. True CFG for Flux is library-level only (flow_sampler.sample).
  records   weights files of flow runs say sampler ``SAMPLER`` and carry the flow schedule
            (``schedule_record``) instead of the DDIM one; weights_file.check_compatible refuses
            a flow file on a UNet model and the reverse by that sampler entry.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from disentangle_jax import errors

# model_index.json's pipeline class -> family (the flow families the programs run).
PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
NAMES = {"sd3": "SD 3.x", "flux": "Flux.1"}
# The sampler entry of a flow run's weights file (the UNet families write "ddim" / "plms").
SAMPLER = "flow_euler"
# The schedule entry's "kind" (a DDIM ScheduleConfig record has none).
SCHEDULE_KIND = "flow_match_euler"


def family(tiny_family: str = "", path: str | None = None) -> str | None:
  """"sd3" | "flux" when the model section names a flow model (module docstring), else None.

  An unreadable model_index.json is None here: the loader reports it by name."""
  if path is None:
    return tiny_family if tiny_family in NAMES else None
  return PIPELINES.get(pipeline_class(os.path.expanduser(path)))


def pipeline_class(path: str) -> str | None:
  """The ``_class_name`` of ``path``/model_index.json; None when the file is missing or
  unreadable (the loaders report that by name)."""
  index = os.path.join(path, "model_index.json")
  if not os.path.isfile(index):
    return None
  try:
    with open(index, encoding="utf-8") as f:
      return json.load(f).get("_class_name")
  except (OSError, ValueError, AttributeError):
    return None


def check(fam: str | None, sampling, pin: str | None = None,
          torch_numerics: bool = False) -> None:
  """Refuses the settings a flow model of family ``fam`` cannot honour (module docstring);
  nothing for None. ``sampling``: a sampling.SamplingConfig; ``pin``: the inversion's pinning
  (programs that invert), None elsewhere."""
  if fam is None:
    return
  name = f"the {NAMES[fam]} model"
  if sampling.kind != "ddim":
    raise errors.UserError(
        f"sampler={sampling.kind!r} does not apply to {name}: it samples with the "
        "flow-matching Euler sampler (FlowMatchEulerDiscreteScheduler), which the default "
        "sampler='ddim' stands for; leave sampler at 'ddim'.")
  if sampling.eta != 0:
    raise errors.UserError(
        f"eta={sampling.eta} does not apply to {name}: its Euler sampler is deterministic (the "
        "seed's x_T is its only noise); set eta=0.")
  if pin is not None and pin != "next":
    raise errors.UserError(
        f"pin={pin!r} (the DDIM release's pinning) does not apply to {name}: its Euler "
        "inversion pins each step to the next noise level; set pin='next'.")
  if fam == "flux" and sampling.negative_prompt:
    raise errors.UserError(
        f"negative_prompt={sampling.negative_prompt!r} has no effect on {name}: it is "
        "guidance-distilled (no classifier-free guidance, so nothing uses an unconditional "
        "prompt; `guidance` is its distilled guidance); leave negative_prompt empty.")
  if torch_numerics:
    raise errors.UserError(
        f"model.torch_numerics=True selects the diffusers UNet's numerics, which {name}'s "
        "transformer does not have (it is this package's own port); set "
        "model.torch_numerics=False.")


def schedule_record(fam: str, schedule, sigmas, latent_hw) -> dict:
  """The "schedule" entry of a flow run's weights file: the scheduler config that ran
  (flow_schedule.FlowScheduleConfig: shift, dynamic shifting and its bounds), the pipeline whose
  sigmas convention ran (SD 3.x: linspace of the shifted training bounds, shifted again; Flux.1:
  linspace(1, 1/T), time-shifted with mu from the image token count), the latents' H x W that
  mu was taken at, and the sigmas themselves [T + 1] (last 0)."""
  return {"kind": SCHEDULE_KIND, "pipeline": fam, **dataclasses.asdict(schedule),
          "latent_size": [int(v) for v in latent_hw],
          "sigmas": [float(v) for v in np.asarray(sigmas, np.float32)]}
