r"""Where one lambda gradient's time goes on XLA:CPU, by kind of operation and by pass.

The program is ``iteration.py``'s (ours, the same weights, loss and T), profiled with
``jax.profiler`` for one call after a warm-up. Each executed XLA operation is classed by the
optimised HLO of the compiled gradient (``compiled.as_text()``): convolution, matmul (``dot``),
reduction, dynamic-(update-)slice, copy/transpose, other elementwise; and by pass: "forward" for
the first sweep through the sampler and decoder (JAX's ``jvp``), "backward" for everything of
its transpose, which with step remat includes each step's recomputed forward. The table gives
seconds per class and pass, their share of the summed operation time, and the operation count.

  taskset -c 0 python benchmarks/profile_iteration.py                  # mid, T=10, 1 core
  taskset -c 0 python benchmarks/profile_iteration.py --ours=full/fast --sizes=tiny

Flags: iteration.py's --sizes (default mid), --steps (10), --ours (full/fast_hoisted,
none/fast_hoisted) and --mid_latent.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

from absl import app
from absl import flags

import harness  # pylint: disable=g-bad-import-order

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import jax

import iteration
# pylint: enable=g-import-not-at-top,g-bad-import-order

# iteration.py's flags (--sizes, --steps, --ours, --mid_latent), with defaults for one profile.
flags.FLAGS.set_default("sizes", ["mid"])
flags.FLAGS.set_default("steps", ["10"])
flags.FLAGS.set_default("ours", ["full/fast_hoisted", "none/fast_hoisted"])

_CLASSES = (("convolution", "convolution"), ("dot", "matmul"), ("reduce", "reduction"),
            ("dynamic-update-slice", "dynamic slices"), ("dynamic-slice", "dynamic slices"))


def op_classes(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (class, pass)} of an optimised HLO module's instructions."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?(\S+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif current is not None:
      op = re.match(r"\s+(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", line)
      if op:
        current.append(op.group(1))
  classes = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
    if not m:
      continue
    name, op = m.groups()
    ops = [op]
    if op == "fusion":
      ops = computations.get(re.search(r"calls=%([\w.\-]+)", line).group(1), [])
    kind = next((label for key, label in _CLASSES if key in ops), None)
    if kind is None:
      moves = {"copy", "transpose", "bitcast", "parameter", "reshape"}
      kind = "copy/transpose" if set(ops) <= moves else "elementwise/other"
    meta = re.search(r'op_name="([^"]*)"', line)
    classes[name] = (kind, "backward" if meta and "transpose(" in meta.group(1) else "forward")
  return classes


def profile(variant: str, problem) -> list[list]:
  grad, _, args = iteration.ours_program(problem, variant)
  compiled = grad.lower(problem.lam, *args).compile()
  classes = op_classes(compiled.as_text())
  jax.block_until_ready(compiled(problem.lam, *args))  # warm-up
  with tempfile.TemporaryDirectory() as folder:
    wall = harness.timed(lambda: jax.block_until_ready(compiled(problem.lam, *args)))
    jax.profiler.start_trace(folder)
    jax.block_until_ready(compiled(problem.lam, *args))
    jax.profiler.stop_trace()
    (trace,) = glob.glob(f"{folder}/plugins/profile/*/*.trace.json.gz")
    events = json.load(gzip.open(trace))["traceEvents"]
  seconds, counts = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event["name"] in classes:
      seconds[classes[event["name"]]] += event["dur"] / 1e6
      counts[classes[event["name"]]] += 1
  total = sum(seconds.values())
  return [[variant, f"{wall:.3g}", f"{total:.3g}", kind, phase, s, f"{100 * s / total:.0f}%",
           counts[(kind, phase)]] for (kind, phase), s in seconds.most_common()]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print("## Where the lambda gradient's time goes (XLA:CPU operations)\n")
  print(harness.machine_report())
  for size in flags.FLAGS.sizes:
    for steps in map(int, flags.FLAGS.steps):
      problem = iteration.Problem(size, steps, flags.FLAGS.mid_latent)
      print(f"- {size}, T={steps}: {problem.description}", flush=True)
      rows = []
      for variant in flags.FLAGS.ours:
        rows += profile(variant, problem)
      print()
      print(harness.markdown_table(["variant", "wall s (unprofiled call)", "summed op s",
                                    "class", "pass", "s", "share", "ops"], rows), flush=True)


if __name__ == "__main__":
  app.run(main)
