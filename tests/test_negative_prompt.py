"""Negative prompts: one sampling field, default "" (every earlier result and resume unchanged)."""
import dataclasses
import importlib

import numpy as np
import pytest

from disentangle_jax import disentangle, edit_problem, errors, models, run_identity
from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax.sampling import SamplingConfig
from launch import common as launch_common

PROGRAMS = (("disentangle", "smile"), ("edit", "snow"), ("study", "tiny"), ("switch", "tiny"))


def _config(program, arg):
  return importlib.import_module(f"configs.{program}").get_config(arg)


@pytest.mark.parametrize("program,arg", PROGRAMS)
def test_every_program_reads_the_field_default_empty(program, arg):
  cfg = _config(program, arg)
  assert launch_common.sampling(cfg).negative_prompt == ""
  cfg.negative_prompt = "blurry, low quality"
  assert launch_common.sampling(cfg).negative_prompt == "blurry, low quality"


def test_non_string_is_refused_by_name():
  with pytest.raises(errors.UserError, match="negative_prompt"):
    SamplingConfig(negative_prompt=None)


def test_the_unconditional_embedding_is_the_negative_prompts(tiny_model):
  lm = loss_models_lib.load_loss_models(loss_models_lib.LossModelConfig(),
                                        tokenizer=tiny_model.tokenizer)
  spec = disentangle.EditSpec(prompt="a photo of person", attribute=", smiling", seeds=(1,),
                              t_star=2, sampling=SamplingConfig(num_steps=4))
  emb = models.encode_prompts(tiny_model, ["", "the church style"])
  default = edit_problem.encode_edits(tiny_model, lm, [spec])
  negative = edit_problem.encode_edits(tiny_model, lm, [spec], "the church style")
  np.testing.assert_array_equal(default.prompts.uncond, emb[0])
  np.testing.assert_array_equal(negative.prompts.uncond, emb[1])
  np.testing.assert_array_equal(negative.prompts.c0, default.prompts.c0)  # c0, c1 unchanged


def test_a_run_saved_before_the_field_existed_still_resumes():
  spec = disentangle.EditSpec(prompt="a", attribute=", b", seeds=(1,), t_star=2,
                              sampling=SamplingConfig(num_steps=4))
  current = disentangle.run_identity_of(spec)
  saved = {k: v for k, v in current.items() if not k.endswith("negative_prompt")}
  assert len(saved) == len(current) - 1
  assert run_identity.differences(saved, current) == []
  other = dataclasses.replace(spec, sampling=SamplingConfig(num_steps=4, negative_prompt="x"))
  diff = run_identity.differences(saved, disentangle.run_identity_of(other))
  assert len(diff) == 1 and "negative_prompt" in diff[0]
