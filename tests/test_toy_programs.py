"""Every program on the shipped toy world, from its `:toy` preset (few steps, so seconds), and
the study's attributes given as prompt pairs."""
import json
import os

import pytest

from disentangle_jax.toy import world

needs_weights = pytest.mark.skipif(bool(world.missing_files(world.WEIGHTS_DIR)),
                                   reason="the toy world weights are not in this checkout")
FEW_STEPS = "--config.num_steps=6"


def test_study_attributes_from_presets_and_prompt_pairs():
  from configs import study as study_config  # pylint: disable=g-import-not-at-top
  from launch import study as study_launch  # pylint: disable=g-import-not-at-top
  cfg = study_config.get_config("toy")
  cfg.attributes = "snow"
  cfg.prompt_pairs = "a photo of a red shape|, wooden; a photo of a shape|, at night"
  attrs = study_launch.study_attributes(cfg)
  assert [(a.name, a.prompt, a.target_prompt) for a in attrs] == [
      ("snow", "a photo of a shape", "a photo of a shape, covered by snow"),
      ("wooden", "a photo of a red shape", "a photo of a red shape, wooden"),
      ("at_night", "a photo of a shape", "a photo of a shape, at night")]
  cfg.prompt_pairs = "a photo of a shape, wooden"
  with pytest.raises(ValueError, match="prompt_pairs: .* is not 'c0|appended text'"):
    study_launch.study_attributes(cfg)
  cfg.prompt_pairs = "a photo of a shape|, covered by snow"
  cfg.attributes = ""
  assert study_launch.study_attributes(cfg)[0].name == "covered_by_snow"
  cfg.attributes = "smile"
  with pytest.raises(ValueError, match="'smile' is not a preset of this config"):
    study_launch.study_attributes(cfg)


@needs_weights
@pytest.mark.slow  # forked programs (conftest.cli)
def test_switch_edit_and_study_run_on_the_toy_world(tmp_path, cli):
  runs = [
      ("switch", tmp_path / "switch", ["--config=configs/switch.py:toy", FEW_STEPS,
                                        "--config.seeds=0,1", "--config.t_stars=2"]),
      # applies shipped learned weights (50 steps; learning on an image is tests/test_edit_cli's)
      ("edit", tmp_path / "edit", ["--config=configs/edit.py:toy",
                                    "--config.weights=benchmarks/toy_world/study_lambdas/snow.json"]),
      ("study", tmp_path / "study", ["--config=configs/study.py:toy", FEW_STEPS,
                                      "--config.seeds=0,1", "--config.t_stars=2",
                                      "--config.attributes=snow,night", "--config.grid_seeds=1"]),
  ]
  for (module, wd, overrides), out in zip(runs, cli.run_all(runs, timeout=900)):
    assert out.returncode == 0, (module, out.stderr[-3000:])
  assert (tmp_path / "switch" / "grid.png").is_file()
  assert (tmp_path / "edit" / "pair.png").is_file()
  assert json.loads((tmp_path / "edit" / "metrics.json").read_text())
  rows = [json.loads(line) for line in (tmp_path / "study" / "rows.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * 2 * 2  # sources (T*=2, c1) x attributes x seeds
  for row in rows:  # the judge's scores are in every row, and the metrics measure something
    assert {"attribute_success", "combined", "position_error_px", "geometry_kept"} <= set(row)
  assert any(abs(r["directional_clip"]) > 0 for r in rows)
  assert any(r["content_distance"] > 0 for r in rows)
  night = [r for r in rows if r["attribute"] == "night" and r["source"] == "c1"]
  assert sum(r["attribute_success"] for r in night) >= 1  # even 6 steps paint the night sky
  assert os.path.isfile(tmp_path / "study" / "grid_night.png")
