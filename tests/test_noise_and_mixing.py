"""Randomness is data (noise.py) and the lambda schedules / embedding mix (mixing.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import mixing, noise, schedule

SIGMA = schedule.step_tables(schedule.ScheduleConfig(), 6, eta=1.0).sigma


def test_a_seed_draws_the_same_numbers_alone_or_in_any_batch():
  key = jax.random.key(3)
  alone = noise.draw(key, [7], (4, 4, 2), SIGMA)
  batch = noise.draw(key, [1, 7, 2, 9], (4, 4, 2), SIGMA)
  np.testing.assert_array_equal(alone.x_T[0], batch.x_T[1])
  np.testing.assert_array_equal(alone.noise[:, 0], batch.noise[:, 1])
  assert batch.x_T.shape == (4, 4, 4, 2) and batch.noise.shape == (6, 4, 4, 4, 2)
  assert not np.allclose(batch.x_T[0], batch.x_T[1])


def test_noise_is_sigma_times_unit_gaussian_and_zero_for_eta_zero():
  key = jax.random.key(0)
  z = noise.draw(key, [0], (8, 8, 4), np.ones(6)).noise
  scaled = noise.draw(key, [0], (8, 8, 4), SIGMA).noise
  np.testing.assert_allclose(scaled, SIGMA.reshape(-1, 1, 1, 1, 1) * z, rtol=1e-6)
  zero = noise.draw(key, [0], (8, 8, 4), np.zeros(6)).noise
  assert not np.any(zero)
  # x_T does not depend on eta.
  np.testing.assert_array_equal(noise.draw(key, [0], (8, 8, 4), SIGMA).x_T,
                                noise.draw(key, [0], (8, 8, 4), np.zeros(6)).x_T)


@pytest.mark.parametrize("seeds,match", [([], "empty"), ([1, 2, 1], "duplicates"),
                                         ([1.5], "integers"), ([-1], "out of range")])
def test_bad_seed_lists_are_refused(seeds, match):
  with pytest.raises(ValueError, match=match):
    noise.check_seeds(seeds)


def test_hard_switch():
  np.testing.assert_array_equal(mixing.hard_switch(5, 2, 1.1), np.float32([0, 0, 1.1, 1.1, 1.1]))
  np.testing.assert_array_equal(mixing.hard_switch(3, 0), np.ones(3, np.float32))
  np.testing.assert_array_equal(mixing.hard_switch(3, 3), np.zeros(3, np.float32))
  for bad in (-1, 4, 1.5):
    with pytest.raises(ValueError, match="t_star"):
      mixing.hard_switch(3, bad)


def test_mix_endpoints_are_exact_and_shapes_broadcast():
  rng = np.random.default_rng(0)
  c0, c1 = (jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(2))
  out = mixing.mix(jnp.asarray([0.0, 1.0, 0.25]), c0, c1)
  assert out.shape == (3, 4, 3)
  np.testing.assert_array_equal(out[0], c0)
  np.testing.assert_array_equal(out[1], c1)
  np.testing.assert_allclose(out[2], 0.75 * c0 + 0.25 * c1, rtol=1e-6)
  per_batch = mixing.mix(jnp.zeros((3, 2)), jnp.stack([c0, c1]), jnp.stack([c1, c0]))
  assert per_batch.shape == (3, 2, 4, 3)
  per_batch_lam = mixing.mix(jnp.asarray([[0.0, 1.0]] * 3), c0, c1)
  assert per_batch_lam.shape == (3, 2, 4, 3)
  np.testing.assert_array_equal(per_batch_lam[:, 0], jnp.broadcast_to(c0, (3, 4, 3)))
  np.testing.assert_array_equal(per_batch_lam[:, 1], jnp.broadcast_to(c1, (3, 4, 3)))
  with pytest.raises(ValueError, match="c0 has shape"):
    mixing.mix(jnp.zeros(3), c0, c1[:2])


def test_load_formats_and_reference_convention(tmp_path):
  lam = np.float32([0, 0, 1, 1.1])
  (tmp_path / "a.json").write_text(json.dumps(lam.tolist()))
  (tmp_path / "b.json").write_text(json.dumps({"lambda": lam.tolist()}))
  (tmp_path / "c.json").write_text(json.dumps({"lambda": (1 - lam).tolist(),
                                                "convention": "reference"}))
  np.save(tmp_path / "d.npy", lam)
  (tmp_path / "e.txt").write_text("0, 0, 1\n1.1")
  for name in ("a.json", "b.json", "c.json", "d.npy", "e.txt"):
    np.testing.assert_allclose(mixing.load(str(tmp_path / name), 4), lam, rtol=1e-6,
                               err_msg=name)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    mixing.load(str(tmp_path / "missing.json"))
  (tmp_path / "w.json").write_text("[0, 1, 1]")
  with pytest.raises(ValueError, match=r"shape \(3,\) but the sampler runs 4 steps"):
    mixing.load(str(tmp_path / "w.json"), 4)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="could not be parsed"):
    mixing.load(str(tmp_path / "bad.json"))
  (tmp_path / "w.yaml").write_text("[0]")
  with pytest.raises(ValueError, match="unknown extension"):
    mixing.load(str(tmp_path / "w.yaml"))
  (tmp_path / "nolam.json").write_text('{"weights": [1]}')
  with pytest.raises(ValueError, match="without a 'lambda'"):
    mixing.load(str(tmp_path / "nolam.json"))


def test_mix_keeps_lambda_precision_for_bfloat16_embeddings():
  c0 = jnp.zeros((2, 3), jnp.bfloat16)
  c1 = jnp.full((2, 3), 100.0, jnp.bfloat16)
  # lambda = 1.003 rounded to bfloat16 is 1.0 (mix = 100); mixed in float32 it is 100.3,
  # which bfloat16 stores as 100.5.
  out = mixing.mix(jnp.asarray([1.003]), c0, c1)
  assert out.dtype == jnp.bfloat16
  assert float(out[0, 0, 0]) == 100.5
