"""Pieces every entry point shares: user-error reporting and config -> library objects."""
import contextlib
import logging as std_logging
import os
import sys

from absl import flags
from absl import logging

_CACHE = flags.DEFINE_string(
    "compilation_cache", "",
    "Directory of JAX's persistent compilation cache: a restarted or repeated run skips "
    "compilation. Empty = off.")


_COORDINATOR = flags.DEFINE_string(
    "coordinator", os.environ.get("DISENTANGLE_COORDINATOR", ""),
    "Multi-process runs: HOST:PORT of process 0 (every process passes the same), or 'auto' on "
    "a TPU pod; empty = one process. Env: DISENTANGLE_COORDINATOR.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("DISENTANGLE_NUM_PROCESSES", "1")),
    "Number of processes with --coordinator=HOST:PORT. Env: DISENTANGLE_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("DISENTANGLE_PROCESS_ID", "0")),
    "This process's index in [0, num_processes). Env: DISENTANGLE_PROCESS_ID.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 300, "Seconds to wait for the coordinator and every process to join.")


def setup_distributed() -> None:
  """Joins a multi-process run when --coordinator is set; call before any other JAX work."""
  if _COORDINATOR.value:
    import jax  # noqa: PLC0415
    # Cross-process collectives between CPU devices (no effect on TPU/GPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from disentangle_jax import parallel  # noqa: PLC0415
  with user_errors():
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _INIT_TIMEOUT.value)


def setup_process() -> None:
  """Process-wide settings every entry point applies before any JAX work."""
  quiet_library_logs()
  if _CACHE.value:
    import jax  # noqa: PLC0415
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)


@contextlib.contextmanager
def user_errors():
  """Turns a ValueError/OSError raised while validating input into one line and exit code 2.

  Wrap only the validation and loading phase: errors from computation are bugs and keep their
  traceback.
  """
  try:
    yield
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def as_tuple(value):
  """A config value given as one number, a tuple or a comma string -> tuple of ints."""
  if isinstance(value, str):
    try:
      return tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
      raise ValueError(f"{value!r} is not a list of integers: write e.g. 42,43.") from None
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return (value,)


def as_paths(value) -> tuple[str, ...]:
  """A config value given as one path, a tuple, or a comma-separated string -> tuple of paths."""
  if not value:
    return ()
  if isinstance(value, str):
    value = (value,)
  # ml_collections may hand "a,b" over as the tuple ("a,b",): split every entry.
  return tuple(p.strip() for v in value for p in str(v).split(",") if p.strip())


def load_model(model_cfg):
  from disentangle_jax import models  # noqa: PLC0415
  from disentangle_jax.toy import world  # noqa: PLC0415
  with world.rebuild_hint(model_cfg.path):  # toy-world weights: errors say how to rebuild
    return models.load(models.ModelConfig(**model_cfg.to_dict()))


def encode_pair(model, prompt: str, target: str):
  from disentangle_jax import models, pipeline  # noqa: PLC0415
  c0, c1, uncond = models.encode_prompts(model, [prompt, target, ""])
  return pipeline.PromptPair(c0=c0, c1=c1, uncond=uncond)


def load_loss_models(loss_cfg, tokenizer):
  from disentangle_jax import loss_models  # noqa: PLC0415
  from disentangle_jax.toy import world  # noqa: PLC0415
  with world.rebuild_hint(loss_cfg.clip_path):
    return loss_models.load_loss_models(loss_models.LossModelConfig(**loss_cfg.to_dict()),
                                        tokenizer=tokenizer)


def edit_spec(cfg, **overrides):
  """configs/disentangle.py (or configs/edit.py) -> disentangle.EditSpec, validating every
  field; ``overrides`` replace fields a program fixes itself (edit: seeds, sampler, eta)."""
  from disentangle_jax import disentangle, optimize  # noqa: PLC0415
  fields = dict(
      prompt=cfg.prompt, attribute=cfg.attribute, t_star=cfg.t_star,
      lambda_late=cfg.lambda_late, num_steps=cfg.num_steps, remat=cfg.remat,
      guidance=cfg.guidance, rng_seed=cfg.rng_seed, faithful=cfg.faithful,
      loss=optimize.LossConfig(beta=cfg.loss.beta, preprocess=cfg.loss.preprocess),
      optimizer=optimize.OptimizerConfig(**cfg.optimizer.to_dict()))
  fields.update(overrides)
  if "seeds" not in fields:
    fields["seeds"] = as_tuple(cfg.seeds)
  fields.setdefault("sampler", cfg.get("sampler"))
  fields.setdefault("eta", cfg.get("eta"))
  return disentangle.EditSpec(**fields)


def edit_set(cfg):
  """configs/disentangle.py with `attributes` -> (names, disentangle.EditSet)."""
  from disentangle_jax import disentangle  # noqa: PLC0415
  names = as_paths(cfg.attributes)
  unknown = [n for n in names if n not in cfg.presets]
  if unknown:
    raise ValueError(f"attributes {unknown} are not presets; choose from "
                     f"{', '.join(sorted(cfg.presets))}.")
  if len(set(names)) != len(names):
    raise ValueError(f"attributes {list(names)} lists a preset twice.")
  specs = []
  for name in names:
    p = cfg.presets[name]
    specs.append(edit_spec(cfg, prompt=p.prompt, attribute=p.attribute, t_star=p.t_star,
                           lambda_late=p.lambda_late))
  return names, disentangle.EditSet(tuple(specs))


def learned_weights(spec, model, cfg, lam, history):
  """The exported weights file of a finished disentangle run."""
  import dataclasses  # noqa: PLC0415
  from disentangle_jax import weights_file  # noqa: PLC0415
  return weights_file.LearnedWeights(
      lam=tuple(float(v) for v in lam), prompt=spec.prompt, target_prompt=spec.target_prompt,
      num_steps=spec.num_steps, sampler=spec.sampler, eta=spec.eta, guidance=spec.guidance,
      schedule=dataclasses.asdict(model.schedule), seeds=tuple(int(s) for s in spec.seeds),
      init_lambda=tuple(float(v) for v in spec.init_lambda()), loss_history=tuple(history),
      extra={"model": cfg.model.path or f"tiny:{cfg.model.tiny_seed}",
             "faithful": spec.faithful, "beta": spec.loss.beta,
             "optimizer": cfg.optimizer.to_dict(), "rng_seed": spec.rng_seed})


def png(image) -> bytes:
  import io  # noqa: PLC0415
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def write_atomic(path: str, data) -> None:
  """Writes a whole file under a temporary name, then renames it into place."""
  import os  # noqa: PLC0415
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)
