"""The programs on the tiny SD 3.5 and Flux.1 models (model.tiny_family), end to end as a user
runs them, and the refusal of bad flow folders as one error line naming the field."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import refused

pytestmark = pytest.mark.slow  # subprocesses (conftest.cli)


def test_disentangle_learns_lambda_through_the_flow_sampler_sd3(tmp_path, cli):
  out = cli.run("disentangle", tmp_path, "--config.model.tiny_family=sd3",
                "--config.num_steps=3", "--config.optimizer.iterations=1", "--config.seeds=1")
  assert out.returncode == 0, out.stderr[-3000:]
  w = json.loads((tmp_path / "weights.json").read_text())
  assert len(w["lambda"]) == 3 and [h["iteration"] for h in w["loss_history"]] == [1]
  assert w["lambda"] != w["init_lambda"]  # the gradient reached lambda through the sampler
  # The sampler and schedule that ran: SD 3.5's Euler steps with shift 3 (not a DDIM schedule).
  sched = w["schedule"]
  assert w["sampler"] == "flow_euler" and (sched["kind"], sched["pipeline"], sched["shift"]) == (
      "flow_match_euler", "sd3", 3.0)
  assert len(sched["sigmas"]) == 4 and sched["sigmas"][0] == 1.0 and sched["sigmas"][-1] == 0.0
  for image in ("original.png", "edited.png", "pair.png"):
    assert (tmp_path / image).is_file()


def test_switch_grid_on_flux(tmp_path, cli):
  out = cli.run("switch", tmp_path, "--config.model.tiny_family=flux", "--config.num_steps=3",
                "--config.t_stars=1", "--config.seeds=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "images")) == [f"seed1_{n}.png" for n in ("T1", "c0", "c1")]
  # lambda reaches the images: the pure-c0 and pure-c1 columns differ.
  c0, c1 = (Image.open(tmp_path / "images" / f"seed1_{n}.png").tobytes() for n in ("c0", "c1"))
  assert c0 != c1


def _weights_file(path, lam=(0.0, 1.0, 1.0), sampler="flow_euler"):
  path.write_text(json.dumps({"format": "disentangle_jax.weights", "lambda": list(lam),
                              "num_steps": len(lam), "sampler": sampler,
                              "prompt": "A photo of person",
                              "target_prompt": "A photo of person, smiling"}))
  return str(path)


def test_edit_inverts_an_image_with_the_euler_inversion_on_sd3(tmp_path, cli):
  """Residuals at every step (inject_steps = num_steps): the lambda = 0 run from the Euler
  inversion's x_T (under CFG) ends at the encoded image (the inversion is wired in and the flow
  sampler adds its residuals); a flow weights file is applied."""
  weights = _weights_file(tmp_path / "learned.json")
  out = cli.run("edit", tmp_path / "wd", "--config.model.tiny_family=sd3",
                "--config.num_steps=3", "--config.inject_steps=3", f"--config.weights={weights}")
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = json.loads((tmp_path / "wd" / "metrics.json").read_text())
  assert metrics["reconstruction"]["latent_max_abs"] < 1e-4, metrics["reconstruction"]
  assert metrics["lambda"] == [0.0, 1.0, 1.0] and metrics["mode"] == "apply"
  edited, rec = (Image.open(tmp_path / "wd" / f"{n}.png").tobytes()
                 for n in ("edited", "reconstruction"))
  assert edited != rec  # lambda reaches the edit


def test_study_of_a_real_image_with_a_flow_weights_file_on_flux(tmp_path, cli):
  """The study's real-image mode on Flux.1 (each image inverted by the Euler inversion under the
  attribute's c0): the file's lambda (0, 1, 1) scores exactly as the equal switch T*=1 does,
  and pure c1 differently."""
  weights = _weights_file(tmp_path / "learned.json")
  (tmp_path / "images").mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
  out = cli.run("study", tmp_path / "wd", "--config.model.tiny_family=flux",
                "--config.num_steps=3", "--config.t_stars=1", "--config.attributes=smile",
                f"--config.images_dir={tmp_path / 'images'}", "--config.inject_steps=3",
                f"--config.weights_files={weights}")
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["source"]: r for r in map(json.loads,
                                      (tmp_path / "wd" / "rows.jsonl").read_text().splitlines())}
  assert {"learned", "T*=1", "c1"} <= set(rows) and rows["learned"]["image"] == "a.png"
  learned, switch = ({k: v for k, v in rows[s].items() if k != "source"}
                     for s in ("learned", "T*=1"))
  assert learned == switch
  assert rows["c1"]["directional_clip"] != rows["learned"]["directional_clip"]


# The other settings and the other direction: tests/test_flow_settings.py (in-process).
@pytest.mark.parametrize("family,overrides,message", [
    ("flux", ["--config.eta=0.5"], "eta=0.5"),
    ("flux", ["--config.lambda_files={ddim}"], "learned on a UNet model"),
])
def test_flow_settings_and_weights_of_the_other_family_are_one_error_line(
    tmp_path, cli, family, overrides, message):
  files = {"ddim": _weights_file(tmp_path / "unet.json", sampler="ddim")}
  out = cli.run("switch", tmp_path / "wd", f"--config.model.tiny_family={family}",
                "--config.num_steps=3", "--config.t_stars=1", "--config.seeds=1",
                *(o.format(**files) for o in overrides))
  refused(out, message)


def _flow_folder(root, pipeline: str, components: dict, transformer: dict | None = None):
  root.mkdir()
  (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}))
  for name, cfg in (("vae", {"latent_channels": 16, "scaling_factor": 1.5, "shift_factor": 0.1}),
                    ("scheduler", {"_class_name": "FlowMatchEulerDiscreteScheduler"}),
                    ("transformer", transformer)):
    if cfg is not None:
      (root / name).mkdir()
      file = "scheduler_config.json" if name == "scheduler" else "config.json"
      (root / name / file).write_text(json.dumps(cfg))
  return root


_SD3 = {"transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"]}


@pytest.mark.parametrize("case,field", [("no_t5", "text_encoder_3"),
                                        ("transformer_option", "foo_option")])
def test_bad_flow_folders_are_one_error_line(tmp_path, cli, case, field):
  if case == "no_t5":
    folder = _flow_folder(tmp_path / "m", "StableDiffusion3Pipeline",
                          {**_SD3, "text_encoder_3": [None, None]})
  else:
    folder = _flow_folder(tmp_path / "m", "StableDiffusion3Pipeline", _SD3,
                          {"_class_name": "SD3Transformer2DModel", "foo_option": 1})
  out = cli.run("switch", tmp_path / "wd", f"--config.model.path={folder}",
                "--config.num_steps=3", "--config.t_stars=1", "--config.seeds=1")
  refused(out, field)
