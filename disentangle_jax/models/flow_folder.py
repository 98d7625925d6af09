"""Flow-matching folders in diffusers layout (SD 3.x, Flux.1): detection, checks, loading.

The family is detected from model_index.json's ``_class_name`` (``StableDiffusion3Pipeline`` ->
"sd3", ``FluxPipeline`` -> "flux"); every other pipeline class, a missing component (T5, a
CLIP encoder, the VAE, ...), a component of an unexpected class, an unknown transformer option,
a scheduler option the flow sampler does not run, and a VAE outside the 16-channel latent space
are refused with one message naming the file and the field.

``load`` reads every component from safetensors in numpy (no torch; sharded indexes too): the
transformer (dit_convert.py, the own MMDiT / Flux ports), the scheduler config, the text
encoders (transformers' Flax CLIP classes and the own T5, flow_text.py) with their tokenizers,
and the VAE (flow_vae.py; latents = (z - shift_factor) * scaling_factor). ``FlowModel`` hands
out the pure functions the programs need: velocity_fn, tables, token_ids + encode_fn,
decode_fn. The programs run it through models/flow_bundle.py (models.load routes these folders
here from their model_index.json).

Shapes of what ``FlowModel`` builds: as flow_sampler.py (H W C latent, NHWC).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
import transformers

from disentangle_jax import errors
from disentangle_jax import flow_sampler
from disentangle_jax import flow_settings
from disentangle_jax import flow_schedule
from disentangle_jax.models import dit_convert, flow_text, flow_vae
from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit

PIPELINES = flow_settings.PIPELINES  # pipeline class -> family (read before loading too)

# The components each family needs, with the class each must have.
_COMPONENTS = {
    "sd3": {"transformer": "SD3Transformer2DModel",
            "scheduler": "FlowMatchEulerDiscreteScheduler", "vae": "AutoencoderKL",
            "text_encoder": "CLIPTextModelWithProjection",
            "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
    "flux": {"transformer": "FluxTransformer2DModel",
             "scheduler": "FlowMatchEulerDiscreteScheduler", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
}
# Optional components that must be absent ([null, null]) because nothing here runs them.
_ABSENT = {"image_encoder": "IP-Adapter image encoders are not supported",
           "feature_extractor": "IP-Adapter image encoders are not supported",
           "controlnet": "ControlNets are not supported"}
# Pipelines of these families' repositories that are refused by name (with the reason).
REFUSED_PIPELINES = {
    "StableDiffusion3Img2ImgPipeline": "image-to-image pipelines are not supported",
    "StableDiffusion3InpaintPipeline": "inpainting pipelines are not supported",
    "StableDiffusion3ControlNetPipeline": "ControlNets are not supported",
    "FluxImg2ImgPipeline": "image-to-image pipelines are not supported",
    "FluxInpaintPipeline": "inpainting pipelines are not supported",
    "FluxFillPipeline": "Flux.1 Fill (inpainting) is not supported",
    "FluxControlPipeline": "Flux.1 Canny/Depth control models are not supported",
    "FluxKontextPipeline": "Flux.1 Kontext (image editing) is not supported",
    "FluxPriorReduxPipeline": "Flux.1 Redux is not supported",
}
LATENT_CHANNELS = 16  # the SD3 / Flux VAE latent space


def _refuse(source: str, field: str, value, why: str):
  raise errors.UserError(f"{source}: {field}={value!r}: {why}. Supported: "
                         f"{' and '.join(PIPELINES)} folders in diffusers layout.")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise errors.UserError(f"{path} does not exist: is the folder a complete diffusers "
                           "pipeline folder?")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path} is not valid JSON ({e}).") from e


def _class_of(entry):
  """The class named by a model_index.json entry ([library, class]), None if [null, null]."""
  if isinstance(entry, (list, tuple)) and len(entry) == 2:
    return entry[1]
  return None


def detect(model_index: Mapping, source: str) -> str:
  """The family ("sd3" | "flux") of a folder from its model_index.json; refuses the rest."""
  index = f"{source}/model_index.json"
  pipeline = model_index.get("_class_name")
  if pipeline in REFUSED_PIPELINES:
    _refuse(index, "_class_name", pipeline, REFUSED_PIPELINES[pipeline])
  if pipeline not in PIPELINES:
    _refuse(index, "_class_name", pipeline, "not a flow-matching pipeline this library runs")
  family = PIPELINES[pipeline]
  for name, cls in _COMPONENTS[family].items():
    found = _class_of(model_index.get(name))
    if found is None:
      _refuse(index, name, model_index.get(name), f"{pipeline} needs its {cls} here (a folder "
              "without it, e.g. SD3 without its T5 text_encoder_3, is not supported)")
    if found != cls:
      _refuse(index, name, found, f"expected {cls}")
  for name, why in _ABSENT.items():
    if _class_of(model_index.get(name)) is not None:
      _refuse(index, name, _class_of(model_index.get(name)), why)
  return family


def check_vae_config(cfg: Mapping, source: str) -> tuple[float, float]:
  """(scaling_factor, shift_factor) of the 16-channel VAE; refuses other latent spaces."""
  if cfg.get("latent_channels") != LATENT_CHANNELS:
    _refuse(source, "latent_channels", cfg.get("latent_channels"),
            f"SD 3.x and Flux.1 VAEs have {LATENT_CHANNELS} latent channels")
  for name in ("scaling_factor", "shift_factor"):
    if not isinstance(cfg.get(name), (int, float)):
      _refuse(source, name, cfg.get(name), "the latent normalisation (z - shift_factor) * "
              "scaling_factor needs both numbers")
  return float(cfg["scaling_factor"]), float(cfg["shift_factor"])


# The text encoders of each family, in encode-function order: (component, tokenizer, kind,
# CLIP with projection), and the tokenizer length of each (flow_text.py).
_TEXT = {
    "sd3": (("text_encoder", "tokenizer", "clip", True),
            ("text_encoder_2", "tokenizer_2", "clip", True),
            ("text_encoder_3", "tokenizer_3", "t5", None)),
    "flux": (("text_encoder", "tokenizer", "clip", False),
             ("text_encoder_2", "tokenizer_2", "t5", None)),
}
_T5_LENGTH = {"sd3": flow_text.SD3_T5_LENGTH, "flux": flow_text.FLUX_T5_LENGTH}
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class FlowModel:
  """A loaded SD 3.x / Flux.1 folder (module docstring).

  ``params``: {"transformer", "vae", "text_encoder", ...: numpy weight trees} (pass them to
  jitted code as arguments); ``modules``: the static Flax modules of the VAE and the text
  encoders; ``tokenizers``: {"tokenizer", ...}. The last three are empty when loaded with
  ``with_encoders=False``.
  """

  family: str  # "sd3" | "flux"
  source: str
  transformer_config: Any  # mmdit.MMDiTConfig | flux.FluxConfig
  params: Any = dataclasses.field(repr=False, compare=False)
  schedule: flow_schedule.FlowScheduleConfig = flow_schedule.FlowScheduleConfig()
  vae_scaling_factor: float = 1.0
  vae_shift_factor: float = 0.0
  modules: Any = dataclasses.field(default=None, repr=False, compare=False)
  tokenizers: Any = dataclasses.field(default=None, repr=False, compare=False)
  t5_length: int | None = None  # T5 tokens; None = the pipeline's max_sequence_length

  def velocity_fn(self, remat: bool = False, attention: str = "dot_product",
                  dtype=np.float32) -> flow_sampler.VelocityFn:
    """The sampler's velocity function of this transformer with the given run options (it takes
    ``params["transformer"]``)."""
    if self.family == "sd3":
      return flow_sampler.sd3_velocity_fn(
          mmdit.MMDiT(self.transformer_config, remat, attention, dtype))
    return flow_sampler.flux_velocity_fn(
        flux_lib.Flux(self.transformer_config, remat, attention, dtype))

  def tables(self, num_steps: int, height: int, width: int) -> flow_schedule.FlowTables:
    """The family's pipeline's tables for latents of height x width (mu for dynamic shift from
    the image token count: SD3's patches or Flux's packed 2 x 2 patches)."""
    patch = (self.transformer_config.patch_size if self.family == "sd3" else 2)
    return flow_schedule.tables(self.schedule, num_steps, self.family,
                                seq_len=flow_schedule.image_seq_len(height, width, patch))

  def token_ids(self, prompts, max_sequence_length: int | None = None) -> tuple:
    """The encode function's id arguments for ``prompts`` (CLIP: 77; T5: the pipeline's
    max_sequence_length, 256 for SD3 and 512 for Flux unless given)."""
    t5_length = max_sequence_length or self.t5_length or _T5_LENGTH[self.family]
    return tuple(flow_text.tokenize(self.tokenizers[tok], prompts,
                                    t5_length if kind == "t5" else flow_text.CLIP_LENGTH)
                 for _, tok, kind, _ in _TEXT[self.family])

  def encode_fn(self):
    """encode(params, *token_ids) -> {"tokens": [N, L, J], "pooled": [N, 1, P]} (flow_text)."""
    encoders = [self.modules[name] for name, *_ in _TEXT[self.family]]
    make = (flow_text.make_sd3_encode_fn if self.family == "sd3"
            else flow_text.make_flux_encode_fn)
    return make(*encoders)

  def decode_fn(self):
    """decode(params["vae"], latents [B,H,W,16]) -> images [B,8H,8W,3] in [0, 1]."""
    return flow_vae.make_decode_fn(self.modules["vae"], self.vae_scaling_factor,
                                   self.vae_shift_factor)


def _as_user_error(source: str, fn, *args):
  """fn(*args), its ValueErrors (the config / converter checks name the field) as one
  user-error line naming ``source``."""
  try:
    return fn(*args)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.UserError(f"{source}: {e}" if source not in str(e) else str(e)) from e


def _load_text_encoder(folder: str, name: str, tokenizer_name: str, kind: str, projection,
                       dtype):
  directory = os.path.join(folder, name)
  cfg = _read_json(os.path.join(directory, "config.json"))
  encoder = _as_user_error(directory, lambda: (
      flow_text.build_t5(cfg) if kind == "t5" else flow_text.build_clip(cfg, projection)))
  state = _as_user_error(directory, dit_convert.read_state_dict, directory, dtype,
                         TRANSFORMERS_WEIGHTS)
  params = _as_user_error(directory, flow_text.text_params, state, encoder, directory)
  tokenizer_dir = os.path.join(folder, tokenizer_name)
  cls = transformers.T5TokenizerFast if kind == "t5" else transformers.CLIPTokenizer
  try:
    tokenizer = cls.from_pretrained(tokenizer_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{tokenizer_dir} could not be read as a {cls.__name__} "
                           f"({type(e).__name__}: {e}).") from e
  return encoder, params, tokenizer


def load(folder: str, dtype=np.float32, with_encoders: bool = True) -> FlowModel:
  """Reads a StableDiffusion3Pipeline / FluxPipeline folder (module docstring); without
  ``with_encoders`` only the transformer and the scheduler (the quick check of a folder)."""
  folder = os.fspath(folder)
  family = detect(_read_json(os.path.join(folder, "model_index.json")), folder)
  vae_dir = os.path.join(folder, "vae")
  vae_cfg = _read_json(os.path.join(vae_dir, "config.json"))
  scaling, shift = check_vae_config(vae_cfg, f"{vae_dir}/config.json")
  schedule = flow_schedule.FlowScheduleConfig.from_diffusers_config(
      _read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
  transformer = os.path.join(folder, "transformer")
  config, transformer_params = _as_user_error(transformer, dit_convert.load_transformer,
                                              transformer, dtype)
  channels = (config.in_channels if family == "sd3" else config.in_channels // 4)
  if channels != LATENT_CHANNELS:
    _refuse(f"{transformer}/config.json", "in_channels", config.in_channels,
            f"the transformer does not take the VAE's {LATENT_CHANNELS} latent channels")
  params, modules, tokenizers = {"transformer": transformer_params}, {}, {}
  if with_encoders:
    for name, tokenizer_name, kind, projection in _TEXT[family]:
      modules[name], params[name], tokenizers[tokenizer_name] = _load_text_encoder(
          folder, name, tokenizer_name, kind, projection, dtype)
    modules["vae"] = _as_user_error(vae_dir, flow_vae.build_vae, vae_cfg)
    state = _as_user_error(vae_dir, dit_convert.read_state_dict, vae_dir, dtype)
    params["vae"] = _as_user_error(vae_dir, flow_vae.vae_params, state, modules["vae"],
                                   vae_cfg, vae_dir)
  return FlowModel(family, folder, config, params, schedule, scaling, shift, modules,
                   tokenizers)
