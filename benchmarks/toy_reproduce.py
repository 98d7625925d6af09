r"""Reproducibility of the shipped toy world: retrain with its recorded seed, compare losses.

  python benchmarks/toy_reproduce.py --workdir=workdir/toy_repro [--rtol 0.05]

Runs `python -m launch.train_toy --config=configs/train_toy.py --config.seed=<made.json seed>`
into a fresh workdir (about an hour on a 2-core CPU) and prints each stage's final loss next to
the one recorded in disentangle_jax/toy/weights/made.json; exits 1 if any differs by more than
--rtol (relative).
"""
import argparse
import json
import os
import subprocess
import sys

import harness

harness.add_repo_to_path()
harness.quiet_libraries()

from disentangle_jax.toy import world  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--rtol", type=float, default=0.05)
  args = parser.parse_args()
  made = world.read_made(world.WEIGHTS_DIR)
  if not made:
    sys.exit(f"error: {world.WEIGHTS_DIR}/{world.MADE_FILE} is missing; nothing to compare.")
  subprocess.run([sys.executable, "-m", "launch.train_toy", "--config=configs/train_toy.py",
                  f"--config.seed={made['seed']}", f"--workdir={args.workdir}"],
                 cwd=harness.REPO_ROOT, check=True)
  new = world.read_made(os.path.join(args.workdir, "world"))
  bad = []
  for stage, old in made["final_losses"].items():
    got = new["final_losses"][stage]
    ok = abs(got - old) <= args.rtol * abs(old)
    bad += [] if ok else [stage]
    print(f"{stage}: shipped {old:.6f} retrained {got:.6f} {'ok' if ok else 'DIFFERS'}")
  print(json.dumps({"quality_shipped": made.get("quality"), "quality_retrained": new.get("quality")}))
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
