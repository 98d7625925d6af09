r"""Trains the toy world from scratch: python -m launch.train_toy --config=configs/train_toy.py
--workdir=workdir/toy

Deterministic in --config.seed; killed at any point, the same command resumes (each stage
checkpoints); a workdir of another config is refused. Writes <workdir>/world (diffusers-layout
SD, HF-layout CLIP, judge, made.json) and <workdir>/losses.png.
"""
import os
import subprocess
import sys
import time

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import common  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_toy.py", "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


def _commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=os.path.dirname(
                               os.path.abspath(__file__))).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def train_config(cfg):
  """configs/train_toy.py -> train.TrainConfig (validated by construction)."""
  from disentangle_jax.toy import judge, train, world  # noqa: PLC0415
  sizes = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.sizes.items()}
  stages = {n: train.StageConfig(**cfg[n].to_dict())
            for n in ("vae", "judge_stage", "perceptual", "clip", "diffusion")}
  for name, s in stages.items():
    if s.steps < 1 or s.batch < 2 or s.lr <= 0:
      raise ValueError(f"{name}: steps >= 1, batch >= 2 and lr > 0 are needed; got {s}.")
  return train.TrainConfig(
      seed=cfg.seed, dataset_size=cfg.dataset_size, sizes=world.Sizes(**sizes),
      judge=judge.JudgeConfig(), kl_weight=cfg.kl_weight, uncond_prob=cfg.uncond_prob,
      omit_prob=cfg.omit_prob,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, **stages)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from disentangle_jax import workdir  # noqa: PLC0415
  from disentangle_jax.toy import build  # noqa: PLC0415
  common.setup_process()
  with common.user_errors():
    out = workdir.ensure_writable(_WORKDIR.value)
    tc = train_config(_CONFIG.value)
    build.claim_workdir(tc, out)
  provenance = {"command": build.recorded_command("launch.train_toy", sys.argv[1:]),
                "commit": _commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  build.build(tc, out, logging.info, provenance)
  print(os.path.join(out, build.WORLD_DIR))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
