"""Single-file (CompVis/LDM layout) checkpoints: same model as the diffusers folder, bad input.

The tiny PyTorch model of conftest.torch_sd_dir is written as one LDM ``.safetensors`` file by
tests/ldm_layout.py (an independent inverse of diffusers' mapping); diffusers' own
``from_single_file`` reading that file back proves the layout is the real one.
"""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from disentangle_jax import convert, models, noise, sampler, schedule
from disentangle_jax.models import ldm_keys, single_file
from tests import ldm_layout

torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
import diffusers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position



@pytest.fixture(scope="module")
def ldm_state(torch_sd_dir):
  _, modules = torch_sd_dir
  return ldm_layout.to_ldm(modules["unet"], modules["vae"], modules["text_encoder"])


@pytest.fixture(scope="module")
def files(torch_sd_dir, ldm_state, tmp_path_factory):
  """(single .safetensors file, config folder without weights, tokenizer folder)."""
  path, _ = torch_sd_dir
  root = tmp_path_factory.mktemp("single")
  safetensors.numpy.save_file(ldm_state, root / "tiny-sd.safetensors")
  configs = shutil.copytree(path, root / "configs",
                            ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.msgpack"))
  return root / "tiny-sd.safetensors", configs, path / "tokenizer"


def _config(files, **kw):
  file, configs, tokenizer = files
  return models.ModelConfig(**{"path": str(file), "tokenizer_path": str(tokenizer),
                               "config_path": str(configs), **kw})


@pytest.fixture(scope="module")
def pair(files, torch_sd_dir):
  """(model loaded from the single file, model loaded from the diffusers folder)."""
  return models.load(_config(files)), models.load(models.ModelConfig(path=str(torch_sd_dir[0])))


def _trees_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))))


def test_single_file_equals_the_diffusers_folder(pair):
  single, folder = pair
  assert _trees_equal(single.params, folder.params)
  assert single.unet == folder.unet and single.vae == folder.vae
  assert single.text_encoder.config.to_dict() == folder.text_encoder.config.to_dict()
  assert single.schedule == folder.schedule
  assert (single.latent_channels, single.latent_size, single.vae_scale_factor,
          single.scaling_factor) == (folder.latent_channels, folder.latent_size,
                                     folder.vae_scale_factor, folder.scaling_factor)
  prompts = ["a photo of person, smiling", ""]
  np.testing.assert_array_equal(models.tokenize(single.tokenizer, prompts),
                                models.tokenize(folder.tokenizer, prompts))


def test_same_sampled_latents(pair):
  single, folder = pair
  tables = schedule.step_tables(single.schedule, 4, eta=0.5)
  run = noise.draw(jax.random.key(0), [3, 8], (8, 8, 4), tables.sigma)
  eps_fn = models.make_eps_fn(single.unet)  # == folder.unet (checked above)

  @jax.jit
  def sample(params, text_ids):
    emb = models.make_text_fn(single.text_encoder)(params["text_encoder"], text_ids)
    cond = jnp.broadcast_to(emb[0], (4,) + emb.shape[1:])
    return sampler.sample(eps_fn, params["unet"], run.x_T, run.noise, cond, emb[1], 7.5,
                          tables, sampler.SamplerConfig("ddim"))

  ids = models.tokenize(single.tokenizer, ["a photo of person, smiling", ""])
  ours, theirs = sample(single.params, ids), sample(folder.params, ids)
  assert np.all(np.isfinite(ours)) and np.abs(ours).max() > 0
  np.testing.assert_array_equal(ours, theirs)


def test_diffusers_from_single_file_reads_the_same_weights(files, torch_sd_dir):
  """diffusers' own single-file loader (offline, configs from a folder without weights) gets
  exactly the weights of the PyTorch modules: the test file's layout is the real LDM one."""
  file, configs, _ = files
  pipe = diffusers.StableDiffusionPipeline.from_single_file(
      str(file), config=str(configs), local_files_only=True, safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  for name in ("unet", "vae", "text_encoder"):
    theirs = getattr(pipe, name).state_dict()
    ours = torch_sd_dir[1][name].state_dict()
    assert set(theirs) == set(ours), name
    assert all(torch.equal(theirs[k], ours[k]) for k in ours), name


def test_real_sd_v1_architecture_is_read_from_the_shapes():
  """A file with the real SD v1 shapes (no memory: broadcast zeros) gives SD v1's configs, and
  every parameter of the real-size Flax models finds its weight."""
  cfg = ldm_keys.SD_V1_CONFIGS
  with torch.device("meta"):
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    vae = diffusers.AutoencoderKL(**cfg["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["text_encoder"]))

  def shapes(module):
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape))
            for k, v in module.state_dict().items()}
  state = {**ldm_layout.unet_to_ldm(shapes(unet), 2), **ldm_layout.vae_to_ldm(shapes(vae), 4),
           **ldm_layout.text_to_ldm(shapes(text)), "alphas_cumprod": np.zeros(1000)}
  single_file.detect_family(state, "sd-v1.safetensors")
  inferred = ldm_keys.infer_configs(state, cfg, "sd-v1.safetensors")
  assert inferred == cfg
  config = models.ModelConfig()
  # pylint: disable=protected-access
  trees = models.shape_trees(models.build_unet(inferred["unet"], config, "unet"),
                              models.build_vae(inferred["vae"], config),
                              models.build_text_encoder(inferred["text_encoder"], config))
  # pylint: enable=protected-access
  parts = ldm_keys.split(state, 2, 4, "sd-v1.safetensors")
  _assert_same_as_diffusers_mapping(state, parts, inferred)
  for name, naming in (("unet", "diffusers"), ("vae", "diffusers"),
                       ("text_encoder", "transformers")):
    convert.torch_to_flax(parts[name], trees[name], naming, name)  # raises if anything is off


def _assert_same_as_diffusers_mapping(state, parts, configs):
  """Our LDM -> diffusers renaming equals diffusers' own single-file conversion functions."""
  from diffusers.loaders import single_file_utils as ref  # pylint: disable=g-import-not-at-top
  theirs = {"unet": ref.convert_ldm_unet_checkpoint(state, configs["unet"]),
            "vae": ref.convert_ldm_vae_checkpoint(state, configs["vae"]),
            "text_encoder": ref.convert_ldm_clip_checkpoint(state)}
  for name, ours in parts.items():
    assert set(ours) == set(theirs[name]), (name, sorted(set(ours) ^ set(theirs[name]))[:8])
    for key, value in ours.items():
      assert value.shape == theirs[name][key].shape and np.array_equal(value, theirs[name][key])


def test_split_matches_diffusers_conversion_on_the_tiny_file(ldm_state, files):
  base = {n: json.loads((files[1] / n / "config.json").read_text())
          for n in ("unet", "vae", "text_encoder")}
  base["scheduler"] = ldm_keys.SD_V1_CONFIGS["scheduler"]
  configs = ldm_keys.infer_configs(ldm_state, base, "tiny")
  parts = ldm_keys.split(ldm_state, 1, 4, "tiny")
  _assert_same_as_diffusers_mapping(ldm_state, parts, configs)


def test_ckpt_loads_with_allow_pickle(files, ldm_state, pair, tmp_path):
  """A .ckpt of the original training code: the weights (a bfloat16 one among them) beside
  Lightning-like callback objects, numpy scalars and an object whose unpickling would call a
  function. It loads with allow_pickle, and nothing in it is called."""
  ckpt = tmp_path / "tiny-sd.ckpt"
  weights = {k: torch.from_numpy(v.copy()) for k, v in ldm_state.items()}
  weights["model.diffusion_model.time_embed.0.bias"] = weights[
      "model.diffusion_model.time_embed.0.bias"].bfloat16()
  tripwire = tmp_path / "called"
  torch.save({"global_step": 1, "epoch": np.int64(3), "state_dict": weights,
              "callbacks": {"ModelCheckpoint": _Callback(), "tripwire": _Tripwire(tripwire)},
              "hparams": {"lr": np.float32(1e-4)}}, ckpt)
  with pytest.raises(ValueError, match=re.escape(str(ckpt)) + ".*allow_pickle=True"):
    models.load(_config(files, path=str(ckpt)))
  loaded = models.load(_config(files, path=str(ckpt), allow_pickle=True))
  assert not tripwire.exists()  # the restricted unpickler called nothing it does not know
  ours = jax.tree.map(np.asarray, loaded.params)
  theirs = jax.tree.map(np.asarray, pair[0].params)
  bias = ("time_embedding", "linear_1", "bias")
  a, b = ours["unet"], theirs["unet"]
  for k in bias:
    a, b = a[k], b[k]
  np.testing.assert_array_equal(a, torch.from_numpy(b.copy()).bfloat16().float().numpy())
  ours["unet"]["time_embedding"]["linear_1"]["bias"] = b
  assert _trees_equal(ours, theirs)
  # A file that is not a torch.save archive: one line naming it.
  (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
  message = _error(_config(files, path=str(tmp_path / "old.ckpt"), allow_pickle=True))
  assert "old.ckpt is not a torch.save zip archive" in message


class _Callback:  # what a Lightning callback pickles: an object with plain and numpy state
  def __init__(self):
    self.best_model_score = np.float64(0.25)
    self.monitor = "val/loss"


def _touch(path):
  with open(path, "w") as f:
    f.write("called")


class _Tripwire:  # unpickling it would call _touch (any function: os.system alike)
  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (_touch, (self.path,))


def test_save_writes_a_diffusers_folder(pair, tmp_path):
  models.save(pair[0], tmp_path / "converted")
  again = models.load(models.ModelConfig(path=str(tmp_path / "converted")))
  assert _trees_equal(again.params, pair[0].params)
  assert again.unet == pair[0].unet and again.schedule == pair[0].schedule


# ---------------------------------------------------------------------------------------------
# Bad input: one message naming the file and the fix.


def _error(config, kind=ValueError) -> str:
  with pytest.raises(kind) as info:
    models.load(config)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_error_truncated_file(files, tmp_path):
  data = files[0].read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[: len(data) // 2])
  message = _error(_config(files, path=str(cut)))
  assert str(cut) in message and "is the file complete" in message


def _family_file(tmp_path, ldm_state, kind):
  """A small file with the markers of another family or task."""
  state = dict(ldm_state)
  conv_in = ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight"
  if kind == "inpainting":
    state[conv_in] = np.zeros((32, 9, 3, 3), np.float32)
  elif kind == "sd2":
    state = {k: v for k, v in state.items() if not k.startswith(ldm_keys.TEXT_PREFIX)}
    state["cond_stage_model.model.token_embedding.weight"] = np.zeros((8, 4), np.float32)
  elif kind == "sdxl":
    state = {"conditioner.embedders.1.model.positional_embedding": np.zeros((77, 8), np.float32),
             conv_in: state[conv_in]}
  elif kind == "refiner":
    state = {"conditioner.embedders.0.model.text_projection": np.zeros((8, 8), np.float32),
             conv_in: state[conv_in]}
  elif kind == "component":
    state = {"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}
  elif kind == "no_vae":
    state = {k: v for k, v in state.items() if not k.startswith(ldm_keys.VAE_PREFIX)}
  path = tmp_path / f"{kind}.safetensors"
  safetensors.numpy.save_file(state, path)
  return path


@pytest.mark.parametrize("kind,what", [
    ("inpainting", "an inpainting checkpoint"),
    ("sd2", "an SD 2.x checkpoint"),
    ("sdxl", "an SDXL checkpoint"),
    ("refiner", "an SDXL refiner checkpoint"),
    ("component", "a single component in diffusers/transformers layout"),
    ("no_vae", "without VAE weights"),
])
def test_error_other_family_or_task(files, ldm_state, tmp_path, kind, what):
  path = _family_file(tmp_path, ldm_state, kind)
  message = _error(_config(files, path=str(path)))
  assert message.startswith(f"{path} is {what}") or f"{path} is a checkpoint {what}" in message
  assert "SD v1.x only" in message and "--config.model.path" in message


def test_error_missing_tokenizer(files, tmp_path):
  message = _error(_config(files, tokenizer_path=None))
  assert str(files[0]) in message and "--config.model.tokenizer_path" in message
  (tmp_path / "tok").mkdir()
  shutil.copy(files[2] / "vocab.json", tmp_path / "tok")
  message = _error(_config(files, tokenizer_path=str(tmp_path / "tok")), FileNotFoundError)
  assert "tok lacks the tokenizer files ['merges.txt']" in message


def test_error_architecture_needs_config_path(files):
  message = _error(_config(files, config_path=None))
  assert str(files[0]) in message and "--config.model.config_path" in message
  assert "text width 32 with num_attention_heads=12" in message


def test_error_other_shapes_without_config_path(torch_sd_dir, files, tmp_path):
  """Widths that SD v1.x's head counts and norm groups divide (a 48-wide text encoder of 4
  heads, 32-wide VAE levels) but are not SD v1.x's: without model.config_path the file would
  run with SD v1.x's 12 text heads. Refused, naming the fields."""
  tokenizer = torch_sd_dir[1]["tokenizer"]
  text = models.tiny_text_config(tokenizer) | {"hidden_size": 48, "num_attention_heads": 4}
  vae = models.tiny_vae_config() | {"block_out_channels": (32,) * 4, "norm_num_groups": 32}
  torch.manual_seed(0)
  state = ldm_layout.to_ldm(torch_sd_dir[1]["unet"], diffusers.AutoencoderKL(**vae),
                            transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)))
  path = tmp_path / "other.safetensors"
  safetensors.numpy.save_file(state, path)
  message = _error(_config(files, path=str(path), config_path=None))
  assert message.startswith(f"{path} has other shapes than SD v1.x")
  assert "text_encoder hidden_size=48 (SD v1.x: 768)" in message
  assert "--config.model.config_path" in message


@pytest.mark.parametrize("key", [
    "first_stage_model.encoder.conv_in.weight",  # read for the architecture (was an IndexError)
    "model.diffusion_model.input_blocks.0.0.weight",  # read for the family
    "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight",  # converted
])
def test_error_tensor_with_wrong_dimensions(files, ldm_state, tmp_path, key):
  state = dict(ldm_state)
  state[key] = state[key].reshape(-1) if state[key].ndim > 1 else state[key][None]
  path = tmp_path / "dims.safetensors"
  safetensors.numpy.save_file(state, path)
  message = _error(_config(files, path=str(path)))
  assert message.startswith(f"{path}:") and repr(key) in message, message
  assert "config.json beside" not in message  # a single file has none


def test_error_single_file_fields_with_a_folder(torch_sd_dir, files):
  message = _error(models.ModelConfig(path=str(torch_sd_dir[0]), tokenizer_path=str(files[2])))
  assert "only for a single-file model.path" in message


@pytest.mark.slow  # a forked program (conftest.cli)
def test_cli_error_line(files, tmp_path, cli):
  """The launcher turns a bad single file into one `error:` line, exit code 2."""
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(files[0].read_bytes()[:1000])
  out = cli.run("switch", tmp_path / "wd", f"--config.model.path={cut}",
                f"--config.model.tokenizer_path={files[2]}",
                f"--config.model.config_path={files[1]}", timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and str(cut) in errors[0] and "Traceback" not in out.stderr


def test_error_missing_or_unknown_file(files, tmp_path):
  message = _error(_config(files, path=str(tmp_path / "none.safetensors")), FileNotFoundError)
  assert "none.safetensors' does not exist" in message and "--config.model.path" in message
  (tmp_path / "model.pt").write_bytes(b"x")
  message = _error(_config(files, path=str(tmp_path / "model.pt")))
  assert "model.pt' is a file but not a single-file checkpoint" in message
