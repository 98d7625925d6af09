"""Smoke run of benchmarks/gpu.py at tiny size on CPU (the script is meant for accelerators)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_cpu_run():
  env = dict(os.environ, DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "benchmarks/gpu.py", "--size=tiny", "--steps=2", "--repeats=1",
       "--in_process", "--variants=bf16_step", "--sample_batch=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [l for l in proc.stdout.splitlines() if l.startswith("| bf16_step |")]
  assert len(rows) == 1, proc.stdout
  assert rows[0].rstrip().endswith("| True |"), rows[0]  # finite gradient
