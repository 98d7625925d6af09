"""Where the test suite's time goes in JAX: tracing, lowering and XLA compilation, per program.

Opt-in: with ``DISENTANGLE_COMPILE_REPORT=DIR`` in the environment, every test process (the
pytest workers, via conftest.py, and the programs forked by tests/program_server.py) records
JAX's own compile events (``jax.monitoring``) and writes ``DIR/<pid>.json`` when it exits.
Then ``python tests/compile_report.py DIR`` prints the totals and the costliest programs:

  DIR=$(mktemp -d) && DISENTANGLE_COMPILE_REPORT=$DIR pytest -q -n 2 tests
  python tests/compile_report.py $DIR
"""
import atexit
import collections
import glob
import json
import os
import sys
import time

ENV = "DISENTANGLE_COMPILE_REPORT"
COMPILE = "/jax/core/compile/backend_compile_duration"
EVENTS = {"trace": "/jax/core/compile/jaxpr_trace_duration",
          "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "compile": COMPILE,
          "cache hits saved": "/jax/compilation_cache/compile_time_saved_sec"}


def _test() -> str:
  """The running test (pytest sets it; a forked program inherits its test's), or ""."""
  return os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0]


def install() -> None:
  """Records this process's compile events if ENV names a folder (no-op otherwise)."""
  folder = os.environ.get(ENV)
  if not folder:
    return
  import jax.monitoring  # pylint: disable=import-outside-toplevel
  totals, programs = collections.Counter(), collections.defaultdict(list)
  per_test, big = collections.Counter(), []  # big: [test, event, program, seconds] over 0.5 s

  def listen(event, duration, **kwargs):
    totals[event] += duration
    if event in EVENTS.values() and event != EVENTS["cache hits saved"]:
      per_test[_test()] += duration
    if event == COMPILE:
      programs[kwargs.get("fun_name", "?")].append(duration)
    if event in (COMPILE, EVENTS["trace"]) and duration > 0.5:
      big.append([_test(), event.rsplit("/", 1)[-1], kwargs.get("fun_name", "?"), duration])

  jax.monitoring.register_event_duration_secs_listener(listen)

  def write():  # at exit: in a forked child, its own pid and its own numbers
    with open(os.path.join(folder, f"{os.getpid()}.json"), "w", encoding="utf-8") as f:
      json.dump({"cpu_s": time.process_time(), "totals": totals, "programs": programs,
                 "per_test": per_test, "test": _test(), "big": big,
                 "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}, f)

  atexit.register(write)


def report(folder: str, top: int = 25) -> str:
  """Totals over every process's file in ``folder`` and the ``top`` programs by compile time."""
  runs = []
  for path in glob.glob(os.path.join(folder, "*.json")):
    with open(path, encoding="utf-8") as f:
      runs.append(json.load(f))
  totals, programs = collections.Counter(), collections.defaultdict(list)
  tests = collections.Counter()  # JAX seconds in the workers + all CPU-s of started programs
  for run in runs:
    totals.update(run["totals"])
    if run.get("test"):  # a program a test started: all of its CPU time
      tests[run["test"]] += run["cpu_s"]
    else:
      tests.update(run.get("per_test", {}))
    for name, durations in run["programs"].items():
      programs[name] += durations
  lines = [f"{len(runs)} processes, {sum(r['cpu_s'] for r in runs):.0f} CPU-s in all"]
  lines += [f"  {label}: {totals[event]:.0f} s" for label, event in EVENTS.items()]
  lines.append(f"  XLA compilations: {sum(len(d) for d in programs.values())}")
  lines.append("\ncompile s  count  program")
  for name, durations in sorted(programs.items(), key=lambda kv: -sum(kv[1]))[:top]:
    lines.append(f"{sum(durations):9.1f}  {len(durations):5d}  {name}")
  lines.append("\n   test s  test (JAX trace+lower+compile; a started program: its CPU time)")
  for name, seconds in tests.most_common(top):
    lines.append(f"{seconds:9.1f}  {name}")
  return "\n".join(lines)


if __name__ == "__main__":
  print(report(sys.argv[1]))
