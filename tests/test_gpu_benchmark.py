"""Smoke run of benchmarks/gpu.py at tiny size on CPU (the script is meant for accelerators)."""
import pytest

pytestmark = pytest.mark.slow  # a fresh process (conftest.cli)

# `python benchmarks/gpu.py ...` on the CPU (JAX_PLATFORMS=cpu), forked like the programs.
SCRIPT = """
import runpy, sys
import jax
jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, "benchmarks")
sys.argv = ["benchmarks/gpu.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu.py", run_name="__main__")
"""


def test_gpu_benchmark_tiny_cpu_run(cli):
  proc = cli.run_code(SCRIPT, "--size=tiny", "--steps=2", "--repeats=1", "--in_process",
                      "--variants=bf16_step", "--sample_batch=1", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l for l in proc.stdout.splitlines() if l.startswith("| bf16_step |")]
  assert len(rows) == 1, proc.stdout
  assert rows[0].rstrip().endswith("| True |"), rows[0]  # finite gradient
