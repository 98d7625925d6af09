r"""Transfer-study throughput (items/s) on 1, 2 and 4 devices: the cost of seed sharding.

  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error python benchmarks/study.py

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N
must be set before JAX starts). In it: the tiny models, one attribute, sources (T*=T/2, c1),
``--seeds`` seeds in chunks of ``--batch`` units; one untimed study (compilation), then
``--repeats`` timed studies into fresh folders (``study_store.run``: noise drawing, the sharded
render + metrics call, host transfer, row files). Reported: the median items/s and its ratio
to one device. On CPU the fake devices share the same cores, so no speed-up is expected: the
ratio measures the overhead of splitting each batch over devices.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import harness

CHILD = textwrap.dedent("""
    import json, os, sys, tempfile, time
    import jax
    from disentangle_jax import loss_models, metrics, models, parallel, sampler, sampling, study
    from disentangle_jax import study_store

    steps, seeds, batch, repeats = (int(v) for v in sys.argv[1:5])
    model = models.build_tiny(models.ModelConfig())
    lm = loss_models.load_loss_models(loss_models.LossModelConfig(), tokenizer=model.tokenizer)
    spec = study.StudySpec(
        sources=study.baseline_sources(steps, (steps // 2,)),
        attributes=(study.Attribute("smile", "A photo of person", ", smiling"),),
        seeds=tuple(range(seeds)), sampling=sampling.SamplingConfig(num_steps=steps),
        batch_size=batch, grid_seeds=0)
    mesh = parallel.make_mesh()
    inputs = study.prepare(model, lm, spec, mesh)
    evaluate = study.make_evaluate_fn(
        models.make_eps_fn(model.unet), models.make_decode_fn(model.vae, model.scaling_factor),
        sampler.SamplerConfig(), metrics.from_loss_models(lm))
    shape = (model.latent_size, model.latent_size, model.latent_channels)
    times = []
    for r in range(repeats + 1):  # run 0 compiles
      with tempfile.TemporaryDirectory() as wd:
        start = time.perf_counter()
        study_store.run(evaluate, inputs, spec, shape, mesh, wd, log=lambda s: None)
        times.append(time.perf_counter() - start)
    print("RESULT" + json.dumps({"devices": mesh.size, "items": spec.num_items,
                                 "padded": parallel.padded_size(batch, mesh),
                                 "first": times[0], "times": times[1:]}))
""")


def measure(devices: int, args) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(harness.REPO_ROOT))
  proc = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(args.seeds),
                         str(args.batch), str(args.repeats)], cwd=harness.REPO_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{devices} devices failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.split("RESULT")[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,2,4", help="fake CPU device counts")
  parser.add_argument("--steps", type=int, default=10, help="sampling steps T")
  parser.add_argument("--seeds", type=int, default=16, help="seeds (units) per study")
  parser.add_argument("--batch", type=int, default=4, help="units per chunk (compiled call)")
  parser.add_argument("--repeats", type=int, default=3, help="timed studies per device count")
  args = parser.parse_args()
  harness.quiet_libraries()
  results = [measure(int(n), args) for n in args.devices.split(",")]
  base = harness.median(results[0]["times"])
  rows = []
  for r in results:
    t = harness.median(r["times"])
    rows.append((r["devices"], f"{args.batch} -> {r['padded']}", r["items"], r["first"], t,
                 r["items"] / t, base / t))
  print(harness.machine_report())
  print(f"- study: tiny models, {args.steps} DDIM steps, 1 attribute x {args.seeds} seeds x 2 "
        f"sources (T*={args.steps // 2}, c1), {args.repeats} timed repeats (median)\n")
  print(harness.markdown_table(
      ["devices", "batch -> padded", "items", "first run s (compile)", "median s",
       "items/s", "speed-up vs 1"], rows))


if __name__ == "__main__":
  main()
