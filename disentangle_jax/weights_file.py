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
from typing import Any, Callable, Sequence

import numpy as np

import disentangle_jax
from disentangle_jax import errors, flow_settings, mixing, workdir

FORMAT = mixing.WEIGHTS_FORMAT
VERSION = 1


@dataclasses.dataclass(frozen=True)
class LearnedWeights:
  """lambda [T] weights the TARGET prompt (convention "target"; see mixing.py); with
  lambda_shape "per_token" it is [T, L] (a tuple of T rows of L token weights), written with
  a "lambda_shape" entry (absent = "per_step")."""

  lam: tuple
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
  lambda_shape: str = "per_step"  # "per_step" | "per_token" (mixing.LAMBDA_SHAPES)

  def to_json(self) -> dict:
    # A per-step file has no "lambda_shape" entry: files read before it existed stay valid.
    shape = {} if self.lambda_shape == "per_step" else {"lambda_shape": self.lambda_shape}
    return shape | {
        "format": FORMAT, "version": VERSION, "package_version": disentangle_jax.__version__,
        "convention": "target", "lambda": list(self.lam), "prompt": self.prompt,
        "target_prompt": self.target_prompt, "num_steps": self.num_steps,
        "sampler": self.sampler, "eta": self.eta, "guidance": self.guidance,
        "schedule": self.schedule, "seeds": list(self.seeds),
        "init_lambda": list(self.init_lambda), "loss_history": list(self.loss_history),
        "extra": self.extra,
    }


def learned(spec, schedule, lam, history, *, model: str, optimizer: dict,
            sampler: str | None = None) -> LearnedWeights:
  """The weights file of a finished optimisation of ``spec`` (a disentangle.EditSpec) under
  the model's noise ``schedule`` (schedule.ScheduleConfig, or a recorded dict: a flow model's,
  flow_settings.schedule_record); ``sampler``: the sampler entry where it is not the spec's
  (flow_settings.SAMPLER); ``model`` and ``optimizer`` name the model and the optimiser
  settings for the provenance."""
  s = spec.sampling
  return LearnedWeights(
      lam=as_tuple(lam), prompt=spec.prompt, target_prompt=spec.target_prompt,
      num_steps=s.num_steps, sampler=s.kind if sampler is None else sampler, eta=s.eta,
      guidance=s.guidance,
      schedule=dict(schedule) if isinstance(schedule, dict) else dataclasses.asdict(schedule),
      seeds=tuple(int(v) for v in spec.seeds),
      init_lambda=tuple(float(v) for v in spec.init_lambda()), loss_history=tuple(history),
      extra={"model": model, "faithful": spec.faithful, "beta": spec.loss.beta,
             "optimizer": optimizer, "rng_seed": s.rng_seed},
      lambda_shape=getattr(spec, "lambda_shape", "per_step"))


def as_tuple(lam) -> tuple:
  """lambda [T] -> T floats; [T, L] -> T tuples of L floats."""
  lam = np.asarray(lam)
  return tuple(float(v) for v in lam) if lam.ndim == 1 else tuple(as_tuple(r) for r in lam)


def write(path: str, weights: LearnedWeights) -> None:
  """Writes the file atomically (temporary name + rename)."""
  workdir.write_atomic(path, json.dumps(weights.to_json(), indent=2) + "\n")


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
    raise errors.NotAWeightsFile(f"weights file {path!r} is not a {FORMAT} file (no \"format\": "
                     f"\"{FORMAT}\" entry); export one with launch.disentangle.")
  if data.get("version", 0) > VERSION:
    raise ValueError(f"weights file {path!r} has version {data['version']}, newer than this "
                     f"package understands ({VERSION}): upgrade disentangle_jax.")
  missing = [k for k in ("lambda", "num_steps", "sampler", "prompt", "target_prompt")
             if k not in data]
  if missing:
    raise errors.UserError(f"weights file {path!r} lacks the entries {missing}: export it "
                           "again with launch.disentangle.")
  _check_entries(path, data)
  lambda_shape = data.get("lambda_shape", "per_step")
  lam = mixing.check_lambda(data["lambda"], int(data["num_steps"]), name=f"lambda in {path!r}",
                            lambda_shape=lambda_shape)
  if data.get("convention", "target") == "reference":
    lam = mixing.from_reference(lam)
  return LearnedWeights(
      lam=as_tuple(lam), prompt=data["prompt"],
      target_prompt=data["target_prompt"], num_steps=int(data["num_steps"]),
      sampler=data["sampler"], eta=float(data.get("eta", 0.0)),
      guidance=float(data.get("guidance", 7.5)), schedule=data.get("schedule", {}),
      seeds=tuple(data.get("seeds", ())), init_lambda=tuple(data.get("init_lambda", ())),
      loss_history=tuple(data.get("loss_history", ())), extra=data.get("extra", {}),
      lambda_shape=lambda_shape)


_ENTRY_TYPES = {"num_steps": int, "sampler": str, "prompt": str, "target_prompt": str,
                "lambda": list, "eta": (int, float), "guidance": (int, float), "seeds": list,
                "init_lambda": list, "loss_history": list, "schedule": dict, "extra": dict,
                "lambda_shape": str}


def _check_entries(path: str, data: dict) -> None:
  """Every known entry has its JSON type (a hand-edited file fails here, naming the entry)."""
  for key, kind in _ENTRY_TYPES.items():
    if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
      raise errors.UserError(
          f"weights file {path!r}: entry {key!r} is {data[key]!r}, not a "
          f"{getattr(kind, '__name__', 'number')}; export the file again with launch.disentangle.")
  if data["num_steps"] < 1:
    raise errors.UserError(f"weights file {path!r}: num_steps={data['num_steps']} must be >= 1.")
  if data.get("lambda_shape", "per_step") not in mixing.LAMBDA_SHAPES:
    raise errors.UserError(f"weights file {path!r}: lambda_shape={data['lambda_shape']!r} is "
                           f"unknown (known: {', '.join(mixing.LAMBDA_SHAPES)}).")
  per_token = data.get("lambda_shape") == "per_token"
  rows = data["lambda"] if per_token else [data["lambda"]]
  if not all(isinstance(r, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         for v in r) for r in rows):
    raise errors.UserError(f"weights file {path!r}: 'lambda' must be a list of "
                           f"{'lists of numbers (per token)' if per_token else 'numbers'}.")
  if not all(isinstance(s, int) for s in data.get("seeds", [])):
    raise errors.UserError(f"weights file {path!r}: 'seeds' must be a list of integers.")


def unique_labels(paths: Sequence[str], reserved: Sequence[str] = (),
                  key: Callable[[str], str] = lambda label: label) -> tuple[str, ...]:
  """Labels (output-name parts) for user-given lambda files: the file name without its
  extension, or, where names collide with each other or with ``reserved`` labels (built-in
  columns such as "c0", "c1", "T*=10"), the parent folders joined in ("smile_weights").
  ``key`` maps a label to the name it takes in files (collisions are judged on that).
  Refuses paths whose labels cannot be made distinct."""
  parts = [os.path.normpath(os.path.abspath(p)).split(os.sep)[1:] for p in paths]
  for ps in parts:
    ps[-1] = os.path.splitext(ps[-1])[0]
  depth = [1] * len(paths)
  taken = {key(r) for r in reserved}
  while True:
    labels = ["_".join(ps[-d:]) for ps, d in zip(parts, depth)]
    keys = [key(label) for label in labels]
    clash = [i for i, k in enumerate(keys) if k in taken or keys.count(k) > 1]
    if not clash:
      return tuple(labels)
    if any(depth[i] >= len(parts[i]) for i in clash):
      raise errors.UserError(
          f"lambda files {[paths[i] for i in clash]} cannot get distinct output names (they "
          f"clash with each other or with the built-in columns {list(reserved)}): rename or "
          "copy them.")
    for i in clash:
      depth[i] += 1


def check_compatible(weights: LearnedWeights, num_steps: int, sampler: str,
                     source: str = "weights file") -> np.ndarray:
  """lambda as float32 [T] if the file was made for this step count and sampler, else an error
  (a per-token file too: the programs that read weights files take one weight per step).
  ``sampler``: the run's sampler entry (flow_settings.SAMPLER for an SD 3.x / Flux.1 model):
  a file of the other kind of model is refused by name, whatever its step count."""
  if flow_settings.SAMPLER in (weights.sampler, sampler) and weights.sampler != sampler:
    kinds = {True: "a flow-matching model (SD 3.x / Flux.1)",
             False: "a UNet model (SD 1.x / 2.x / SDXL)"}
    raise errors.UserError(
        f"{source} does not fit this run: it was learned on "
        f"{kinds[weights.sampler == flow_settings.SAMPLER]} (sampler {weights.sampler!r}), this "
        f"run's model is {kinds[sampler == flow_settings.SAMPLER]} (sampler {sampler!r}); a "
        "lambda does not carry across model families: learn weights on this model.")
  problems = []
  if weights.lambda_shape != "per_step":
    problems.append(f"it holds a {weights.lambda_shape} lambda, this run takes one weight per "
                    "step")
  if weights.num_steps != num_steps:
    problems.append(f"it was learned for {weights.num_steps} steps, this run uses {num_steps}")
  if weights.sampler != sampler:
    problems.append(f"it was learned with the {weights.sampler!r} sampler, this run uses "
                    f"{sampler!r}")
  if problems:
    raise ValueError(f"{source} does not fit this run: {'; '.join(problems)}. Set num_steps/"
                     "sampler to match the file, or learn new weights.")
  return np.asarray(weights.lam, np.float32)
