"""The CompVis/LDM single-file layout: its key names -> diffusers / transformers names, and the
component configs its weights' shapes reveal.

``split`` renames the keys of each component as diffusers' single-file loader does
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint`` including the VAE attention's 1x1 convolutions -> linear weights,
``convert_ldm_clip_checkpoint``); ``infer_configs`` reads the architecture from the shapes, the
rest from a base config (``SD_V1_CONFIGS`` unless the user names a folder). Pure numpy.
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# Keys of the original LatentDiffusion module that are not weights of the three components.
_LDM_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"))
# diffusers uses the non-EMA UNet when a file holds both; so do we (with the same warning).
_EMA_PREFIX = "model_ema."

# The standard SD v1.x configs (stable-diffusion-v1-5's unet/, vae/, text_encoder/ and
# scheduler/ config files, private "_" fields dropped).
SD_V1_CONFIGS = {
    "unet": {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
    },
    "vae": {
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
    },
    "text_encoder": {  # openai/clip-vit-large-patch14's text tower
        "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
    },
    "scheduler": {
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading",
    },
}

# LDM UNet resnet parts -> diffusers names.
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
                "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                "skip_connection": "conv_shortcut"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
# LDM VAE mid attention parts -> diffusers names.
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}
_VAE_TOP = ("conv_in", "conv_out", "quant_conv", "post_quant_conv")

FIX_FILE = ("Point --config.model.path at an SD v1.x checkpoint (a single .safetensors/.ckpt in "
             "the CompVis layout, or a diffusers-layout folder).")


def check_ndim(state, key: str, ndim: int, source: str) -> None:
  """Raises ValueError naming ``source`` and ``key`` if that tensor has not ``ndim`` dimensions."""
  found = tuple(state[key].shape)
  if len(found) != ndim:
    raise ValueError(f"{source}: the tensor {key!r} has {len(found)} dimension(s) {found}; SD "
                     f"v1.x's has {ndim}. The file is damaged or of another model. {FIX_FILE}")


def has_prefix(state, prefix: str) -> bool:
  """True if any key of ``state`` starts with ``prefix``."""
  return any(k.startswith(prefix) for k in state)


def _unet_resnet(rest: str) -> str | None:
  for ldm, diffusers_name in _UNET_RESNET.items():
    if rest.startswith(ldm + "."):
      return diffusers_name + rest[len(ldm):]
  return None


def _unet_key(key: str, layers: int) -> str | None:
  """One ``model.diffusion_model.`` key (prefix removed) -> its diffusers UNet name, or None."""
  module, _, leaf = key.rpartition(".")
  if module in _UNET_TOP:
    return f"{_UNET_TOP[module]}.{leaf}"
  if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", key):
    i, part, rest = int(m[1]) - 1, int(m[2]), m[3]
    block, layer = divmod(i, layers + 1)
    if layer == layers:  # the level's last entry: its downsampler
      return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}" if rest.startswith(
          "op.") and part == 0 else None
    if part == 0:
      rest = _unet_resnet(rest)
      return rest and f"down_blocks.{block}.resnets.{layer}.{rest}"
    return f"down_blocks.{block}.attentions.{layer}.{rest}" if part == 1 else None
  if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
    part, rest = int(m[1]), m[2]
    if part == 1:
      return f"mid_block.attentions.0.{rest}"
    rest = _unet_resnet(rest)
    return f"mid_block.resnets.{part // 2}.{rest}" if rest and part in (0, 2) else None
  if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", key):
    block, layer = divmod(int(m[1]), layers + 1)
    part, rest = int(m[2]), m[3]
    if part == 0:
      rest = _unet_resnet(rest)
      return rest and f"up_blocks.{block}.resnets.{layer}.{rest}"
    if rest.startswith("conv."):  # the upsampler: part 1, or 2 after an attention
      return f"up_blocks.{block}.upsamplers.0.{rest}"
    return f"up_blocks.{block}.attentions.{layer}.{rest}" if part == 1 else None
  return None


def _vae_key(key: str, num_blocks: int) -> tuple[str, bool] | None:
  """One ``first_stage_model.`` key (prefix removed) -> (diffusers name, is 1x1 conv attention)."""
  if key.startswith("loss."):  # the training loss (discriminator, logvar): not the model
    return None
  module, _, leaf = key.rpartition(".")
  if module in _VAE_TOP:
    return key, False
  if m := re.fullmatch(r"(encoder|decoder)\.(.+)", module):
    part, rest = m[1], m[2]
    if rest == "norm_out":
      return f"{part}.conv_norm_out.{leaf}", False
    if rest in ("conv_in", "conv_out"):
      return key, False
    if mm := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
      return f"{part}.mid_block.resnets.{int(mm[1]) - 1}.{_vae_resnet(mm[2])}.{leaf}", False
    if mm := re.fullmatch(r"mid\.attn_1\.(\w+)", rest):
      name = _VAE_ATTENTION.get(mm[1])
      return name and (f"{part}.mid_block.attentions.0.{name}.{leaf}",
                       leaf == "weight" and name != "group_norm")
    if part == "encoder" and (mm := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", rest)):
      return f"encoder.down_blocks.{mm[1]}.resnets.{mm[2]}.{_vae_resnet(mm[3])}.{leaf}", False
    if part == "encoder" and (mm := re.fullmatch(r"down\.(\d+)\.downsample\.conv", rest)):
      return f"encoder.down_blocks.{mm[1]}.downsamplers.0.conv.{leaf}", False
    if part == "decoder" and (mm := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", rest)):
      block = num_blocks - 1 - int(mm[1])  # LDM counts decoder levels from the bottom
      return f"decoder.up_blocks.{block}.resnets.{mm[2]}.{_vae_resnet(mm[3])}.{leaf}", False
    if part == "decoder" and (mm := re.fullmatch(r"up\.(\d+)\.upsample\.conv", rest)):
      return f"decoder.up_blocks.{num_blocks - 1 - int(mm[1])}.upsamplers.0.conv.{leaf}", False
  return None


def _vae_resnet(name: str) -> str:
  return "conv_shortcut" if name == "nin_shortcut" else name


def split(state: dict, unet_layers: int, vae_blocks: int, source: str,
          origins: dict | None = None) -> dict[str, dict]:
  """The LDM state dict -> {"unet", "vae", "text_encoder": diffusers/transformers state dict}.

  Args:
    state: a file's state dict that ``detect_family`` accepted.
    unet_layers: the UNet's layers per block (``infer_configs``), which fixes the block numbering.
    vae_blocks: the VAE's number of levels (the decoder counts them from the bottom).
    source: the file name for messages.
    origins: if given, filled with {component: {new name: the key in the file}} (messages
      about a converted weight then name the file's own key).

  Keys that belong to no component (DDPM buffers, EMA copies, the VAE's training loss) are
  dropped; keys of a component with no diffusers name are dropped with one warning (a missing
  weight is then reported by the shape check of ``convert.torch_to_flax``).
  """
  out = {"unet": {}, "vae": {}, "text_encoder": {}}
  unknown = []
  ema = 0
  for key, value in state.items():
    if key.startswith(UNET_PREFIX):
      name = _unet_key(key[len(UNET_PREFIX):], unet_layers)
      if name is not None:
        out["unet"][name] = value
        _origin(origins, "unet", name, key)
        continue
    elif key.startswith(VAE_PREFIX):
      found = _vae_key(key[len(VAE_PREFIX):], vae_blocks)
      if found is not None:
        name, conv_attention = found
        # diffusers' conv_attn_to_linear: the VAE attention's 1x1 convs become linear weights.
        out["vae"][name] = value[:, :, 0, 0] if conv_attention and value.ndim == 4 else value
        _origin(origins, "vae", name, key)
        continue
      if key.startswith(VAE_PREFIX + "loss."):
        continue
    elif key.startswith(TEXT_PREFIX):
      out["text_encoder"][key[len(TEXT_PREFIX):]] = value
      _origin(origins, "text_encoder", key[len(TEXT_PREFIX):], key)
      continue
    elif key.startswith(_EMA_PREFIX):
      ema += 1
      continue
    elif key in _LDM_BUFFERS:
      continue
    unknown.append(key)
  if ema > 100:
    logger.warning("%s holds EMA and non-EMA weights; the non-EMA UNet is used (as diffusers' "
                   "single-file loader does).", source)
  if unknown:
    logger.warning("%s: %d key(s) belong to no SD v1.x component and are ignored, e.g. %s",
                   source, len(unknown), sorted(unknown)[:8])
  return out


def _origin(origins: dict | None, component: str, name: str, key: str) -> None:
  if origins is not None:
    origins.setdefault(component, {})[name] = key


def _indices(state: dict, pattern: str) -> list[int]:
  """Sorted distinct integers captured by ``pattern`` (a regex with one group) over the keys."""
  found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
  return sorted(found)


def infer_configs(state: dict, base: dict, source: str) -> dict[str, dict]:
  """Component configs: the fields that shapes reveal from ``state``, the rest from ``base``.

  Args:
    state: an accepted LDM state dict.
    base: {"unet", "vae", "text_encoder", "scheduler": config dict}, e.g. ``SD_V1_CONFIGS``.
    source: the file name for messages.

  Returns:
    {"unet", "vae", "text_encoder", "scheduler": config dict} (new dicts; ``base`` untouched).

  Raises:
    ValueError: naming ``source`` when a needed weight is missing (a damaged or pruned file).
  """
  def shape(key, ndim):
    if key not in state:
      raise ValueError(f"{source} lacks the weight {key!r}, which every SD v1.x checkpoint "
                       f"has; the file is damaged or of another model. {FIX_FILE}")
    check_ndim(state, key, ndim, source)
    return state[key].shape

  u = UNET_PREFIX
  downsamplers = _indices(state, re.escape(u) + r"input_blocks\.(\d+)\.0\.op\.weight")
  inputs = _indices(state, re.escape(u) + r"input_blocks\.(\d+)\.")
  # Each level has `layers` (resnet [+ attention]) entries and, but the last, a downsampler.
  layers = downsamplers[0] - 1 if downsamplers else len(inputs) - 1
  levels = len(downsamplers) + 1
  channels, down_types = [], []
  for level in range(levels):
    first = 1 + level * (layers + 1)
    channels.append(int(shape(f"{u}input_blocks.{first}.0.out_layers.3.weight", 4)[0]))
    attention = f"{u}input_blocks.{first}.1.proj_in.weight" in state
    down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
  up_types = []
  for level in range(levels):
    attention = f"{u}output_blocks.{level * (layers + 1)}.1.proj_in.weight" in state
    up_types.append("CrossAttnUpBlock2D" if attention else "UpBlock2D")
  unet = dict(base["unet"])
  unet.update(
      in_channels=int(shape(f"{u}input_blocks.0.0.weight", 4)[1]),
      out_channels=int(shape(f"{u}out.2.weight", 4)[0]),
      block_out_channels=channels, layers_per_block=layers, down_block_types=down_types,
      up_block_types=up_types, cross_attention_dim=int(
          shape(f"{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2)[1]))

  v = VAE_PREFIX
  vae_levels = _indices(state, re.escape(v) + r"encoder\.down\.(\d+)\.")
  vae = dict(base["vae"])
  vae.update(
      in_channels=int(shape(f"{v}encoder.conv_in.weight", 4)[1]),
      out_channels=int(shape(f"{v}decoder.conv_out.weight", 4)[0]),
      latent_channels=int(shape(f"{v}decoder.conv_in.weight", 4)[1]),
      block_out_channels=[int(shape(f"{v}encoder.down.{i}.block.0.conv1.weight", 4)[0])
                          for i in vae_levels],
      layers_per_block=len(_indices(state, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\.")),
      down_block_types=["DownEncoderBlock2D"] * len(vae_levels),
      up_block_types=["UpDecoderBlock2D"] * len(vae_levels))

  t = TEXT_PREFIX + ("text_model." if has_prefix(state, TEXT_PREFIX + "text_model.") else "")
  vocab, width = shape(f"{t}embeddings.token_embedding.weight", 2)
  text = dict(base["text_encoder"])
  text.update(
      vocab_size=int(vocab), hidden_size=int(width),
      max_position_embeddings=int(shape(f"{t}embeddings.position_embedding.weight", 2)[0]),
      num_hidden_layers=len(_indices(state, re.escape(t) + r"encoder\.layers\.(\d+)\.")),
      intermediate_size=int(shape(f"{t}encoder.layers.0.mlp.fc1.weight", 2)[0]))
  configs = {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": dict(base["scheduler"])}
  _check_fits(configs, source)
  for name in ("unet", "vae", "text_encoder"):
    changed = sorted(k for k in configs[name] if configs[name][k] != base[name].get(k))
    if changed:
      logger.info("%s: %s fields read from the weights' shapes differ from the base config: %s",
                  source, name, {k: configs[name][k] for k in changed})
  return configs


def _check_fits(configs: dict, source: str) -> None:
  """The base config's non-shape fields must suit the widths read from the file."""
  unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
  problems = []
  heads = unet.get("attention_head_dim", 8)  # a head COUNT in SD v1 configs
  heads = heads if isinstance(heads, (list, tuple)) else [heads] * len(unet["block_out_channels"])
  for c, h in zip(unet["block_out_channels"], heads):
    if c % unet.get("norm_num_groups", 32) or c % h:
      problems.append(f"UNet width {c} with norm_num_groups={unet.get('norm_num_groups', 32)}, "
                      f"attention_head_dim={h}")
  for c in vae["block_out_channels"]:
    if c % vae.get("norm_num_groups", 32):
      problems.append(f"VAE width {c} with norm_num_groups={vae.get('norm_num_groups', 32)}")
  if text["hidden_size"] % text["num_attention_heads"]:
    problems.append(f"text width {text['hidden_size']} with "
                    f"num_attention_heads={text['num_attention_heads']}")
  if problems:
    raise ValueError(
        f"{source}: the widths in the file do not fit the base config's head counts / norm "
        f"groups ({'; '.join(dict.fromkeys(problems))}): it is not the standard SD v1.x "
        "architecture. Set "
        "--config.model.config_path to a diffusers-layout folder whose unet/, vae/ and "
        "text_encoder/ config.json describe this model (weights there are not read).")
