"""The exported result of an optimisation: a small self-describing JSON file.

It carries lambda plus everything needed to use it correctly elsewhere (prompts, step count,
sampler, schedule, guidance, seeds, loss history, package version). The sampling, editing and
study commands read it with ``read`` and refuse a file made for another step count or sampler
(``check_compatible``). ``mixing.load`` also reads its "lambda" entry.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import numpy as np

import disentangle_jax
from disentangle_jax import mixing

FORMAT = mixing.WEIGHTS_FORMAT
VERSION = 1


@dataclasses.dataclass(frozen=True)
class LearnedWeights:
  """lambda [T] weights the TARGET prompt (convention "target"; see mixing.py)."""

  lam: tuple[float, ...]
  prompt: str
  target_prompt: str
  num_steps: int
  sampler: str
  eta: float
  guidance: float
  schedule: dict
  seeds: tuple[int, ...] = ()
  init_lambda: tuple[float, ...] = ()
  loss_history: tuple[dict, ...] = ()
  extra: dict = dataclasses.field(default_factory=dict)  # free-form provenance (model, config)

  def to_json(self) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "package_version": disentangle_jax.__version__,
        "convention": "target", "lambda": list(self.lam), "prompt": self.prompt,
        "target_prompt": self.target_prompt, "num_steps": self.num_steps,
        "sampler": self.sampler, "eta": self.eta, "guidance": self.guidance,
        "schedule": self.schedule, "seeds": list(self.seeds),
        "init_lambda": list(self.init_lambda), "loss_history": list(self.loss_history),
        "extra": self.extra,
    }


def write(path: str, weights: LearnedWeights) -> None:
  """Writes the file atomically (temporary name + rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    json.dump(weights.to_json(), f, indent=2)
    f.write("\n")
  os.replace(f.name, path)


def read(path: str) -> LearnedWeights:
  """Reads and validates a weights file; errors name the file and the problem."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"weights file {path!r} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"weights file {path!r} is not a {FORMAT} file (no \"format\": "
                     f"\"{FORMAT}\" entry); export one with launch.disentangle.")
  if data.get("version", 0) > VERSION:
    raise ValueError(f"weights file {path!r} has version {data['version']}, newer than this "
                     f"package understands ({VERSION}): upgrade disentangle_jax.")
  missing = [k for k in ("lambda", "num_steps", "sampler", "prompt", "target_prompt")
             if k not in data]
  if missing:
    raise ValueError(f"weights file {path!r} lacks the entries {missing}.")
  lam = mixing.check_lambda(data["lambda"], int(data["num_steps"]), name=f"lambda in {path!r}")
  if data.get("convention", "target") == "reference":
    lam = mixing.from_reference(lam)
  return LearnedWeights(
      lam=tuple(float(v) for v in lam), prompt=data["prompt"],
      target_prompt=data["target_prompt"], num_steps=int(data["num_steps"]),
      sampler=data["sampler"], eta=float(data.get("eta", 0.0)),
      guidance=float(data.get("guidance", 7.5)), schedule=data.get("schedule", {}),
      seeds=tuple(data.get("seeds", ())), init_lambda=tuple(data.get("init_lambda", ())),
      loss_history=tuple(data.get("loss_history", ())), extra=data.get("extra", {}))


def check_compatible(weights: LearnedWeights, num_steps: int, sampler: str,
                     source: str = "weights file") -> np.ndarray:
  """lambda as float32 [T] if the file was made for this step count and sampler, else an error."""
  problems = []
  if weights.num_steps != num_steps:
    problems.append(f"it was learned for {weights.num_steps} steps, this run uses {num_steps}")
  if weights.sampler != sampler:
    problems.append(f"it was learned with the {weights.sampler!r} sampler, this run uses "
                    f"{sampler!r}")
  if problems:
    raise ValueError(f"{source} does not fit this run: {'; '.join(problems)}. Set num_steps/"
                     "sampler to match the file, or learn new weights.")
  return np.asarray(weights.lam, np.float32)
