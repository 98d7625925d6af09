"""Pieces every entry point shares: flag parsing, the workdir claim and config -> library
objects.

Every program is started with ``common.run(main)``: a bad flag, config field, preset or value,
a user error (errors.UserError) or an OS error (missing file, full disk) anywhere in the run,
and Ctrl-C each end in exactly one ``error: ...`` line (launch/failures.py) instead of a
traceback.
"""
import contextlib
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from disentangle_jax import errors
from launch import failures

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
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every config field with its value and comment, then exit.")

def run(main) -> None:
  """``app.run(main)`` with one-line errors (see the module docstring) and --show_config.
  Every program requires --workdir."""
  flags.mark_flags_as_required(["workdir"])
  app.run(failures.guarded(main), flags_parser=_parse_flags)


def define_flags(config_file: str):
  """(--config, --workdir): the flags every program takes; ``config_file`` is the default.

  ml_collections reads --config.<field> overrides from sys.argv while the flag is defined (at
  import), so a bad override is reported here, as one line."""
  from ml_collections import config_flags  # noqa: PLC0415
  try:
    config = config_flags.DEFINE_config_file(
        "config", config_file, "Config file[:arguments]; override fields with "
        "--config.<field>=v; --show_config lists every field.")
  except Exception as e:  # noqa: BLE001 -- absl/ml_collections raise many kinds
    failures.fail(failures.flag_error(e, sys.argv))
  return config, flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


def single_process_main(program: str, config, workdir, run_fn):
  """The ``main`` of a program that runs in one process: the parsed config, process
  settings, the claimed workdir, then ``run_fn(cfg, out_dir)``."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = config.value
    setup_process()
    require_single_process(program)
    with claim_workdir(workdir.value) as out_dir:
      run_fn(cfg, out_dir)
  return main


def _parse_flags(argv):
  try:
    args = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- absl/ml_collections raise many kinds
    failures.fail(failures.flag_error(e, argv))
  if _SHOW_CONFIG.value:
    print(describe_config(flags.FLAGS["config"]))
    sys.exit(0)
  return args


def require_single_process(program: str) -> None:
  """Refuses the multi-process flags in programs that run in one process."""
  if _COORDINATOR.value or _NUM_PROCESSES.value != 1 or _PROCESS_ID.value != 0:
    raise errors.UserError(
        f"{program} runs in one process (its batch is sharded over this process's devices); "
        "--coordinator, --num_processes and --process_id are for launch.study. Drop them (and "
        "the DISENTANGLE_* environment variables).")


def claim_workdir(path: str, lock: bool = True):
  """The workdir, created if needed and locked for this run (workdir.claim)."""
  from disentangle_jax import workdir  # noqa: PLC0415
  return workdir.claim(path, lock=lock, log=logging.info)


def identity(cfg, **extra) -> dict:
  """The run identity of this program's config (run_identity.of_config)."""
  from disentangle_jax import run_identity  # noqa: PLC0415
  return run_identity.of_config(cfg.to_dict(), extra)


def scaled_steps(steps_at_50: int, num_steps: int) -> int:
  """A step index given for the paper's 50 steps, at ``num_steps`` (rounded)."""
  return (steps_at_50 * num_steps + 25) // 50


_FIELD = re.compile(r"^\s*(?:c\.)?(\w+)\s*=[^#]*(?:#\s*(.+))?$")
_COMMENT = re.compile(r"^\s*#\s?(.*)$")
_SECTION = re.compile(r"^def (\w+)_config\(")


def config_comments(*paths: str) -> dict[str, str]:
  """{field path: comment} from config files: the comment after ``c.field = ...`` or the
  comment lines right above it; configs/common.py's section fields are "<section>.<field>"."""
  out, above = {}, []
  for path in paths:
    section = ""
    with open(path) as f:
      for line in f:
        m = _SECTION.match(line)
        if m or line.startswith("def "):
          section = m.group(1) + "." if m and m.group(1) != "get" else ""
          above = []
          continue
        c = _COMMENT.match(line)
        if c:
          above.append(c.group(1).strip())
          continue
        m = _FIELD.match(line)
        if m and (m.group(2) or above):
          out.setdefault(section + m.group(1), m.group(2).strip() if m.group(2) else
                         " ".join(above))
        above = []
  return out


BASELINE_T_STARS = (10, 20, 30)  # the paper's hard switches, at 50 steps


def t_stars(cfg) -> tuple[int, ...]:
  """cfg.t_stars, or the paper's 10, 20, 30 of 50 steps scaled to cfg.num_steps."""
  given = as_tuple(cfg.t_stars, "t_stars")
  if given:
    return given
  scaled = tuple(sorted({scaled_steps(t, cfg.num_steps) for t in BASELINE_T_STARS}))
  if cfg.num_steps != 50:
    logging.info("t_stars: %s (the paper's %s of 50 steps, scaled to %d steps)", scaled,
                 BASELINE_T_STARS, cfg.num_steps)
  return scaled


def describe_config(config_flag) -> str:
  """Every field of the parsed config with its value and comment (for --show_config)."""
  from ml_collections import config_flags  # noqa: PLC0415
  from disentangle_jax import run_identity  # noqa: PLC0415
  cfg = config_flag.value
  filename = config_flags.get_config_filename(config_flag).split(":")[0]
  common_path = os.path.join(os.path.dirname(os.path.abspath(filename)), "common.py")
  comments = config_comments(filename, common_path)
  lines = [f"# {filename} (override any field with --config.<field>=<value>)"]
  for key, value in run_identity.flatten(cfg.to_dict()).items():
    if key.startswith("presets."):
      continue
    comment = comments.get(key) or comments.get(key.split(".")[-1]) or ""
    lines.append(f"{key} = {value!r}" + (f"  # {comment}" if comment else ""))
  return "\n".join(lines)


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
  """Keeps orbax's per-save INFO chatter and JAX's "Unable to initialize backend 'tpu'" probe
  lines out of the progress log (warnings still show)."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or not (
          "/orbax/" in r.pathname or r.pathname.endswith("xla_bridge.py")))


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


def as_tuple(value, name: str = "value"):
  """A config value given as one number, a tuple or a comma string -> tuple of ints."""
  items = as_paths(value) if isinstance(value, (str, list, tuple)) else (value,)
  out = []
  for v in items:
    try:
      out.append(int(v) if isinstance(v, str) else v)
    except ValueError:
      raise errors.UserError(f"{name}={','.join(map(str, items))} is not a list of integers: "
                             "write e.g. 42,43.") from None
  return tuple(out)


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


def encode_pair(model, prompt: str, target: str, negative_prompt: str = ""):
  from disentangle_jax import models, pipeline  # noqa: PLC0415
  from disentangle_jax import mixing  # noqa: PLC0415
  emb, uncond = models.encode_with_negative(model, [prompt, target], negative_prompt,
                                            pairs=True)  # refuses equal tokens
  c0, c1 = (mixing.select(emb, i) for i in range(2))
  return pipeline.PromptPair(c0=c0, c1=c1, uncond=uncond)


def load_loss_models(loss_cfg, tokenizer):
  from disentangle_jax import loss_models  # noqa: PLC0415
  from disentangle_jax.toy import world  # noqa: PLC0415
  with world.rebuild_hint(loss_cfg.clip_path):
    return loss_models.load_loss_models(loss_models.LossModelConfig(**loss_cfg.to_dict()),
                                        tokenizer=tokenizer)


def sampling(cfg):
  """The config's sampling fields (configs/common.py add_sampling) -> sampling.SamplingConfig,
  validated once; programs without sampler/eta fields sample with DDIM, eta = 0."""
  from disentangle_jax import sampling as sampling_lib  # noqa: PLC0415
  return sampling_lib.SamplingConfig(
      num_steps=cfg.num_steps, kind=cfg.get("sampler", "ddim"), eta=cfg.get("eta", 0.0),
      guidance=cfg.guidance, rng_seed=cfg.rng_seed,
      negative_prompt=cfg.get("negative_prompt", ""))


def edit_spec(cfg, **overrides):
  """configs/disentangle.py (or configs/edit.py) -> disentangle.EditSpec, validating every
  field; ``overrides`` replace fields a preset sets itself (prompts, T*, lambda_late)."""
  from disentangle_jax import disentangle, optimize  # noqa: PLC0415
  fields = dict(
      prompt=cfg.prompt, attribute=cfg.attribute, t_star=cfg.t_star,
      lambda_late=cfg.lambda_late, sampling=sampling(cfg), remat=cfg.remat,
      faithful=cfg.faithful,
      loss=optimize.LossConfig(beta=cfg.loss.beta, preprocess=cfg.loss.preprocess),
      optimizer=optimize.OptimizerConfig(**cfg.optimizer.to_dict()),
      lambda_shape=cfg.get("lambda_shape", "per_step"))
  fields.update(overrides)
  if "seeds" not in fields:
    fields["seeds"] = as_tuple(cfg.seeds, "seeds")
  spec = disentangle.EditSpec(**fields)
  if cfg.num_steps != 50:
    logging.info("num_steps=%d: t_star=%d (step-indexed defaults follow the step count; "
                 "--config.t_star sets it)", cfg.num_steps, spec.t_star)
  return spec


def edit_set(cfg):
  """configs/disentangle.py -> (names, disentangle.EditSet): the presets of `attributes`, or
  the single edit of the config as the set of one (name "")."""
  from disentangle_jax import disentangle  # noqa: PLC0415
  names = as_paths(cfg.attributes)
  if not names:
    return ("",), disentangle.EditSet((edit_spec(cfg),))
  unknown = [n for n in names if n not in cfg.presets]
  if unknown:
    raise ValueError(f"attributes {unknown} are not presets; choose from "
                     f"{', '.join(sorted(cfg.presets))}.")
  if len(set(names)) != len(names):
    raise ValueError(f"attributes {list(names)} lists a preset twice.")
  specs = []
  for name in names:
    p = cfg.presets[name]
    specs.append(edit_spec(cfg, prompt=p.prompt, attribute=p.attribute,
                           t_star=scaled_steps(p.t_star, cfg.num_steps),
                           lambda_late=p.lambda_late))
  return names, disentangle.EditSet(tuple(specs))


def learned_weights(spec, model, cfg, lam, history):
  """The exported weights file of a finished disentangle run."""
  from disentangle_jax import weights_file  # noqa: PLC0415
  return weights_file.learned(spec, model.schedule, lam, history,
                              model=cfg.model.path or f"tiny:{cfg.model.tiny_seed}",
                              optimizer=cfg.optimizer.to_dict())


def png(image) -> bytes:
  import io  # noqa: PLC0415
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()
