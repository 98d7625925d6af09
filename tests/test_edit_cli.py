"""launch.edit end to end on the tiny model (subprocesses, as a user runs it)."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from disentangle_jax import weights_file
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses (conftest.cli: one compilation cache per session)

FAST = ("--config.num_steps=4", "--config.inject_steps=4", "--config.t_star=2")  # exact recon.
OUTPUTS = ("input.png", "reconstruction.png", "edited.png", "pair.png", "metrics.json",
           "config.json")


# A wide RGBA picture inside the checkout (exercises conversion, resize and crop), given by
# its absolute path: no file of the run may name the checkout's folder.
CHECKOUT_IMAGE = "benchmarks/toy_world/losses.png"


def _files_naming(folder, text: str) -> list[str]:
  """The files below ``folder`` whose bytes contain ``text``."""
  return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names
          if text.encode() in open(os.path.join(d, n), "rb").read()]


def test_learn_on_the_image_then_apply_the_weights(tmp_path, cli):
  photo = os.path.join(ROOT, CHECKOUT_IMAGE)
  width, height = Image.open(photo).size
  learn = cli.run("edit", tmp_path / "learn", *FAST, f"--config.image={photo}",
               "--config.optimizer.iterations=2")
  assert learn.returncode == 0, learn.stderr[-3000:]
  for name in OUTPUTS + ("weights.json",):
    assert (tmp_path / "learn" / name).is_file(), name
  assert f"resized {width}x{height} -> " in learn.stderr
  assert "centre-cropped to 64x64 px" in learn.stderr
  for phase in ("encoding and inverting the image", "rendering the original (lambda = 0",
                "rendering the reconstruction and the edit"):  # a line before each long phase
    assert phase in learn.stderr, phase
  assert Image.open(tmp_path / "learn" / "input.png").size == (64, 64)
  metrics = json.loads((tmp_path / "learn" / "metrics.json").read_text())
  assert metrics["mode"] == "optimise" and len(metrics["loss_history"]) == 2
  assert metrics["input"]["size"] == [width, height]
  assert metrics["input"]["path"] == CHECKOUT_IMAGE  # relative to the repository
  for key in ("latent_rmse", "pixel_psnr_db", "vae_roundtrip_psnr_db"):
    assert np.isfinite(metrics["reconstruction"][key]), key
  learned = weights_file.read(str(tmp_path / "learn" / "weights.json"))
  assert learned.num_steps == 4 and learned.extra["image"] == CHECKOUT_IMAGE
  # Results carry no machine paths: not config.json, weights.json, metrics.json, the
  # checkpoints' run identity, nor any other file.
  assert _files_naming(tmp_path / "learn", ROOT) == []

  # The learned weights applied to the same image reproduce the learned edit.
  apply = cli.run("edit", tmp_path / "apply", *FAST, f"--config.image={photo}",
               f"--config.weights={tmp_path / 'learn' / 'weights.json'}")
  assert apply.returncode == 0, apply.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "apply")) == sorted(OUTPUTS + (".lock", ".program"))
  assert (tmp_path / "apply" / ".program").read_text() == "launch.edit\n"  # the writer
  got = json.loads((tmp_path / "apply" / "metrics.json").read_text())
  assert got["mode"] == "apply" and got["lambda"] == metrics["lambda"]
  assert got["reconstruction"]["latent_rmse"] < 1e-3  # residuals at every step: exact
  for name in ("edited.png", "reconstruction.png"):
    a, b = (np.asarray(Image.open(tmp_path / d / name), np.int16) for d in ("learn", "apply"))
    assert np.abs(a - b).max() <= 1, name


def _truncated(fmt):
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()[:len(buf.getvalue()) // 2]


def _bad_inputs(d):
  """(name, overrides, expected message) of every refused input; files made in ``d``."""
  (d / "text.png").write_text("not an image\n")
  (d / "cut.png").write_bytes(_truncated("PNG"))
  (d / "cut.jpg").write_bytes(_truncated("JPEG"))
  Image.new("RGB", (1, 1)).save(d / "dot.png")
  Image.new("L", (9000, 10)).save(d / "wide.png")
  base = dict(lam=(0.0,) * 4, prompt="a", target_prompt="a, b", num_steps=4, sampler="ddim",
              eta=0.0, guidance=7.5, schedule={})
  weights_file.write(str(d / "w10.json"), weights_file.LearnedWeights(
      **(base | {"lam": (0.0,) * 10, "num_steps": 10})))
  weights_file.write(str(d / "plms.json"), weights_file.LearnedWeights(
      **(base | {"sampler": "plms"})))
  return [
      ("missing", [f"--config.image={d / 'nope.png'}"], "does not exist"),
      ("not_image", [f"--config.image={d / 'text.png'}"], "not an image file"),
      ("cut_png", [f"--config.image={d / 'cut.png'}"], "truncated"),
      ("cut_jpg", [f"--config.image={d / 'cut.jpg'}"], "truncated"),
      ("tiny", [f"--config.image={d / 'dot.png'}"], "1x1 px, smaller than the minimum"),
      ("huge", [f"--config.image={d / 'wide.png'}"], "9000x10 px, larger than the maximum"),
      ("steps", [f"--config.weights={d / 'w10.json'}"], "learned for 10 steps, this run uses 4"),
      ("sampler", [f"--config.weights={d / 'plms.json'}"], "'plms' sampler, this run uses 'ddim'"),
      ("inject", ["--config.inject_steps=5"], "inject_steps=5"),
      ("seed", ["--config.seed=-1"], "seed -1 is out of range"),
  ]


def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, cli):
  cases = _bad_inputs(tmp_path)
  outs = cli.run_all([("edit", tmp_path / name, ["--config.num_steps=4",
                                                 "--config.inject_steps=4", "--config.t_star=2",
                                                 *over])
                      for name, over, _ in cases], timeout=300)  # they fail before any JAX work
  for (name, _, message), out in zip(cases, outs):
    err = out.stderr
    assert out.returncode == 2, (name, err[-2000:])
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], (name, err[-2000:])
    assert "Traceback" not in err, name
    assert not (tmp_path / name).exists(), name  # a refused run leaves no workdir behind
