"""Meaningless runs are refused in one line before any work, and leave no workdir: prompts that
encode to the same tokens (every program), an image with non-finite pixels, a preset suffix a
config does not know."""
import types

import numpy as np
import pytest
from PIL import Image

from disentangle_jax import errors, models, real_images
from disentangle_jax.toy import world
from tests.conftest import error_lines, refused

CHURCH = ("A photo of church exterior", ", covered by snow")  # a preset of configs/disentangle.py


@pytest.fixture(scope="module")
def toy_tokenizer():
  return world.tokenizer()


def _toy(tokenizer):
  """What check_pairs reads of a model: its tokenizers."""
  return types.SimpleNamespace(tokenizer=tokenizer, family=models.FAMILIES["sd1"])


def test_unknown_words_are_named_as_unknown_not_as_too_long(toy_tokenizer):
  c0, c1 = CHURCH[0], CHURCH[0] + CHURCH[1]
  with pytest.raises(errors.UserError) as e:
    models.check_pairs(_toy(toy_tokenizer), ["a photo of a red circle", "a photo of a red circle, "
                                             "covered by snow", c0, c1])
  msg = str(e.value)
  assert msg.startswith(f"c0 {c0!r} and c1 {c1!r} encode to the same tokens"), msg
  assert "the words 'church', 'exterior' are unknown to this model's tokenizer" in msg, msg
  assert "\n" not in msg


def test_the_token_limit_and_dropped_differences_are_named(toy_tokenizer):
  known = "a photo of a red circle on the left"  # toy words, 9 tokens
  c0 = f"{known} {known}"  # 18 > 14 prompt tokens: the attribute is cut off
  with pytest.raises(errors.UserError, match=r"reads 14 prompt tokens and the prompts differ "
                                             r"only after them \(the longer one has 22\)"):
    models.check_pairs(_toy(toy_tokenizer), [c0, c0 + ", covered by snow"])
  with pytest.raises(errors.UserError, match="letter case, spacing"):
    models.check_pairs(_toy(toy_tokenizer), [known, known.upper() + "  "])
  models.check_pairs(_toy(toy_tokenizer), [known, known + ", covered by snow"])  # differ: fine


@pytest.mark.slow
def test_every_program_refuses_prompts_that_encode_alike(cli, tmp_path):
  """The tiny model reads 77 tokens: a c0 of 78 cuts c1's attribute off in every program."""
  c0 = "a photo of " + "person " * 75
  c1 = c0 + ", smiling"
  prompts = (f"--config.prompt={c0}", "--config.attribute=, smiling", "--config.num_steps=2")
  runs = [("disentangle", tmp_path / "disentangle", prompts),
          ("switch", tmp_path / "switch", prompts),
          ("edit", tmp_path / "edit", prompts),
          ("study", tmp_path / "study", ("--config.attributes=smile", "--config.num_steps=2",
                                         f"--config.presets.smile.prompt={c0}",
                                         "--config.seeds=0"))]
  for (module, workdir, _), out in zip(runs, cli.run_all(runs)):
    refused(out, f"c0 {c0!r} and c1 {c1!r} encode to the same tokens")
    assert "reads 75 prompt tokens and the prompts differ only after them" in (
        error_lines(out.stderr)[0]), module
    assert not workdir.exists(), (module, sorted(p.name for p in workdir.iterdir()))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_image_with_non_finite_pixels_is_refused_naming_the_file(tmp_path, bad):
  pixels = np.full((16, 16), 0.5, np.float32)
  pixels[3, 4] = bad
  path = str(tmp_path / "scan.tif")
  Image.fromarray(pixels, "F").save(path)
  with pytest.raises(ValueError, match=f"image {path!r} holds non-finite pixel values"):
    real_images.load(path)
  pixels[3, 4] = 1.0
  Image.fromarray(pixels, "F").save(path)
  assert real_images.load(path).pixels.shape == (16, 16, 3)  # finite floats still load


@pytest.mark.slow
def test_edit_refuses_a_non_finite_image_in_one_line(cli, tmp_path):
  pixels = np.zeros((16, 16), np.float32)
  pixels[0, 0] = np.nan
  path = tmp_path / "nan.tif"
  Image.fromarray(pixels, "F").save(path)
  out = cli.run("edit", tmp_path / "wd", f"--config.image={path}", "--config.num_steps=2")
  refused(out, f"image {str(path)!r} holds non-finite pixel values")
  assert not (tmp_path / "wd").exists()


def test_a_preset_suffix_the_config_does_not_know_is_refused():
  from configs import common  # pylint: disable=import-outside-toplevel
  presets = {"snow": ()}
  assert common.parse_preset_arg("snow", presets, "configs/x.py", sizes=()) == ("snow", "")
  with pytest.raises(errors.UserError, match="unknown suffix 'sd' after the preset; its model "
                                             "is fixed: write configs/x.py:snow"):
    common.parse_preset_arg("snow,sd", presets, "configs/x.py", sizes=())
  with pytest.raises(errors.UserError, match="unknown suffix 'sd3'.*use one of ,sd, ,sd2"):
    common.parse_preset_arg("snow,sd3", presets, "configs/x.py")
  assert common.parse_preset_arg("snow,sdxl", presets, "configs/x.py") == ("snow", "sdxl")


@pytest.mark.parametrize("value, expected", [("0-3,7", (0, 1, 2, 3, 7)), ("42", (42,)),
                                             ((1, 2), (1, 2)), (5, (5,)), ("-1", (-1,))])
def test_integer_lists_take_ranges(value, expected):
  from launch import common  # noqa: PLC0415
  assert common.as_tuple(value, "seeds") == expected


@pytest.mark.parametrize("value", ["3-1", "a-b", "1-2-3", "x"])
def test_a_bad_integer_list_is_refused_by_name(value):
  from launch import common  # noqa: PLC0415
  with pytest.raises(errors.UserError, match=r"seeds=.* a range 0-255"):
    common.as_tuple(value, "seeds")
