"""Model families (SD 1.x, SD 2.x, SDXL base): what differs between them, in one table, and the
checks that refuse, at load time and with one message naming the field, what this library
cannot run (transformer models, the SDXL refiner, unknown UNet / VAE options). SD 3.x and
Flux.1 folders never reach these checks: models.load routes them by their model_index.json
to flow_folder.py (models/flow_bundle.py: families "sd3" and "flux" in the same bundle).

A family is a property of the loaded model (``StableDiffusion.family``); programs never branch
on it. What differs, and where it is handled:

  text conditioning (bundle.encode_prompts):
    sd1, sd2: the last hidden state of one CLIP text encoder (after its final layer norm),
      [L, D]; SD 2.x's OpenCLIP-H encoder is stored as a 23-layer CLIPTextModel, so its "last"
      state is OpenCLIP's penultimate one (diffusers' StableDiffusionPipeline uses output [0]).
    sdxl: a pytree {"tokens": [L, D1 + D2], "pooled": [1, P]}: both encoders' penultimate hidden
      states (hidden_states[-2], before the final layer norm) concatenated, and the pooled
      projection of the second (CLIPTextModelWithProjection.text_embeds) as a one-token leaf.
      Mixing (mixing.mix) applies the same lambda[i] to both leaves.
  UNet inputs (apply.make_eps_fn): sdxl adds text_embeds = pooled and time_ids = (original
    height, width, crop top, left, target height, width) = (h, w, 0, 0, h, w) in pixels, the
    StableDiffusionXLPipeline defaults, derived from the latent size.
  empty negative prompt: sdxl's pipeline conditions on zeros when no negative prompt is given
    (model_index.json force_zeros_for_empty_prompt, true for SDXL base); so does this library
    for negative_prompt = "" (bundle.encode_with_negative).
  VAE: sdxl decodes in float32 whatever the model dtype (vae config force_upcast), with its
    own scaling_factor (0.13025).
  prediction type and timestep spacing are scheduler data (schedule.ScheduleConfig), not family.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

FAMILY_NAMES = ("sd1", "sd2", "sdxl")


@dataclasses.dataclass(frozen=True)
class Family:
  """What one family needs beyond the SD 1.x code path (see the module docstring)."""

  name: str  # "sd1" | "sd2" | "sdxl"
  text_encoders: tuple[str, ...] = ("text_encoder",)  # folder / params names, in concat order
  hidden_layer: int = -1  # -1: last hidden state (final layer norm applied); -2: penultimate
  pooled: bool = False  # the last encoder's pooled projection + time ids condition the UNet
  zero_empty_negative: bool = False  # negative_prompt "" -> zero embeddings (SDXL pipeline)
  vae_float32: bool = False  # decode in float32 whatever the model dtype

  @property
  def tokenizers(self) -> tuple[str, ...]:
    return tuple(name.replace("text_encoder", "tokenizer") for name in self.text_encoders)


SD1 = Family("sd1")
SD2 = Family("sd2")
SDXL = Family("sdxl", ("text_encoder", "text_encoder_2"), hidden_layer=-2, pooled=True,
              zero_empty_negative=True, vae_float32=True)
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}

# The SDXL micro-conditioning: original size (2), crop top-left (2), target size (2).
NUM_TIME_IDS = 6
# UNet config fields diffusers' Flax UNet does not implement: field -> the values it runs as.
_UNET_SUPPORTED = {
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "act_fn": ("silu",),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
}
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# VAE config fields of other latent spaces (SD3 / Flux / Playground VAEs).
_VAE_SUPPORTED = {"latents_mean": (None,), "latents_std": (None,), "shift_factor": (None, 0, 0.0),
                  "use_quant_conv": (True,), "use_post_quant_conv": (True,)}
# Pipelines of other model kinds, refused by name.
_REFUSED_PIPELINES = {
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner is not supported (SDXL base is)",
    "StableDiffusionUpscalePipeline": "the upscaler is not supported",
    "StableDiffusionLatentUpscalePipeline": "the latent upscaler is not supported",
    "StableDiffusionDepth2ImgPipeline": "depth-to-image models are not supported",
    "StableDiffusionInpaintPipeline": "inpainting models are not supported",
}


def _refuse(source: str, field: str, value, why: str) -> None:
  raise ValueError(f"{source}: {field}={value!r}: {why}. Supported: Stable Diffusion 1.x, 2.x "
                   "and SDXL base folders in diffusers layout.")


def check_pipeline(model_index: Mapping, source: str, has_unet: bool = True,
                   has_transformer: bool = False) -> None:
  """Refuses, from model_index.json and the folder's layout alone (before any UNet config is
  read), pipelines of other model kinds: the refused pipeline classes, and transformer / prior
  models (SD3, Flux: a transformer and no UNet)."""
  index = f"{source}/model_index.json"
  pipeline = model_index.get("_class_name")
  if pipeline in _REFUSED_PIPELINES:
    _refuse(index, "_class_name", pipeline, _REFUSED_PIPELINES[pipeline])
  if ("transformer" in model_index or "prior" in model_index
      or (has_transformer and not has_unet)):
    _refuse(index, "_class_name", pipeline, "a transformer/prior model (e.g. Stable Diffusion 3 "
            "or Flux) has no UNet this library can run")


def detect(model_index: Mapping, unet_config: Mapping, source: str) -> Family:
  """The family of a diffusers folder from its model_index.json and unet/config.json.

  Raises ValueError naming the field for anything else (SD3 and other transformer models, the
  SDXL refiner, upscalers, unknown UNet options). The SDXL refiner is recognised by what
  defines it (its pipeline class, ``requires_aesthetics_score``, no first text encoder), never
  by arithmetic on widths: a base layout whose widths happen to add up like the refiner's loads.
  """
  index = f"{source}/model_index.json"
  check_pipeline(model_index, source)
  check_unet_config(unet_config, f"{source}/unet/config.json")
  if unet_config.get("addition_embed_type") == "text_time":
    refiner = ("the SDXL refiner (aesthetic-score micro-conditioning) is not supported (SDXL "
               "base is)")
    if model_index.get("requires_aesthetics_score"):
      _refuse(index, "requires_aesthetics_score", model_index["requires_aesthetics_score"],
              refiner)
    if not _named(model_index.get("text_encoder")):
      _refuse(index, "text_encoder", model_index.get("text_encoder"),
              refiner + "; an SDXL folder without its first text encoder is the refiner")
    for name in ("text_encoder_2", "tokenizer_2"):
      if not _named(model_index.get(name)):
        _refuse(index, name, model_index.get(name), "an SDXL UNet needs both text encoders")
    return SDXL
  # SD 2.x's OpenCLIP-H is 1024 wide, SD 1.x's CLIP ViT-L 768: only a label, one code path.
  return SD2 if unet_config.get("cross_attention_dim") == 1024 else SD1


def _named(entry) -> bool:
  """A model_index.json component entry that names a class (not [null, null])."""
  return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def check_unet_config(cfg: Mapping, source: str) -> None:
  """Refuses UNet options diffusers' Flax UNet would silently ignore (one message naming one)."""
  for field, supported in _UNET_SUPPORTED.items():
    if field in cfg and cfg[field] not in supported:
      _refuse(source, field, cfg[field], f"this UNet option is not supported (supported: "
              f"{', '.join(repr(v) for v in supported)})")
  for field, allowed in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
    unknown = [b for b in cfg.get(field, ()) if b not in allowed]
    if unknown:
      _refuse(source, field, unknown, f"unknown UNet blocks (supported: {', '.join(allowed)})")
  for field in ("layers_per_block", "cross_attention_dim"):
    if isinstance(cfg.get(field), (list, tuple)):
      _refuse(source, field, cfg[field], "per-block values are not supported; give one integer")
  layers = cfg.get("transformer_layers_per_block")
  if isinstance(layers, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in layers):
    _refuse(source, "transformer_layers_per_block", layers, "nested per-layer values are not "
            "supported; give one integer per block")


def check_vae_config(cfg: Mapping, source: str) -> None:
  """Refuses VAE options of other latent spaces (latent mean/std, shift factor)."""
  for field, supported in _VAE_SUPPORTED.items():
    if field in cfg and cfg[field] not in supported:
      _refuse(source, field, cfg[field], "this VAE option is not supported (supported: "
              f"{', '.join(repr(v) for v in supported)})")


def time_ids(height: int, width: int) -> tuple[int, ...]:
  """SDXL's micro-conditioning for an image of height x width px, as its pipeline's defaults:
  original size = target size = (height, width), crop top-left (0, 0)."""
  return (height, width, 0, 0, height, width)
