"""Tiny random SD 3.5 and Flux.1 models built in code (``model.tiny_family`` "sd3" / "flux"):
the smoke runs and CLI tests of the flow families. No files are read, nothing needs torch.

Shapes follow the families, scaled down: latents H x W x 16 (H = W = ``tiny_latent_size``),
the 16-channel VAE with a shift factor (4 blocks of (8, 8, 16, 16) channels, scale factor 8;
identity quant convs, as SD3's VAE has none), the tiny CLIP tokenizer (models/tiny.py) and a
tiny offline T5 tokenizer (``t5_tokenizer``). SD 3.5: CLIP-L and CLIP-G of SDXL's tiny widths
(32, 48; projections 32 each, pooled 64), T5 of width 96, an MMDiT of two layers (the first
with SD 3.5 medium's dual attention, the last context_pre_only, q/k RMS norm). Flux.1: CLIP-L
(pooled 32), the same T5, one double- and one single-stream block, guidance embedding.
"""
from __future__ import annotations

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import flow_schedule, library_logs, noise
from disentangle_jax.models import dit_convert, flow_bundle, flow_folder, flow_text, flow_vae, tiny
from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit, t5
from disentangle_jax.models.build import init_shapes
from disentangle_jax.models.config import ModelConfig

T5_WIDTH = 96
# SD3 / Flux text lengths of the tiny models: CLIP's 77 and a short T5 (the pipelines' 256 / 512
# cost nothing in meaning here and dominate a tiny transformer's time).
T5_LENGTH = 16
_T5_WORDS = ["a", "photo", "of", "person", "smiling", "lake"]


def t5_tokenizer():
  """A tiny T5TokenizerFast built offline (Unigram, "</s>" appended as T5's)."""
  vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
           + [("\u2581" + w, -1.0) for w in _T5_WORDS]
           + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,"] + [("\u2581", -2.0)])
  tok = Tokenizer(models.Unigram(vocab, unk_id=2))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", extra_ids=0)


def t5_config(vocab_size: int) -> dict:
  """The tiny T5 v1.1 encoder's config (gated GELU, as SD3's and Flux's T5-XXL)."""
  return dict(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=40, num_layers=2,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              feed_forward_proj="gated-gelu")


def transformer_config(family: str, latent_size: int, pooled: int):
  """The tiny MMDiT / Flux config (module docstring)."""
  if family == "sd3":
    return mmdit.MMDiTConfig.from_diffusers_config(dict(
        sample_size=latent_size, patch_size=2, in_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16, pooled_projection_dim=pooled, out_channels=16,
        pos_embed_max_size=max(latent_size // 2, 4), dual_attention_layers=(0,),
        qk_norm="rms_norm"))
  # 64 packed channels = 16 latent channels x 2 x 2; head width 8 = rotary axes 2 + 2 + 4.
  return flux_lib.FluxConfig.from_diffusers_config(dict(
      patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=pooled,
      guidance_embeds=True, axes_dims_rope=(2, 2, 4)))


def vae_config(latent_size: int) -> dict:
  cfg = tiny.tiny_vae_config(latent_size * 8)
  cfg.update(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False)
  return cfg


def _t5_shapes(encoder):
  ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  return jax.eval_shape(lambda i: encoder.init(jax.random.key(0), i), ids)["params"]


def _identity_quant_convs(vae_params: dict) -> dict:
  """The quant convs as identities (SD3 / Flux VAEs have none: flow_vae.vae_params)."""
  out = dict(vae_params)
  for name in ("quant_conv", "post_quant_conv"):
    kernel = np.asarray(out[name]["kernel"])
    eye = np.eye(kernel.shape[-2], kernel.shape[-1], dtype=kernel.dtype)
    out[name] = {"kernel": eye.reshape(kernel.shape), "bias": np.zeros_like(out[name]["bias"])}
  return out


@library_logs.quietly
def build_tiny_flow(config: ModelConfig = ModelConfig(tiny_family="sd3")):
  """The tiny random model of family ``config.tiny_family`` ("sd3" | "flux"), deterministic in
  ``config.tiny_seed``, as a StableDiffusion bundle (flow_bundle.py)."""
  family = config.tiny_family
  if family not in flow_bundle.FAMILIES:
    raise ValueError(f"model.tiny_family={family!r} is not a flow family; use 'sd3' or 'flux'.")
  size = config.tiny_latent_size
  clip_tok = tiny._tiny_tokenizer()  # pylint: disable=protected-access
  t5_tok = t5_tokenizer()
  tokenizers, modules = {"tokenizer": clip_tok}, {}
  if family == "sd3":
    tokenizers.update(tokenizer_2=clip_tok, tokenizer_3=t5_tok)
    modules["text_encoder"] = flow_text.build_clip(tiny.tiny_text_config(clip_tok, "sdxl", 0),
                                                   True, config)
    modules["text_encoder_2"] = flow_text.build_clip(tiny.tiny_text_config(clip_tok, "sdxl", 1),
                                                     True, config)
    pooled = 2 * tiny.tiny_text_config(clip_tok, "sdxl", 0)["projection_dim"]
    t5_name = "text_encoder_3"
  else:
    tokenizers.update(tokenizer_2=t5_tok)
    clip_cfg = tiny.tiny_text_config(clip_tok, "sd1", 0)
    modules["text_encoder"] = flow_text.build_clip(clip_cfg, False, config)
    pooled = clip_cfg["hidden_size"]
    t5_name = "text_encoder_2"
  modules[t5_name] = flow_text.build_t5(t5_config(len(t5_tok)), config)
  vae_cfg = vae_config(size)
  modules["vae"] = flow_vae.build_vae(vae_cfg, config)
  tcfg = transformer_config(family, size, pooled)
  trees = {"transformer": _transformer_shapes(family, tcfg), "vae": init_shapes(modules["vae"]),
           t5_name: _t5_shapes(modules[t5_name])}
  for name in ("text_encoder", "text_encoder_2"):
    if name in modules and name != t5_name:
      trees[name] = modules[name].params_shape_tree
  params = {name: noise.random_params(tree, [config.tiny_seed, i])
            for i, (name, tree) in enumerate(sorted(trees.items()))}
  params["vae"] = _identity_quant_convs(params["vae"])
  schedule = flow_schedule.FlowScheduleConfig(
      shift=3.0, use_dynamic_shifting=family == "flux")  # SD 3.5's / Flux.1's scheduler configs
  flow = flow_folder.FlowModel(family, f"tiny:{family}", tcfg, None, schedule,
                               vae_cfg["scaling_factor"], vae_cfg["shift_factor"], modules,
                               tokenizers, t5_length=T5_LENGTH)
  return flow_bundle.bundle(flow, params, config, size)


def _transformer_shapes(family: str, tcfg):
  return dit_convert.sd3_shapes(tcfg) if family == "sd3" else dit_convert.flux_shapes(tcfg)
