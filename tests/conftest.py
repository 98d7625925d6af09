"""Shared fixtures: the tiny model and a tiny PyTorch checkpoint folder in diffusers layout."""
import os

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# The SD v1 scheduler_config.json (PNDMScheduler), as shipped with the checkpoints.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


@pytest.fixture(scope="session")
def tiny_model():
  """The tiny built-in model (float32, seed 0)."""
  from disentangle_jax import models  # pylint: disable=g-import-not-at-top
  return models.build_tiny(models.ModelConfig())


@pytest.fixture(scope="session")
def torch_sd_dir(tmp_path_factory):
  """A tiny PyTorch Stable Diffusion saved as safetensors in diffusers layout.

  Same configs as ``models.build_tiny``, weights from ``torch.manual_seed(0)``.

  Returns:
    (path, {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}), torch modules in eval
    mode, float32.
  """
  torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from disentangle_jax import models  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("torch_sd")
  models.write_tiny_tokenizer(path / "tokenizer")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
  torch.manual_seed(0)
  modules = {
      "unet": diffusers.UNet2DConditionModel(**models.tiny_unet_config()),
      "vae": diffusers.AutoencoderKL(**models.tiny_vae_config()),
      "text_encoder": transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**models.tiny_text_config(tokenizer))),
  }
  for name, module in modules.items():
    module.eval()
    module.save_pretrained(path / name, safe_serialization=True)
  (path / "scheduler").mkdir()
  (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_CONFIG))
  (path / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline",
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "PNDMScheduler"],
  }))
  return path, dict(modules, tokenizer=tokenizer)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Cli:
  """Runs the programs as a user does (``python -m launch.<module>`` from the repo root), all
  sharing one persistent compilation cache, so a program compiled once in a test run is not
  compiled again by later subprocesses."""

  def __init__(self, cache: str):
    self.cache = cache

  def cmd(self, module, workdir, *overrides) -> list[str]:
    import sys  # pylint: disable=g-import-not-at-top
    return [sys.executable, "-m", f"launch.{module}", f"--workdir={workdir}",
            f"--compilation_cache={self.cache}", *overrides]

  def run(self, module, workdir, *overrides, timeout=600):
    import subprocess  # pylint: disable=g-import-not-at-top
    return subprocess.run(self.cmd(module, workdir, *overrides), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)

  def run_all(self, runs, timeout=600) -> list:
    """Runs ``[(module, workdir, overrides), ...]`` side by side (for runs refused before any
    JAX work: their start-up overlaps); returns their CompletedProcess in order."""
    import subprocess  # pylint: disable=g-import-not-at-top
    procs = [subprocess.Popen(self.cmd(module, workdir, *overrides), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, workdir, overrides in runs]
    outs = []
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=timeout)
      outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return outs

  def kill_at(self, line: str, module, workdir, *overrides) -> int:
    """Starts a program, SIGKILLs it as soon as it logs a line containing ``line``; returns
    its exit status (-SIGKILL when killed)."""
    import signal  # pylint: disable=g-import-not-at-top
    proc = self.popen(module, workdir, *overrides)
    for text in proc.stderr:
      if line in text:
        proc.send_signal(signal.SIGKILL)
        break
    return proc.wait(timeout=600)

  def popen(self, module, workdir, *overrides):
    import subprocess  # pylint: disable=g-import-not-at-top
    return subprocess.Popen(self.cmd(module, workdir, *overrides), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
  """The shared command-line runner (one compilation cache per test session)."""
  return Cli(str(tmp_path_factory.mktemp("xla_cache")))


def error_lines(stderr: str) -> list[str]:
  """The ``error:`` lines a program printed."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]
