"""Pieces every entry point shares: flag parsing, the workdir claim and config -> library
objects.

Every program is started with ``common.run(main)``: a bad flag, config field, preset or value,
a user error (errors.UserError) or an OS error (missing file, full disk) anywhere in the run,
and Ctrl-C each end in exactly one ``error: ...`` line (launch/failures.py) instead of a
traceback. Every program also speaks the same way: ``--help`` prints its docstring and its own
flags (exit 0), ``--show_config`` prints the config and exits (no --workdir needed), an
unexpected positional argument is one ``error:`` line, and a workdir another program wrote is
refused (claim_workdir records the writer in ``<workdir>/.program``).
"""
import contextlib
import logging as std_logging
import os
import re
import sys
import warnings

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
    "coordinator", "",
    "Multi-process runs: HOST:PORT of process 0 (every process passes the same), or 'auto' on "
    "a TPU pod; empty = one process. Env: DISENTANGLE_COORDINATOR.")
# The bounds are absl's: a flag value below them is one error line naming the flag.
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1,
    "Number of processes with --coordinator=HOST:PORT. Env: DISENTANGLE_NUM_PROCESSES.",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", 0,
    "This process's index in [0, num_processes). Env: DISENTANGLE_PROCESS_ID.", lower_bound=0)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 300, "Seconds to wait for the coordinator and every process to join.",
    lower_bound=1)
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every config field with its value and comment, then exit.")
_DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id", "init_timeout")
# Environment variables that give a flag its default: (flag, variable, lowest integer value or
# None for a string). Read when the flags are parsed, so a bad value is one error line.
_ENV_DEFAULTS = (("coordinator", "DISENTANGLE_COORDINATOR", None),
                 ("num_processes", "DISENTANGLE_NUM_PROCESSES", 1),
                 ("process_id", "DISENTANGLE_PROCESS_ID", 0))
# The flags defined below (by define_flags) belong to the program that calls it, so that its
# --help lists them (absl attributes a flag to the module whose code defines it).
flags.disclaim_key_flags()

PROGRAM_FILE = ".program"  # in a workdir: the program that wrote it (claim_workdir)
_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def run(main) -> None:
  """``app.run(main)`` with one-line errors (see the module docstring), --help and
  --show_config; every program but --help and --show_config needs --workdir."""
  app.run(failures.guarded(main), flags_parser=_parse_flags)


def define_flags(config_file: str, multi_process: bool = False):
  """(--config, --workdir): the flags every program takes; ``config_file`` is the default.
  Call it at the top of the program's module: its --help lists these flags, the common ones
  and, with ``multi_process``, --coordinator, --num_processes, --process_id, --init_timeout.

  ml_collections reads --config.<field> overrides from sys.argv while the flag is defined (at
  import), so a bad override is reported here, as one line."""
  from ml_collections import config_flags  # noqa: PLC0415
  try:
    config = config_flags.DEFINE_config_file(
        "config", config_file, "Config file[:arguments]; override fields with "
        "--config.<field>=v; --show_config lists every field.")
  except Exception as e:  # noqa: BLE001 -- absl/ml_collections raise many kinds
    failures.fail(failures.flag_error(e, sys.argv))
  workdir = flags.DEFINE_string("workdir", None, "Output directory (created if missing); "
                                "needed by every run but --help and --show_config.")
  for name in ("show_config", "compilation_cache") + (_DISTRIBUTED_FLAGS if multi_process
                                                      else ()):
    flags.declare_key_flag(name)
  return config, workdir


def single_process_main(program: str, config, workdir, run_fn):
  """The ``main`` of a program that runs in one process: the parsed config, process
  settings, the claimed workdir, then ``run_fn(cfg, out_dir)``."""
  def main(argv):
    del argv  # _parse_flags refused positional arguments
    cfg = config.value
    setup_process()
    require_single_process(program)
    with claim_workdir(workdir.value, program) as out_dir:
      run_fn(cfg, out_dir)
  return main


def _parse_flags(argv):
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in _HELP for a in options):
    print(program_help())
    sys.exit(0)
  _env_defaults()
  try:
    args = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- absl/ml_collections raise many kinds
    failures.fail(failures.flag_error(e, argv))
  if _SHOW_CONFIG.value:
    print(describe_config(flags.FLAGS["config"]))
    sys.exit(0)
  if len(args) > 1:
    failures.fail(f"unexpected argument(s) {' '.join(args[1:])!r}: every setting is a flag "
                  "(--name=value, --config.<field>=value); --help lists the flags.")
  if "workdir" in flags.FLAGS and not flags.FLAGS.workdir:
    failures.fail("--workdir is required: pass --workdir=DIR (created if missing).")
  return args


def _env_defaults() -> None:
  """Sets the _ENV_DEFAULTS flags' defaults from the environment (a flag given still wins); a
  value that is not an integer in range is one error line naming the variable."""
  for name, variable, low in _ENV_DEFAULTS:
    text = os.environ.get(variable, "").strip()
    if not text or name not in flags.FLAGS:
      continue
    if low is None:
      flags.FLAGS.set_default(name, text)
      continue
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < low:
      failures.fail(f"environment variable {variable}={text!r} must be an integer >= {low} "
                    f"(it sets --{name}): set it to one, or unset it.")
    flags.FLAGS.set_default(name, value)


def program_help() -> str:
  """--help: the program's docstring and its own flags (absl's key flags of __main__)."""
  main_module = sys.modules.get("__main__")
  doc = (getattr(main_module, "__doc__", None) or "").strip()
  own = flags.FLAGS.main_module_help().strip().split("\n")[1:]  # less the module's file name
  return (f"{doc}\n\nFlags:\n" + "\n".join(own) + "\n\n--show_config lists every config "
          "field; --helpfull lists every flag of every library.")


def require_single_process(program: str) -> None:
  """Refuses the multi-process flags in programs that run in one process."""
  if _COORDINATOR.value or _NUM_PROCESSES.value != 1 or _PROCESS_ID.value != 0:
    raise errors.UserError(
        f"{program} runs in one process (its batch is sharded over this process's devices); "
        "--coordinator, --num_processes and --process_id are for launch.study. Drop them (and "
        "the DISENTANGLE_* environment variables).")


@contextlib.contextmanager
def claim_workdir(path: str, program: str, lock: bool = True):
  """The workdir, created if needed and locked for this run (workdir.claim), refused when
  another program wrote it (its outputs, checkpoints and resume rules are not this program's).

  The writer is recorded in <workdir>/.program when the run claims the workdir; a run that
  fails before writing any file takes a record it made away again, so a refused run leaves the
  workdir as it found it."""
  from disentangle_jax import workdir  # noqa: PLC0415
  with workdir.claim(path, lock=lock, log=logging.info) as out_dir:
    marker = os.path.join(out_dir, PROGRAM_FILE)
    try:
      with open(marker) as f:
        writer = f.read().strip()
    except FileNotFoundError:
      writer = None
    if writer is not None and writer != program:
      raise errors.UserError(
          f"workdir {path!r} was written by {writer}, not {program}: choose another --workdir "
          f"for {program}.")
    if not lock or writer is not None:
      yield out_dir
      return
    before = _files(out_dir)
    workdir.write_atomic(marker, program + "\n")
    try:
      yield out_dir
    except BaseException:
      if _files(out_dir) == before:
        with contextlib.suppress(OSError):
          os.remove(marker)
      raise


def _files(folder: str) -> set[str]:
  """Every file below ``folder`` but the lock and the program record (relative paths)."""
  from disentangle_jax import workdir  # noqa: PLC0415
  return {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder)
          for n in names} - {workdir.LOCK_FILE, PROGRAM_FILE}


def identity(cfg, **extra) -> dict:
  """The run identity of this program's config (run_identity.of_config; paths portable)."""
  from disentangle_jax import run_identity  # noqa: PLC0415
  return portable(run_identity.of_config(cfg.to_dict(), extra))


# The checkout this program runs from. Results name paths inside it relative to it, so that no
# file a program writes names a folder of this machine (configs/toy.py's model paths are
# absolute: the toy world is found from any working directory).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(value):
  """``value`` (a JSON-like tree) with every path inside this checkout written relative to it
  ("<checkout>/disentangle_jax/toy/weights/sd" -> "disentangle_jax/toy/weights/sd"); paths the
  user gave relative, or outside the checkout, stay as given."""
  if isinstance(value, str):
    return value.replace(REPOSITORY + os.sep, "") if value != REPOSITORY else "."
  if isinstance(value, dict):
    return {k: portable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [portable(v) for v in value]
  return value


def config_json(cfg) -> str:
  """config.json: every field of the run's config, paths portable."""
  import json  # noqa: PLC0415
  return json.dumps(portable(json.loads(cfg.to_json_best_effort())), indent=2) + "\n"


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


def mesh(cfg):
  """The device mesh of ``cfg.mesh`` (seeds x model, over every process's devices); a model
  axis that does not divide the device count is one error line naming config.mesh.model."""
  from disentangle_jax import parallel  # noqa: PLC0415
  with user_errors():
    return parallel.make_mesh(model=cfg.mesh.model)


def setup_process() -> None:
  """Process-wide settings every entry point applies before any JAX work."""
  quiet_library_logs()
  if _CACHE.value:
    import jax  # noqa: PLC0415
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_library_logs() -> None:
  """Keeps orbax's per-save INFO chatter and JAX's "Unable to initialize backend 'tpu'" probe
  lines out of the progress log (warnings still show), and orbax's errors to their one line:
  a failed save (full disk) is the program's one ``error:`` line (checkpoint.py), not a
  traceback per orbax thread."""
  logging.get_absl_handler().addFilter(_library_record)
  sys.excepthook = _without_late_callbacks(sys.excepthook)
  sys.unraisablehook = _without_late_callbacks(sys.unraisablehook, unraisable=True)
  # orbax's save threads cancelled after a failed save (checkpoint._settle) leave coroutines
  # they never started; Python warns about each at exit, after the program's one line.
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def _without_late_callbacks(hook, unraisable: bool = False):
  """``hook`` (sys.excepthook, or sys.unraisablehook with ``unraisable``) less tensorstore's
  report of a read that finished after orbax's event loop closed: when one array of a
  checkpoint cannot be read, orbax's restore fails at once and closes its loop while
  tensorstore still reads the others; their completion callbacks then raise "Event loop is
  closed" inside asyncio, and tensorstore prints that as an unraisable error (a bare
  traceback), next to the program's one line. The callback has nothing left to deliver (the
  failure is already reported): only that error, raised in asyncio, is dropped."""
  import traceback  # noqa: PLC0415
  def late(kind, value, tb) -> bool:
    frames = traceback.extract_tb(tb) if tb is not None else []
    return (kind is RuntimeError and str(value) == "Event loop is closed" and bool(frames)
            and frames[-1].filename.endswith(os.path.join("asyncio", "base_events.py")))
  if unraisable:
    return lambda u: None if late(u.exc_type, u.exc_value, u.exc_traceback) else hook(u)
  return lambda kind, value, tb: None if late(kind, value, tb) else hook(kind, value, tb)


def _library_record(record) -> bool:
  """The absl handler's filter of quiet_library_logs: False drops ``record``."""
  library = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
  if library and record.levelno >= std_logging.WARNING:
    record.exc_info, record.exc_text = None, None
  return record.levelno >= std_logging.WARNING or not library


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
  """A config value given as one number, a tuple or a comma string -> tuple of ints. An item
  "A-B" (A <= B, both >= 0) stands for A, A+1, ..., B: --config.seeds=0-255."""
  items = as_paths(value) if isinstance(value, (str, list, tuple)) else (value,)
  out = []
  for v in items:
    try:
      if isinstance(v, str) and "-" in v.strip("-"):
        lo, hi = (int(x) for x in v.split("-"))
        if not 0 <= lo <= hi:
          raise ValueError(v)
        out.extend(range(lo, hi + 1))
      else:
        out.append(int(v) if isinstance(v, str) else v)
    except ValueError:
      raise errors.UserError(f"{name}={','.join(map(str, items))} is not a list of integers: "
                             "write e.g. 42,43 or a range 0-255.") from None
  return tuple(out)


def as_paths(value) -> tuple[str, ...]:
  """A config value given as one path, a tuple, or a comma-separated string -> tuple of paths."""
  if not value:
    return ()
  if isinstance(value, str):
    value = (value,)
  # ml_collections may hand "a,b" over as the tuple ("a,b",): split every entry.
  return tuple(p.strip() for v in value for p in str(v).split(",") if p.strip())


def load_model(model_cfg, mesh=None):
  """models.load of ``model_cfg``; with ``mesh`` (``mesh(cfg)``) the weights go straight onto
  it, split over its model axis (no device holds the whole model on the way)."""
  from disentangle_jax import models  # noqa: PLC0415
  from disentangle_jax.toy import world  # noqa: PLC0415
  with world.rebuild_hint(model_cfg.path):  # toy-world weights: errors say how to rebuild
    return models.load(models.ModelConfig(**model_cfg.to_dict()), mesh)


def encode_pair(model, prompt: str, target: str, negative_prompt: str = ""):
  from disentangle_jax import models, pipeline  # noqa: PLC0415
  from disentangle_jax import mixing  # noqa: PLC0415
  emb, uncond = models.encode_with_negative(model, [prompt, target], negative_prompt,
                                            pairs=True)  # refuses equal tokens
  c0, c1 = (mixing.select(emb, i) for i in range(2))
  return pipeline.PromptPair(c0=c0, c1=c1, uncond=uncond)


def load_loss_models(loss_cfg, tokenizer, mesh=None):
  from disentangle_jax import loss_models  # noqa: PLC0415
  from disentangle_jax.toy import world  # noqa: PLC0415
  # An empty path selects the network's tiny random version, as unset does (a preset that sets
  # a path is undone with --config.loss_models.vgg_path=).
  fields = {k: None if k.endswith("_path") and v == "" else v for k, v in loss_cfg.items()}
  with world.rebuild_hint(fields["clip_path"]):
    return loss_models.load_loss_models(loss_models.LossModelConfig(**fields),
                                        tokenizer=tokenizer, mesh=mesh)


def sampling(cfg):
  """The config's sampling fields (configs/common.py add_sampling) -> sampling.SamplingConfig,
  validated once; programs without sampler/eta fields sample with DDIM, eta = 0. Settings an
  SD 3.x / Flux.1 model (known from the model section, before it loads) cannot honour are
  refused here by name (flow_settings.check)."""
  from disentangle_jax import flow_settings  # noqa: PLC0415
  from disentangle_jax import sampling as sampling_lib  # noqa: PLC0415
  s = sampling_lib.SamplingConfig(
      num_steps=cfg.num_steps, kind=cfg.get("sampler", "ddim"), eta=cfg.get("eta", 0.0),
      guidance=cfg.guidance, rng_seed=cfg.rng_seed,
      negative_prompt=cfg.get("negative_prompt", ""))
  flow_settings.check(flow_family(cfg), s, pin=cfg.get("pin"),
                      torch_numerics=cfg.get("model", {}).get("torch_numerics", False))
  return s


def flow_family(cfg):
  """"sd3" | "flux" when the config's model is a flow model (flow_settings.family), else None."""
  from disentangle_jax import flow_settings  # noqa: PLC0415
  model = cfg.get("model", {})
  return flow_settings.family(model.get("tiny_family", ""), model.get("path"))


def weights_sampler(cfg, sampling_config) -> str:
  """The sampler entry a weights file must have to fit this run: flow_settings.SAMPLER for a
  flow model (so a UNet model's file is refused by name, and the reverse), else the config's."""
  from disentangle_jax import flow_settings  # noqa: PLC0415
  return flow_settings.SAMPLER if flow_family(cfg) else sampling_config.kind


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
  from disentangle_jax import models, pipeline, weights_file  # noqa: PLC0415
  name = portable(cfg.model.path) or f"tiny:{cfg.model.tiny_seed}"  # as given, or relative
  # The sampler and schedule that ran: a flow model's Euler sampler and flow schedule.
  sampler, schedule = models.weights_record(
      model, spec.sampling, pipeline.latent_shape(model, cfg.image_size)[:2])
  return weights_file.learned(spec, schedule, lam, history, model=name,
                              optimizer=cfg.optimizer.to_dict(), sampler=sampler)
