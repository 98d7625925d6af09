"""The exported result of an optimisation: a small self-describing JSON file.

It carries lambda plus everything needed to use it correctly elsewhere (prompts, step count,
sampler, schedule, guidance, seeds, loss history, package version). The sampling, editing and
study commands read it with ``read``, whose ``check`` is the one validator of every entry (the
export runs it on what it writes), and refuse a file made for another step count or sampler
(``check_compatible``). ``mixing.load`` also reads its "lambda" entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

import disentangle_jax
from disentangle_jax import disentangle, errors, flow_settings, mixing, sampler, workdir

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
  settings for the provenance. Checked as every reader checks it (``check``): a lambda past
  MAX_LAMBDA (a diverged run) is refused here, not by the programs that would read it."""
  s = spec.sampling
  weights = LearnedWeights(
      lam=as_tuple(lam), prompt=spec.prompt, target_prompt=spec.target_prompt,
      num_steps=s.num_steps, sampler=s.kind if sampler is None else sampler, eta=s.eta,
      guidance=s.guidance,
      schedule=dict(schedule) if isinstance(schedule, dict) else dataclasses.asdict(schedule),
      seeds=tuple(int(v) for v in spec.seeds),
      init_lambda=tuple(float(v) for v in spec.init_lambda()), loss_history=tuple(history),
      extra={"model": model, "faithful": spec.faithful, "beta": spec.loss.beta,
             "optimizer": optimizer, "rng_seed": s.rng_seed},
      lambda_shape=getattr(spec, "lambda_shape", "per_step"))
  _as_written(weights, "the learned weights")
  return weights


def as_tuple(lam) -> tuple:
  """lambda [T] -> T floats; [T, L] -> T tuples of L floats."""
  lam = np.asarray(lam)
  return tuple(float(v) for v in lam) if lam.ndim == 1 else tuple(as_tuple(r) for r in lam)


def write(path: str, weights: LearnedWeights) -> None:
  """Writes the file atomically (temporary name + rename), checked as ``read`` checks it."""
  workdir.write_atomic(path, _as_written(weights, f"weights file {path!r}"))


def _as_written(weights: LearnedWeights, source: str) -> str:
  """The file's text, checked as ``read`` will check it (the JSON read back: tuples become
  lists as they do on disk)."""
  text = json.dumps(weights.to_json(), indent=2) + "\n"
  check(json.loads(text), source, _EXPORT_FIX)
  return text


def read(path: str) -> LearnedWeights:
  """Reads a weights file and validates every entry (``check``); errors name the file and the
  entry. A file that is not a weights file at all (not .json, or JSON without a "format"
  entry: a plain lambda list) is errors.NotAWeightsFile, which switch_grid reads with
  mixing.load instead."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist.")
  if os.path.splitext(path)[1].lower() != ".json":
    raise errors.NotAWeightsFile(f"weights file {path!r} is not a .json file; export one with "
                                 "launch.disentangle.")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.UserError(f"weights file {path!r} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or "format" not in data:
    raise errors.NotAWeightsFile(f"weights file {path!r} is not a {FORMAT} file (no \"format\": "
                                 f"\"{FORMAT}\" entry); export one with launch.disentangle.")
  lam = check(data, f"weights file {path!r}")
  if data.get("convention", "target") == "reference":
    lam = mixing.from_reference(lam)
  return LearnedWeights(
      lam=as_tuple(lam), prompt=data["prompt"],
      target_prompt=data["target_prompt"], num_steps=int(data["num_steps"]),
      sampler=data["sampler"], eta=float(data.get("eta", 0.0)),
      guidance=float(data.get("guidance", 7.5)), schedule=data.get("schedule", {}),
      seeds=tuple(data.get("seeds", ())), init_lambda=tuple(data.get("init_lambda", ())),
      loss_history=tuple(data.get("loss_history", ())), extra=data.get("extra", {}),
      lambda_shape=data.get("lambda_shape", "per_step"))


_ENTRY_TYPES = {"version": int, "convention": str, "num_steps": int, "sampler": str,
                "prompt": str, "target_prompt": str, "lambda": list, "eta": (int, float),
                "guidance": (int, float), "seeds": list, "init_lambda": list,
                "loss_history": list, "schedule": dict, "extra": dict, "lambda_shape": str}
# The sampler entries a file can have: the UNet samplers and the flow models' Euler sampler.
SAMPLERS = sampler.SAMPLER_KINDS + (flow_settings.SAMPLER,)
CONVENTIONS = ("target", "reference")  # lambda weights c1 (this package) | w = 1 - lambda (release)
# |lambda| bound of every file read or written: lambda weights the target prompt
# (c = c0 + lambda (c1 - c0)), learned values lie near [0, 1.2], and at 10 the mix is already
# ten prompt differences past c1, an embedding the text encoder never produces (noise images);
# a larger value is a typo or a diverged run, and ~1e30 overflows float32 in the mix (inf, NaN).
MAX_LAMBDA = disentangle.MAX_LAMBDA


_READ_FIX = "export the file again with launch.disentangle"
_EXPORT_FIX = ("not written: a diverged run (lower optimizer.learning_rate and learn again in a "
               "new --workdir) or bad values given to api.save_weights")
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "a JSON object"}


def check(data: dict, source: str, fix: str = _READ_FIX) -> np.ndarray:
  """Validates the entries of a weights file's JSON object ``data`` (named ``source`` in every
  message: "weights file 'w.json'", then the entry, then ``fix``); returns its lambda as stored
  (float32 [T] or [T, L]).

  Every program that reads a weights file (switch, study, edit, api.load_weights) reads it
  through ``read``, and the export checks what it writes (``learned``, ``write``), so a file
  is accepted everywhere or nowhere. Checked: format, version, convention, the JSON type of
  every known entry, num_steps in [1, sampler.MAX_NUM_STEPS], the sampler, lambda's shape,
  finiteness and |lambda| <= MAX_LAMBDA, eta and guidance in the samplers' ranges.
  """
  def bad(entry, problem):
    return errors.UserError(f"{source}: {entry} {problem}; {fix}.")
  if data.get("format") != FORMAT:
    raise bad("format", f"is {data.get('format')!r}, not {FORMAT!r} (not a weights file of "
              "this package)")
  missing = [k for k in ("lambda", "num_steps", "sampler", "prompt", "target_prompt")
             if k not in data]
  if missing:
    raise errors.UserError(f"{source} lacks the entries {missing}: {fix}.")
  for key, kind in _ENTRY_TYPES.items():
    if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
      raise bad(f"entry {key!r}", f"is {data[key]!r}, not {_TYPE_NAMES.get(kind, 'a number')}")
  version = data.get("version", VERSION)
  if not 1 <= version <= VERSION:
    raise errors.UserError(
        f"{source}: version={version} is not a version this package reads (1 to {VERSION})"
        + ("; upgrade disentangle_jax." if version > VERSION else "."))
  if data.get("convention", "target") not in CONVENTIONS:
    raise bad("convention", f"{data['convention']!r} is unknown (known: "
              f"{', '.join(CONVENTIONS)})")
  lambda_shape = data.get("lambda_shape", "per_step")
  if lambda_shape not in mixing.LAMBDA_SHAPES:
    raise bad("lambda_shape", f"{lambda_shape!r} is unknown (known: "
              f"{', '.join(mixing.LAMBDA_SHAPES)})")
  with _naming(source, fix):
    errors.check_number("num_steps", data["num_steps"], low=1, high=sampler.MAX_NUM_STEPS,
                        integer=True)
    if data["sampler"] not in SAMPLERS:
      raise errors.UserError(f"sampler={data['sampler']!r} is unknown (known: "
                             f"{', '.join(SAMPLERS)})")
    for key, high in (("eta", sampler.MAX_ETA), ("guidance", sampler.MAX_GUIDANCE)):
      if key in data:
        errors.check_number(key, data[key], low=0, high=high)
  per_token = lambda_shape == "per_token"
  rows = data["lambda"] if per_token else [data["lambda"]]
  if not all(isinstance(r, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                         for v in r) for r in rows):
    raise bad("'lambda'", f"must be a list of "
              f"{'lists of numbers (per token)' if per_token else 'numbers'}")
  values = [v for r in rows for v in r]
  wild = next((v for v in values if not abs(v) <= MAX_LAMBDA), None)  # NaN fails the test too
  if wild is not None:
    raise bad("lambda", f"holds {wild!r}: every weight must be finite with |lambda| <= "
              f"{MAX_LAMBDA:g} (non-finite or diverged)")
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in data.get("seeds", [])):
    raise bad("'seeds'", "must be a list of integers")
  return mixing.check_lambda(data["lambda"], data["num_steps"], name=f"lambda in {source}",
                             lambda_shape=lambda_shape)


@contextlib.contextmanager
def _naming(source: str, fix: str):
  """The library checks' UserError ("eta=-1 is out of range ...") between ``source`` and
  ``fix``."""
  try:
    yield
  except errors.UserError as e:
    raise errors.UserError(f"{source}: {str(e).rstrip('.')}; {fix}.") from None


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
