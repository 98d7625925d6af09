r"""Reproducibility of the shipped toy world: retrain with its recorded seed, compare losses.

  python benchmarks/toy_reproduce.py --workdir=workdir/toy_repro [--rtol 0.05]
  python benchmarks/toy_reproduce.py --workdir=workdir/toy_repro --until=diffusion:2000

Runs `python -m launch.train_toy --config=configs/train_toy.py --config.seed=<made.json seed>`
into a fresh workdir (about an hour on a 2-core CPU) and compares every logged loss of every
stage (step, mean loss since the previous log line) with the history recorded in
disentangle_jax/toy/weights/made.json. `--until=STAGE:STEP` stops the run once STAGE logs
STEP (the history up to there is the same as a full run's: the learning-rate schedules depend
on the configured steps, not on where a run stops) and compares what ran. Prints a table of
the compared points per stage (count, largest relative difference, final compared loss) and
exits 1 if any differs by more than --rtol.
"""
import argparse
import os
import re
import signal
import subprocess
import sys

import harness

harness.add_repo_to_path()
harness.quiet_libraries()

from disentangle_jax.toy import train, world  # noqa: E402

# launch.train_toy's progress line (toy/train.py: run_stage).
_LINE = re.compile(r"\] (\w+): step (\d+)/\d+ loss ([0-9.eE+-]+) ")


def parse_log(lines) -> dict[str, list[tuple[int, float]]]:
  out = {}
  for line in lines:
    m = _LINE.search(line)
    if m:
      out.setdefault(m.group(1), []).append((int(m.group(2)), float(m.group(3))))
  return out


def compare(recorded: dict, logged: dict, rtol: float) -> tuple[list[list], bool]:
  """Rows [stage, points, max rel diff, recorded, retrained] and whether all are within rtol.
  Logged losses carry 5 decimals, so differences below 1e-5 absolute count as equal."""
  rows, ok = [], True
  for stage in train.STAGES:
    want = dict((int(s), float(v)) for s, v in recorded.get(stage, []))
    got = [(s, v) for s, v in logged.get(stage, []) if s in want]
    if not got:
      rows.append([stage, 0, "-", "-", "-"])
      continue
    rel = [max(abs(v - want[s]) - 1e-5, 0.0) / abs(want[s]) for s, v in got]
    ok &= max(rel) <= rtol
    last = got[-1][0]
    rows.append([stage, len(got), f"{max(rel):.2e}", f"{want[last]:.5f} @ {last}",
                 f"{got[-1][1]:.5f} @ {last}"])
  return rows, ok


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--rtol", type=float, default=0.05)
  parser.add_argument("--until", default="", help="STAGE:STEP to stop at (default: the end)")
  args = parser.parse_args()
  made = world.read_made(world.WEIGHTS_DIR)
  if not made.get("loss_history"):
    sys.exit(f"error: {world.WEIGHTS_DIR}/{world.MADE_FILE} has no loss_history; nothing to "
             "compare (weights exported before histories were recorded).")
  stop = None
  if args.until:
    stage, _, step = args.until.partition(":")
    if stage not in train.STAGES or not step.isdigit():
      sys.exit(f"error: --until={args.until!r} must be STAGE:STEP with STAGE in {train.STAGES}.")
    stop = (stage, int(step))
  print(harness.machine_report())
  cmd = [sys.executable, "-m", "launch.train_toy", "--config=configs/train_toy.py",
         f"--config.seed={made['seed']}", f"--workdir={args.workdir}"]
  print(" ".join(cmd), flush=True)
  proc = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in proc.stderr:
    sys.stderr.write(line)
    lines.append(line)
    if stop and stop[1] in [n for n, _ in parse_log([line]).get(stop[0], [])]:
      proc.send_signal(signal.SIGTERM)
      break
  proc.wait()
  if stop is None and proc.returncode != 0:
    sys.exit(f"error: training exited with {proc.returncode}")
  rows, ok = compare(made["loss_history"], parse_log(lines), args.rtol)
  print(harness.markdown_table(["stage", "points compared", "max rel diff", "shipped",
                                "retrained"], rows))
  print(f"{'reproduced' if ok else 'DIFFERS'} within rtol {args.rtol}"
        f"{f' (stopped at {args.until})' if stop else ''}; workdir {os.path.abspath(args.workdir)}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
