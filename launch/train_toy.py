r"""Trains the toy world from scratch: python -m launch.train_toy --config=configs/train_toy.py
--workdir=workdir/toy

Deterministic in --config.seed; killed at any point, the same command resumes (each stage
checkpoints); a workdir of another config or another program is refused. Writes
<workdir>/world (diffusers-layout SD, HF-layout CLIP, judge, the perceptual VGG, made.json) and
<workdir>/losses.png. Speaks like every program (launch/common.py): --help, --show_config, one
`error:` line for a bad flag, field or value, exit 130 on Ctrl-C.
"""
import os
import subprocess
import sys
import time

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import logging  # noqa: E402

from launch import common  # noqa: E402

_CONFIG, _WORKDIR = common.define_flags("configs/train_toy.py")


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
      raise ValueError(f"--config.{name}: steps >= 1, batch >= 2 and lr > 0 are needed; got "
                       f"steps={s.steps}, batch={s.batch}, lr={s.lr}.")
  for name in ("omit_prob", "uncond_prob"):
    if not 0 <= cfg[name] < 1:
      raise ValueError(f"--config.{name}={cfg[name]} must be in [0, 1).")
  return train.TrainConfig(
      seed=cfg.seed, dataset_size=cfg.dataset_size, sizes=world.Sizes(**sizes),
      judge=judge.JudgeConfig(), kl_weight=cfg.kl_weight, uncond_prob=cfg.uncond_prob,
      omit_prob=cfg.omit_prob,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, **stages)


def _run(cfg, out):
  from disentangle_jax.toy import build  # noqa: PLC0415
  with common.user_errors():
    tc = train_config(cfg)
    build.claim_workdir(tc, out)
  provenance = {"command": build.recorded_command("launch.train_toy", sys.argv[1:]),
                "commit": _commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  build.build(tc, out, logging.info, provenance)
  print(os.path.join(out, build.WORLD_DIR))


main = common.single_process_main("launch.train_toy", _CONFIG, _WORKDIR, _run)

if __name__ == "__main__":
  common.run(main)
