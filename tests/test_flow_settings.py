"""flow_settings.py: the settings an SD 3.x / Flux.1 model cannot honour are refused by name
before it loads, the family is read from the config alone, and weights files of flow runs
carry the flow schedule and do not cross model families (pure; milliseconds)."""
import importlib
import json

import pytest

from disentangle_jax import errors, flow_schedule, flow_settings, sampling, weights_file


@pytest.mark.parametrize("fam,changes,pin,torch_numerics,field", [
    ("sd3", {"kind": "plms"}, None, False, "sampler='plms'"),
    ("flux", {"eta": 0.5}, None, False, "eta=0.5"),
    ("sd3", {}, "current", False, "pin='current'"),
    ("flux", {"negative_prompt": "blurry"}, None, False, "negative_prompt='blurry'"),
    ("sd3", {}, None, True, "model.torch_numerics=True"),
])
def test_settings_a_flow_model_cannot_honour_are_refused_by_name(fam, changes, pin,
                                                                  torch_numerics, field):
  with pytest.raises(errors.UserError, match=field.replace("(", r"\(")):
    flow_settings.check(fam, sampling.SamplingConfig(num_steps=3, **changes), pin=pin,
                        torch_numerics=torch_numerics)


def test_what_a_flow_model_honours_and_every_unet_setting_pass():
  flow_settings.check("sd3", sampling.SamplingConfig(num_steps=3, negative_prompt="blurry"),
                      pin="next")  # SD 3.x runs CFG with the negative prompt
  flow_settings.check("flux", sampling.SamplingConfig(num_steps=3), pin="next")
  flow_settings.check(None, sampling.SamplingConfig(num_steps=3, kind="plms"), pin="current",
                      torch_numerics=True)  # not a flow model: sampler.py decides


def test_family_from_the_config_alone(tmp_path):
  assert flow_settings.family("flux") == "flux" and flow_settings.family("sd3") == "sd3"
  assert flow_settings.family("sdxl") is None and flow_settings.family("") is None
  for name, fam in (("FluxPipeline", "flux"), ("StableDiffusion3Pipeline", "sd3"),
                    ("StableDiffusionPipeline", None)):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    assert flow_settings.family("", str(folder)) == fam
  assert flow_settings.family("flux", str(tmp_path)) is None  # a path wins over tiny_family


def _weights(sampler: str) -> weights_file.LearnedWeights:
  return weights_file.LearnedWeights(lam=(0.0, 1.0, 1.0), prompt="a", target_prompt="a, b",
                                     num_steps=3, sampler=sampler, eta=0.0, guidance=7.5,
                                     schedule={})


@pytest.mark.parametrize("file_sampler,run_sampler,learned_on", [
    (flow_settings.SAMPLER, "ddim", "learned on a flow-matching model"),
    ("ddim", flow_settings.SAMPLER, "learned on a UNet model"),
    ("plms", flow_settings.SAMPLER, "learned on a UNet model"),
])
def test_weights_files_do_not_cross_model_families(file_sampler, run_sampler, learned_on):
  with pytest.raises(errors.UserError, match=learned_on):
    weights_file.check_compatible(_weights(file_sampler), 3, run_sampler, "weights file 'w'")
  assert list(weights_file.check_compatible(_weights(run_sampler), 3, run_sampler)) == [0, 1, 1]


def test_schedule_record_is_the_flow_schedule_that_ran():
  cfg = flow_schedule.FlowScheduleConfig(use_dynamic_shifting=True)
  tables = flow_schedule.tables(cfg, 4, "flux", seq_len=flow_schedule.image_seq_len(8, 6))
  sigmas = list(tables.sigma) + [0.0]
  record = flow_settings.schedule_record("flux", cfg, sigmas, (8, 6))
  assert record["kind"] == flow_settings.SCHEDULE_KIND and record["pipeline"] == "flux"
  assert record["use_dynamic_shifting"] is True and record["shift"] == 1.0
  assert record["latent_size"] == [8, 6] and record["sigmas"] == [float(s) for s in sigmas]
  assert json.loads(json.dumps(record)) == record  # a JSON entry as it stands


@pytest.mark.parametrize("program", ["disentangle:smile", "switch:", "edit:smile", "study:"])
def test_flux_presets_set_the_distilled_guidance(program):
  """On Flux.1 the programs' guidance is FluxPipeline's guidance_scale: the ,flux presets set
  Flux.1-dev's 3.5; ,sd35 keeps the CFG scale 7.5."""
  name, preset = program.split(":")
  config = importlib.import_module(f"configs.{name}")
  flux_arg, sd35_arg = (f"{preset},flux", f"{preset},sd35") if preset else ("flux", "sd35")
  assert config.get_config(flux_arg).guidance == 3.5
  assert config.get_config(flux_arg).image_size == 1024
  assert config.get_config(sd35_arg).guidance == 7.5
  for arg in (flux_arg, sd35_arg):  # the memory options that fit one 80 GB GPU (common.MEMORY)
    model = config.get_config(arg).model
    assert (model.attention, model.block_remat) == ("chunked", "layers"), arg
