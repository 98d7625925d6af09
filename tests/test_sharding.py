"""A batch of seeds sharded over 4 (fake CPU) devices learns the same lambda as one device."""
import os
import textwrap

import pytest

from tests.conftest import XLA_TEST_FLAGS

pytestmark = pytest.mark.slow  # a fresh process with 4 fake devices (conftest.cli)

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import jax
    import numpy as np
    from disentangle_jax import disentangle, loss_models, models, optimize, parallel, sampling

    model = models.build_tiny(models.ModelConfig())
    lm = loss_models.load_loss_models(loss_models.LossModelConfig(), tokenizer=model.tokenizer)
    spec = disentangle.EditSpec(prompt="a photo of person", attribute=", smiling",
                                seeds=(1, 2, 3), t_star=2,
                                sampling=sampling.SamplingConfig(num_steps=4),
                                optimizer=optimize.OptimizerConfig(iterations=2))
    out = {"devices": len(jax.devices())}
    for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
      mesh = parallel.make_mesh(devices)
      prep = disentangle.prepare(model, lm, spec, (8, 8, 4), mesh)
      lam, hist, _ = disentangle.optimise(prep, spec, log=lambda s: None)
      out[name] = {"lam": lam.tolist(), "loss": [h["loss"] for h in hist],
                   "x_T_devices": len(prep.problem.x_T.sharding.device_set),
                   "batch": int(prep.problem.x_T.shape[0]),
                   "mask": np.asarray(prep.problem.mask).tolist()}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_batch_matches_single_device(cli):
  out = cli.run_code_result(SCRIPT, env=dict(os.environ, XLA_FLAGS=XLA_TEST_FLAGS))
  one, four = out["one"], out["four"]
  assert out["devices"] == 4
  assert four["x_T_devices"] == 4 and one["x_T_devices"] == 1
  # 3 seeds: one device runs them as they are, four devices pad to 4 and mask the copy.
  assert one["batch"] == 3 and four["batch"] == 4
  assert four["mask"] == [1.0, 1.0, 1.0, 0.0]
  assert abs(four["loss"][0] - one["loss"][0]) <= 1e-3 * abs(one["loss"][0])
  for a, b in zip(four["lam"], one["lam"]):
    assert abs(a - b) <= 2e-3, (four["lam"], one["lam"])
