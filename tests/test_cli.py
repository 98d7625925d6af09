"""The command lines end to end on the tiny model (subprocesses, as a user runs them)."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DISENTANGLE, ROOT, refused as _refused, snapshot as _snapshot
from tests.conftest import error_lines, lines_until as _lines_until, write_weights

pytestmark = pytest.mark.slow  # subprocesses (conftest.cli: one compilation cache per session)


def test_disentangle_kill_resume_one_writer_and_checkpoint_fallback(tmp_path, cli):
  """One program (compiled once per session), side by side: an uninterrupted run, a run killed
  after its first iteration (then resumed), a second writer refused; then settings that
  cannot resume and damaged checkpoints."""
  full, killed = tmp_path / "full", tmp_path / "killed"
  first = cli.popen("disentangle", full, *DISENTANGLE)
  log = []
  _lines_until(first.stderr, "c0=", log)  # the first run holds the lock from its start
  start = time.monotonic()
  second = cli.run("disentangle", full, *DISENTANGLE, "--config.optimizer.learning_rate=0.1")
  _refused(second, f"is in use by another run (pid {first.pid})")
  assert time.monotonic() - start < 120  # refused at once

  # Started once the first run has compiled (and cached) its programs, so it compiles nothing.
  # Killed as soon as the first iteration is reported: wherever the kill lands (before, during
  # or after a checkpoint), the same command must finish with the same lambda.
  _lines_until(first.stderr, "iteration 1/3", log)
  victim = cli.popen("disentangle", killed, *DISENTANGLE)
  _lines_until(victim.stderr, "iteration 1/3", [])
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=600) == -signal.SIGKILL
  assert not (killed / "weights.json").exists()  # nothing final was published
  log.append(first.stderr.read())
  assert first.wait(timeout=600) == 0, "".join(log)[-3000:]
  assert "iteration 3/3" in "".join(log) and "ETA" in "".join(log)
  for phase in ("rendering the originals", "compiling the update step",
                "rendering the final images"):  # a line before each silent phase
    assert phase in "".join(log), phase
  expected = json.loads((full / "weights.json").read_text())
  for name in ("original.png", "edited.png", "pair.png", "strip.png", "lambda.png", "losses.png",
               "metrics.jsonl", "config.json"):
    assert (full / name).is_file(), name

  again = cli.run("disentangle", killed, *DISENTANGLE, fresh=True)  # a real `python -m`
  assert again.returncode == 0, again.stderr[-3000:]
  got = json.loads((killed / "weights.json").read_text())
  assert got["lambda"] == expected["lambda"]  # bit-identical
  assert got["loss_history"] == expected["loss_history"]
  rows = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().split("\n") if l]
  assert [r["iteration"] for r in rows] == [1, 2, 3]
  assert got["num_steps"] == 4 and got["sampler"] == "ddim" and got["seeds"] == [42]
  assert got["target_prompt"] == "A photo of church exterior, covered by snow"
  assert np.asarray(got["lambda"]).shape == (4,)

  # Other settings in the finished workdir: refused before any compilation, nothing changed.
  before = _snapshot(full)
  for change, field in (("--config.model.tiny_seed=1", "model.tiny_seed: saved 0, now 1"),
                        ("--config.num_steps=3", "num_steps: saved 4, now 3")):
    out = cli.run("disentangle", full, *DISENTANGLE, change)  # one at a time: the lock
    _refused(out, field)
    assert "was saved by a run with other settings" in out.stderr
    assert "rerun with the saved settings" in out.stderr and "new --workdir" in out.stderr
  assert _snapshot(full) == before  # the refused runs changed nothing

  shutil.rmtree(full / "checkpoints" / "3" / "state")  # the newest checkpoint is damaged
  strip = np.asarray(Image.open(full / "strip.png"))
  shutil.rmtree(full / "iterations")  # and the derived iteration images are lost
  again = cli.run("disentangle", full, *DISENTANGLE)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "checkpoint 3" in again.stderr and "unreadable" in again.stderr
  assert "resumed from iteration 2 of 3" in again.stderr
  got = json.loads((full / "weights.json").read_text())
  assert got["lambda"] == expected["lambda"] and got["loss_history"] == expected["loss_history"]
  # iterations 1 and 2 rendered again from the lambdas their checkpoints record
  assert np.array_equal(np.asarray(Image.open(full / "strip.png")), strip)
  assert sorted(os.listdir(full / "iterations")) == sorted(
      f"iter_{i:03d}.{ext}" for i in (1, 2, 3) for ext in ("png", "json"))

  for step in os.listdir(full / "checkpoints"):  # every checkpoint damaged: one line, the fix
    shutil.rmtree(full / "checkpoints" / step / "state")
  out = cli.run("disentangle", full, *DISENTANGLE)
  _refused(out, "can be read")
  assert f"delete {full / 'checkpoints'}" in out.stderr


BAD_INPUT = [
    ("switch", ["--config.model.path=/nonexistent/sd"], "/nonexistent/sd"),
    ("switch", ["--config.num_steps=0"], "num_steps=0"),
    ("switch", ["--config.t_stars=3,70"], "t_star=70"),
    ("switch", ["--config.image_size=72"], "multiple of 16"),
    ("switch", ["--config.seeds=1,1"], "duplicates"),
    ("disentangle", ["--config.t_star=51"], "t_star=51"),
    ("disentangle", ["--config.optimizer.iterations=0"], "iterations"),
]


@pytest.fixture(scope="module")
def refused(cli, tmp_path_factory):
  """(workdir, result) of every BAD_INPUT run, run side by side (each fails before JAX work)."""
  root = tmp_path_factory.mktemp("refused")
  runs = [(module, root / str(i) / "wd", overrides)
          for i, (module, overrides, _) in enumerate(BAD_INPUT)]
  return [(wd, out) for (_, wd, _), out in zip(runs, cli.run_all(runs))]


@pytest.mark.parametrize("index,message", [(i, m) for i, (_, _, m) in enumerate(BAD_INPUT)],
                         ids=[f"{m}-{o[0]}" for m, o, _ in BAD_INPUT])
def test_bad_input_gives_one_clear_error_and_writes_nothing(refused, index, message):
  wd, out = refused[index]
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: " in out.stderr and message in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert not wd.exists()  # a refused run leaves no workdir behind


def test_unwritable_workdir(tmp_path, cli):
  (tmp_path / "file").write_text("x")
  out = cli.run("switch", tmp_path / "file" / "wd")
  assert out.returncode == 2 and "not writable" in out.stderr, out.stderr[-2000:]


def _weights_file(path, num_steps=4, sampler="ddim"):
  write_weights(path, (0.0, 0.5, 1.0, 1.0)[:num_steps] + (1.0,) * max(0, num_steps - 4),
                num_steps, sampler)


def test_switch_grid_with_learned_and_same_named_columns(tmp_path, cli):
  """One grid: the built-in columns, a learned weights file, and files whose derived names
  collide (same file name in two folders, a file named like a built-in column)."""
  _weights_file(tmp_path / "learned.json")
  runs = tmp_path / "runs"
  write_weights(runs / "a" / "weights.json", (0.0, 1.0, 1.0, 1.0))
  write_weights(runs / "b" / "weights.json", (0.5, 1.0, 1.0, 1.0))
  (runs / "c0.json").write_text("[0.25, 0.75, 1, 1]")  # named like a built-in column
  files = ",".join([str(tmp_path / "learned.json"),
                    str(runs / "a" / "weights.json"),  # absolute
                    os.path.relpath(runs / "b" / "weights.json", ROOT),  # ../ relative
                    str(runs / "c0.json")])
  wd = tmp_path / "wd"
  out = cli.run("switch", wd, "--config.num_steps=4", "--config.t_stars=1,3",
                "--config.seeds=5,6,7", f"--config.lambda_files={files}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Unable to initialize backend" not in out.stderr  # no TPU probe noise on a CPU host
  assert "column 'a_weights'" in out.stderr  # the derived names are in the log
  columns = ("c0", "T1", "T3", "c1", "learned", "a_weights", "b_weights", "runs_c0")
  grid = Image.open(wd / "grid.png")
  assert grid.width > len(columns) * 64 and grid.height > 3 * 64  # 3 seeds x the columns
  assert sorted(os.listdir(wd / "images")) == sorted(
      f"seed{s}_{n}.png" for s in (5, 6, 7) for n in columns)
  lambdas = json.loads((wd / "lambdas.json").read_text())
  assert lambdas["T*=1"] == [0.0, 1.0, 1.0, 1.0] and lambdas["c0"] == [0.0] * 4
  assert lambdas["learned"] == [0.0, 0.5, 1.0, 1.0]
  assert lambdas["runs_c0"] == [0.25, 0.75, 1.0, 1.0]
  assert lambdas["a_weights"] == [0.0, 1.0, 1.0, 1.0]
  assert lambdas["b_weights"] == [0.5, 1.0, 1.0, 1.0]
  assert not [n for n in os.listdir(wd) if n.startswith(".staging")]


@pytest.mark.parametrize("kind,message", [
    ("steps", "learned for 6 steps, this run uses 4"),
    ("sampler", "'plms' sampler, this run uses 'ddim'"),
    ("plain", "shape (3,) but the sampler runs 4 steps"),
])
def test_switch_refuses_mismatched_lambda_files(tmp_path, cli, kind, message):
  path = tmp_path / "w.json"
  if kind == "steps":
    _weights_file(path, num_steps=6)
  elif kind == "sampler":
    _weights_file(path, sampler="plms")
  else:
    path.write_text("[0, 1, 1]")
  out = cli.run("switch", tmp_path / "wd", "--config.num_steps=4", "--config.t_stars=2",
             f"--config.lambda_files={path}")
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "wd").exists()  # a refused run leaves no workdir behind


def test_disentangle_several_attributes_in_one_run(tmp_path, cli):
  out = cli.run("disentangle", tmp_path, "--config.attributes=smile,snow",
             "--config.seeds=1,2", "--config.num_steps=10", "--config.optimizer.iterations=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 edit(s)" in out.stderr
  # The presets' T* (20 and 12 of 50 steps) follow the step count: 4 and 2 of 10.
  for name, target, t_star in (("smile", "A photo of person, smiling", 4),
                               ("snow", "A photo of church exterior, covered by snow", 2)):
    w = json.loads((tmp_path / name / "weights.json").read_text())
    assert w["target_prompt"] == target and w["seeds"] == [1, 2] and len(w["lambda"]) == 10
    assert w["init_lambda"] == [0.0] * t_star + [1.0] * (10 - t_star)
    assert [h["iteration"] for h in w["loss_history"]] == [1, 2]
    for image in ("original.png", "edited.png", "pair.png"):
      assert (tmp_path / name / image).is_file()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().split("\n") if l]
  assert len(rows) == 2 and len(rows[0]["l_dir"]) == 2


def test_disentangle_unknown_attribute_is_refused(tmp_path, cli):
  out = cli.run("disentangle", tmp_path / "wd", "--config.attributes=smile,frowning")
  assert out.returncode == 2 and "['frowning'] are not presets" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "wd").exists()  # a refused run leaves no workdir behind


PROGRAMS = ("disentangle", "switch", "edit", "study", "train_toy")


def _start(cli, module, *argv):
  """``python -m launch.<module> *argv`` exactly as given (no --workdir added), forked."""
  return cli.server.start(f"launch.{module}", list(argv), ROOT)


def test_every_program_speaks_the_same_way(tmp_path, cli):
  """--help, --show_config without --workdir, a misspelled field, a positional argument, no
  --workdir and a workdir written by another program: one answer from the common entry point
  (each case on one program; --help on all, as its flags are the program's own). All are
  answered before any JAX work, so they run side by side."""
  other = tmp_path / "other"
  other.mkdir()
  (other / ".program").write_text("launch.disentangle\n")
  (other / "weights.json").write_text("{}")
  cases = [(m, "help", ("--help",)) for m in PROGRAMS] + [
      ("switch", "show", ("--show_config",)),
      ("edit", "typo", (f"--workdir={tmp_path / 'typo'}", "--config.gudance=3")),
      ("study", "positional", (f"--workdir={tmp_path / 'pos'}", "extra")),
      ("disentangle", "no_workdir", ("--config.guidance=3",)),
      ("switch", "other", (f"--workdir={other}",)),
      ("train_toy", "typo_toy", (f"--workdir={tmp_path / 'typo'}", "--config.diffusion.stepz=3")),
      ("train_toy", "other", (f"--workdir={other}",))]
  procs = [_start(cli, m, *argv) for m, _, argv in cases]
  for (m, kind, _), proc in zip(cases, procs):
    stdout, stderr = proc.communicate(timeout=300)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if kind == "help":
      assert out.returncode == 0, (m, stderr[-2000:])
      for flag in ("--config:", "--workdir:", "show_config:", "--compilation_cache:"):
        assert flag in stdout, (m, flag, stdout)
      assert ("--coordinator:" in stdout) == (m == "study"), (m, stdout)
      assert f"python -m launch.{m}" in stdout and ROOT not in stdout
    elif kind == "show":
      assert out.returncode == 0 and "guidance = 7.5" in stdout, (m, stderr[-2000:])
    elif kind == "typo":
      _refused(out, "")
      assert error_lines(stderr) == ["error: --config.gudance: no such field; did you mean "
                                     "'guidance'?"]
    elif kind == "typo_toy":
      _refused(out, "")
      assert error_lines(stderr) == ["error: --config.diffusion.stepz: no such field; did you "
                                     "mean 'steps'?"]
    elif kind == "positional":
      _refused(out, "unexpected argument(s) 'extra'")
    elif kind == "no_workdir":
      _refused(out, "--workdir is required")
    else:
      _refused(out, f"workdir {str(other)!r} was written by launch.disentangle, not "
               f"launch.{m}")
  assert not (tmp_path / "typo").exists() and not (tmp_path / "pos").exists()
  assert sorted(os.listdir(other)) == [".lock", ".program", "weights.json"]
  assert (other / ".program").read_text() == "launch.disentangle\n"


def test_results_name_checkout_paths_relative_to_it():
  """configs/toy.py gives the toy world's absolute paths; config.json, weights.json and the run
  identity name them relative to the repository (tests/test_edit_cli.py checks every file of
  a run)."""
  from configs import toy  # pylint: disable=import-outside-toplevel
  from launch import common  # pylint: disable=import-outside-toplevel
  cfg = toy.get_config("snow")
  assert cfg.model.path.startswith(ROOT + os.sep)
  text = common.config_json(cfg)
  assert ROOT not in text
  written = json.loads(text)
  assert written["model"]["path"] == "disentangle_jax/toy/weights/sd"
  assert written["loss_models"]["clip_path"] == "disentangle_jax/toy/weights/clip"
  assert common.portable({"a": [ROOT, "rel/x", "/elsewhere/y", f"{ROOT}/p,{ROOT}/q"]}) == {
      "a": [".", "rel/x", "/elsewhere/y", "p,q"]}
