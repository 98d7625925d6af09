"""Trust: a run never mixes settings, never loses another run's output, never keeps a NaN,
and every mistake is one ``error:`` line (exit code 2) with no traceback and nothing
half-written.

The command-line cases run the programs as a user does; they share one compilation cache
(conftest.cli) and refuse before compiling wherever the program can.
"""
import json
import os
import signal
import time

import numpy as np
import pytest

from tests.conftest import DISENTANGLE, error_lines, refused as _refused, signal_state
from tests.conftest import snapshot as _snapshot


# ------------------------------------------------------------------------------------------
# Bad flags, config values and presets: refused before any work, no workdir left behind.

BAD_SETTINGS = [
    ("disentangle", ["--config.num_step=10"], "did you mean 'num_steps'"),
    ("disentangle", ["--config=configs/disentangle.py:smiel"], "no preset 'smiel'; presets: "),
    ("edit", ["--config=configs/edit.py:smiel"], "no preset 'smiel'"),
    ("disentangle", ["--config.num_steps=abc"], "--config.num_steps=abc"),
    ("disentangle", ["--config.loss.beta=inf"], "loss.beta=inf must be finite"),
    ("disentangle", ["--config.optimizer.learning_rate=1e30"], "optimizer.learning_rate=1e+30"),
    ("disentangle", ["--config.checkpoint_every=0"], "checkpoint_every=0"),
    ("switch", ["--config.eta=nan"], "eta=nan must be finite"),
    ("switch", ["--config.eta=2.0"], "eta=2.0 is out of range"),
    ("study", ["--config.guidance=inf"], "guidance=inf must be finite"),
    ("switch", ["--config.seeds=1,a"], "seeds=1,a is not a list of integers"),
    ("disentangle", ["--coordinator=localhost:1", "--num_processes=2"], "runs in one process"),
    ("switch", ["--nosuchflag=1"], "unknown flag --nosuchflag"),
]


def test_bad_settings_are_one_line_and_leave_no_workdir(tmp_path, cli):
  # Every case is refused before any JAX work, so they run side by side.
  outs = cli.run_all([(module, tmp_path / f"wd{i}", args)
                      for i, (module, args, _) in enumerate(BAD_SETTINGS)])
  for i, ((module, args, message), out) in enumerate(zip(BAD_SETTINGS, outs)):
    _refused(out, message)
    assert not (tmp_path / f"wd{i}").exists(), (module, args)


def test_show_config_lists_fields_with_values_and_comments(tmp_path, cli):
  out = cli.run("disentangle", tmp_path / "wd", "--show_config", "--config.num_steps=10")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "loss.beta = 0.05  # weight of the VGG content loss" in out.stdout
  assert "t_star = 4  # hard-switch initialisation" in out.stdout  # 20 of 50, at 10 steps
  assert "num_steps = 10" in out.stdout
  assert not (tmp_path / "wd").exists()


def test_refused_run_keeps_an_existing_workdir_and_clears_stale_files(tmp_path, cli):
  wd = tmp_path / "wd"
  (wd / ".staging-abc" / "sub").mkdir(parents=True)
  (wd / ".staging-abc" / "sub" / "edited.png").write_bytes(b"half")
  (wd / "weights.json.tmp-999").write_text("{")
  (wd / "keep.txt").write_text("mine")
  out = cli.run("disentangle", wd, "--config.loss.beta=-1")
  _refused(out, "loss.beta=-1")
  assert sorted(os.listdir(wd)) == [".lock", "keep.txt"]


def test_malformed_weights_files_are_one_line(tmp_path, cli):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"format": "disentangle_jax.weights", "lambda": "0,1",
                             "num_steps": 2, "sampler": "ddim", "prompt": "p",
                             "target_prompt": "p, q"}))
  out = cli.run("switch", tmp_path / "wd", "--config.num_steps=2", f"--config.lambda_files={bad}")
  _refused(out, "entry 'lambda'")
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("data,message", [
    ({"num_steps": "2"}, "entry 'num_steps'"),
    ({"lambda": [0, "x"]}, "'lambda' must be a list of numbers"),
    ({"lambda": [0, float("nan")]}, "non-finite"),
    ({"seeds": [1.5]}, "'seeds' must be a list of integers"),
    ({"eta": None}, "entry 'eta'"),
    ({"sampler": None}, "entry 'sampler'"),
])
def test_weights_file_fields_are_validated(tmp_path, data, message):
  from disentangle_jax import errors, weights_file  # pylint: disable=import-outside-toplevel
  good = {"format": "disentangle_jax.weights", "lambda": [0.0, 1.0], "num_steps": 2,
          "sampler": "ddim", "prompt": "p", "target_prompt": "p, q"}
  path = tmp_path / "w.json"
  path.write_text(json.dumps(good | data))
  with pytest.raises(errors.UserError, match=message) as e:
    weights_file.read(str(path))
  assert str(path) in str(e.value)


def test_process_zero_without_its_peer_is_one_line(tmp_path, cli):
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  out = cli.run("study", tmp_path / "wd", f"--coordinator=localhost:{port}", "--num_processes=2",
                "--process_id=0", "--init_timeout=2")
  _refused(out, "only 0 of the 1 other processes joined within 2s")
  assert time.monotonic() - start < 120
  assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------------------------------
# One writer per workdir; a resumed run never mixes settings; a damaged checkpoint falls back.

# One writer per workdir, refused resumes with other settings and the fallback from a damaged
# checkpoint: tests/test_cli.py::test_disentangle_kill_resume_one_writer_and_checkpoint_fallback
# (one program run side by side with the kill/resume case).

def test_identity_covers_models_files_and_sizes(tmp_path):
  from configs import disentangle as presets  # pylint: disable=import-outside-toplevel
  from disentangle_jax import errors, run_identity  # pylint: disable=import-outside-toplevel
  cfg = presets.get_config("smile")
  base = run_identity.of_config(cfg.to_dict(), {"latent_shape": [8, 8, 4]})
  changed = []
  for field, value in (("loss_models.tiny_seed", 1), ("image_size", 128),
                       ("model.dtype", "bfloat16"), ("model.attention", "chunked"),
                       ("loss.beta", 0.03), ("prompt", "A photo of face")):
    other = cfg.copy_and_resolve_references()
    section, _, leaf = field.rpartition(".")
    (other[section] if section else other)[leaf] = value
    with pytest.raises(errors.RunMismatch, match=field.replace(".", r"\.") + ": saved"):
      run_identity.check(base, run_identity.of_config(other.to_dict(), {"latent_shape": [8, 8, 4]}),
                         "w", "use a new --workdir")
    changed.append(field)
  assert len(changed) == 6
  other = cfg.copy_and_resolve_references()
  other.checkpoint_every = 5  # cannot change results: not part of the identity
  other.mesh.model = 2  # the device layout: float reduction order only
  run_identity.check(base, run_identity.of_config(other.to_dict(), {"latent_shape": [8, 8, 4]}),
                     "w", "x")
  # A run saved before lambda_shape existed resumes at its default, not at another value.
  older = {k: v for k, v in base.items() if k != "lambda_shape"}
  run_identity.check(older, base, "w", "x")
  with pytest.raises(errors.RunMismatch, match="lambda_shape: saved \"<unset>\", now \"per_token\""):
    run_identity.check(older, dict(base, lambda_shape="per_token"), "w", "x")
  model = tmp_path / "sd"
  (model / "unet").mkdir(parents=True)
  (model / "unet" / "w.msgpack").write_bytes(b"a" * 100)
  cfg.model.path = str(model)
  before = run_identity.of_config(cfg.to_dict())
  (model / "unet" / "w.msgpack").write_bytes(b"b" * 100)  # replaced in place, same size
  with pytest.raises(errors.RunMismatch, match=r"model\.path#content"):
    run_identity.check(before, run_identity.of_config(cfg.to_dict()), "w", "x")
  # A 3 MiB file edited in its middle (outside the hashed first and last MiB), same size: its
  # modification time tells. A saved identity from before that check still resumes.
  big = model / "unet" / "w.msgpack"
  big.write_bytes(bytes(3 << 20))
  before = run_identity.of_config(cfg.to_dict())
  old_mtime = big.stat().st_mtime_ns
  while big.stat().st_mtime_ns == old_mtime:  # a later clock tick than the first write
    time.sleep(0.01)
    with open(big, "r+b") as f:
      f.seek(3 << 19)
      f.write(b"\x01")
  after = run_identity.of_config(cfg.to_dict())
  assert after["model.path#content"] == before["model.path#content"]  # the edges miss it
  with pytest.raises(errors.RunMismatch, match=r"model\.path#modified: saved"):
    run_identity.check(before, after, "w", "x")
  run_identity.check({k: v for k, v in before.items() if not k.endswith("#modified")}, after,
                     "w", "x")


def test_one_writer_even_when_the_lock_file_is_deleted(tmp_path):
  from disentangle_jax import errors, workdir  # pylint: disable=import-outside-toplevel
  with workdir.claim(str(tmp_path / "wd"), log=lambda s: None) as wd:
    with pytest.raises(errors.WorkdirBusy, match=f"in use by another run \\(pid {os.getpid()}\\)"):
      workdir.Lock(wd)
    os.remove(os.path.join(wd, workdir.LOCK_FILE))  # by hand, under the running process
    with pytest.raises(errors.WorkdirBusy, match=r"in use by another run \(pid unknown\)"):
      workdir.Lock(wd)  # the folder itself is locked
    assert not os.path.exists(os.path.join(wd, workdir.LOCK_FILE))
  workdir.Lock(wd).release()  # released with the run


def test_lost_iteration_images_are_rendered_again_or_left_out(tmp_path):
  """Derived files are never required: iteration images deleted or cut after a kill are
  rendered again from the lambdas the checkpoint records, or left out with one warning where
  no lambda is known. launch.disentangle publishes through these two functions (a resumed
  program rebuilt a deleted and a cut image pixel-identical to the lost ones, by hand)."""
  from disentangle_jax import disentangle, images  # pylint: disable=import-outside-toplevel
  history = [{"iteration": k, "loss": 1.0 / k} for k in (1, 2, 3, 4)]
  lams = [np.full((1, 4), k, np.float32) for k in (0, 1, 2, 3)]

  def render(lam):  # uint8 [B=2, 4, 4, 3] telling which lambda it was rendered with
    return np.full((2, 4, 4, 3), int(lam.flat[0]) * 40, np.uint8)

  class Checkpoints:  # the newest checkpoint is iteration 3's and records 1 and 3 only
    def latest_step(self):
      return 3

    def read_meta(self, step):
      return {"history": history[:3], "lambdas": [lams[0].tolist(), None, lams[2].tolist()]}

  recorded = disentangle.iteration_lambdas(Checkpoints(), 4, lams[3])
  assert [None if l is None else float(l.flat[0]) for l in recorded] == [0, None, 2, 3]
  wd = tmp_path / "iterations"
  for k in (1, 2, 3, 4):
    disentangle.write_iteration(str(wd), k, history[k - 1], render(lams[k - 1]))
  want = [images.load_png(str(wd / f"iter_00{k}.png")) for k in (1, 3, 4)]
  (wd / "iter_001.png").unlink()
  (wd / "iter_003.json").unlink()
  (wd / "iter_002.png").write_bytes((wd / "iter_002.png").read_bytes()[:60])  # cut
  (wd / "iter_004.png").write_bytes((wd / "iter_004.png").read_bytes()[:150])
  logs, warnings = [], []
  cells, labels = disentangle.iteration_strip(str(wd), history, recorded, render, logs.append,
                                              warnings.append)
  assert labels == ["it 0", "it 2", "it 3"]  # iteration 2's lambda is not known: left out
  for got, expected in zip(cells, want):
    np.testing.assert_array_equal(got, expected)
  assert len(logs) == 2 and "iter_001.png was missing or unreadable" in logs[0]
  assert len(warnings) == 1 and "iter_002.png is missing or unreadable" in warnings[0]
  assert json.loads((wd / "iter_003.json").read_text()) == history[2]
  assert disentangle.iteration_lambdas(None, 2, lams[1])[0] is None  # no checkpoints at all


def test_ctrl_c_is_one_line_saying_the_run_resumes(tmp_path, cli):
  proc = cli.popen("disentangle", tmp_path / "wd", *DISENTANGLE, fresh=True)  # a real exit
  state = ""
  for line in proc.stderr:
    if "c0=" in line:
      state = signal_state(proc.pid)
      proc.send_signal(signal.SIGINT)
      break
  rest = proc.stderr.read()
  assert proc.wait(timeout=600) == 130, (f"program's signals: {state}; this process's: "
                                         f"{signal_state(os.getpid())}\n{rest[-3000:]}")
  lines = error_lines(rest)
  assert len(lines) == 1 and "Run the same command again to resume" in lines[0], rest[-3000:]
  assert "Traceback" not in rest
  assert not (tmp_path / "wd" / "weights.json").exists()


# ------------------------------------------------------------------------------------------
# Output names never collide; a study never mixes models; damaged chunks are recomputed.

# Columns from same-named files: tests/test_cli.py::test_switch_grid_with_learned_and_same_named_columns.


def test_source_labels_avoid_the_baselines():
  from disentangle_jax import errors, weights_file  # pylint: disable=import-outside-toplevel
  from disentangle_jax import study  # pylint: disable=import-outside-toplevel
  reserved = ["c0", "T*=10", "c1"]
  labels = weights_file.unique_labels(["/x/run1/T10.json", "/x/run2/c1.json", "/x/w.json"],
                                      reserved, key=study.file_label)
  assert labels == ("run1_T10", "run2_c1", "w")
  with pytest.raises(errors.UserError, match="cannot get distinct output names"):
    weights_file.unique_labels(["/c1.json"], reserved, key=study.file_label)


# A study never mixes models and recomputes damaged chunks:
# tests/test_study.py::test_study_kill_resume_other_model_and_damaged_chunks.


# ------------------------------------------------------------------------------------------
# In-process pieces: the error formatter, the notices, recompiles, configs.

def test_os_errors_and_ctrl_c_in_a_program_are_one_line(capsys):
  import errno  # pylint: disable=import-outside-toplevel
  from launch import failures  # pylint: disable=import-outside-toplevel

  def full_disk(argv):
    raise OSError(errno.ENOSPC, "No space left on device", "/w/edited.png")

  def interrupted(argv):
    raise KeyboardInterrupt

  for main, code, message in ((full_disk, 2, "the disk is full"),
                              (interrupted, 130, "to resume")):
    with pytest.raises(SystemExit) as e:
      failures.guarded(main)(["prog"])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and message in err


def test_library_calls_drop_the_deprecation_notices_only_inside(tiny_model):
  import logging  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from disentangle_jax import models  # pylint: disable=import-outside-toplevel

  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = Keep()
  root = logging.getLogger("diffusers")
  level = root.level
  root.setLevel(logging.WARNING)  # the tests' environment sets DIFFUSERS_VERBOSITY=error
  root.addHandler(handler)
  try:
    eps = models.make_eps_fn(tiny_model.unet)
    x = jnp.zeros((1, 8, 8, 4))
    emb = jnp.zeros((1, 77, tiny_model.params["text_encoder"]["text_model"]["embeddings"]
                     ["token_embedding"]["embedding"].shape[1]))
    jax.eval_shape(eps, tiny_model.params["unet"], x, 1, emb)  # traces every Flax module
    assert not [r for r in records if "deprecated" in r]
    logging.getLogger("diffusers.models").warning("Flax classes are deprecated (outside)")
    assert records == ["Flax classes are deprecated (outside)"]  # untouched outside our calls
  finally:
    root.removeHandler(handler)
    root.setLevel(level)


def test_guidance_as_int_or_numpy_scalar_does_not_recompile(tiny_model):
  import jax  # pylint: disable=import-outside-toplevel
  from disentangle_jax import mixing, models, noise, pipeline, sampler  # noqa  # pylint: disable=import-outside-toplevel
  from disentangle_jax import schedule  # pylint: disable=import-outside-toplevel
  c0, c1, uncond = models.encode_prompts(tiny_model, ["a photo", "a photo, smiling", ""])
  tables = schedule.step_tables(tiny_model.schedule, 2, eta=0.0)
  run = noise.draw(jax.random.key(0), [1], (8, 8, 4), tables.sigma)
  render = pipeline.make_render_fn(models.make_eps_fn(tiny_model.unet),
                                   models.make_decode_fn(tiny_model.vae,
                                                         tiny_model.scaling_factor),
                                   sampler.SamplerConfig("ddim"))
  lam = mixing.hard_switch(2, 1)
  prompts = pipeline.PromptPair(c0, c1, uncond)
  outs = [render(tiny_model.params, run.x_T, run.noise, lam, prompts, g, tables)
          for g in (7.5, 7, np.float64(7.0), np.int64(7))]
  assert render._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(outs[2]))


def _config(name, arg):
  import importlib  # pylint: disable=import-outside-toplevel
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_step_indexed_defaults_follow_num_steps_until_set():
  cfg = _config("disentangle", "smile")
  assert (cfg.num_steps, cfg.t_star) == (50, 20)
  cfg.num_steps = 10
  assert cfg.t_star == 4
  cfg.t_star = 7
  cfg.num_steps = 20
  assert cfg.t_star == 7  # set explicitly: it stays
  edit = _config("edit", "snow")
  edit.num_steps = 10
  assert (edit.t_star, edit.inject_steps) == (2, 7)  # 10 and 33 of 50


def test_every_disentangle_preset_works_in_edit():
  from configs import disentangle  # pylint: disable=import-outside-toplevel
  for name, (prompt, attribute, _, t_star, _) in disentangle.PRESETS.items():
    cfg = _config("edit", name)
    assert cfg.prompt == prompt and cfg.attribute == attribute
    if name != "snow":  # snow is the release's real-image example (T* = 10)
      assert cfg.t_star == t_star
