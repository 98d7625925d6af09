"""Tiny random SD3 / Flux transformers made by diffusers' PyTorch classes (the oracles of
test_flow_models.py and test_flow_sampler.py), saved as safetensors and converted by
models/dit_convert.py.

Every weight is perturbed after construction so that no layer sits at its initial value (the
RMS norms' ones, for example) and a wrong mapping of any weight shows in the outputs.
"""
import os

import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

from disentangle_jax.models import dit_convert, flow_tiny, tiny

# Two layers: a dual-attention block (SD 3.5 medium) and the last one, whose text stream stops
# (context_pre_only); q/k RMS norm as in SD 3.5.
SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6,
                  dual_attention_layers=(0,), qk_norm="rms_norm")
# 16 packed channels = 4 latent channels x 2 x 2; head width 8 = rotary axes 2 + 2 + 4.
FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                   pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
TEXT_LEN = 5


def _perturbed(model, seed: int):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def torch_sd3(seed: int = 0, **changes):
  """SD3Transformer2DModel(SD3_CONFIG with ``changes``), perturbed."""
  torch.manual_seed(seed)
  return _perturbed(SD3Transformer2DModel(**{**SD3_CONFIG, **changes}), seed)


def torch_flux(seed: int = 0, **changes):
  """FluxTransformer2DModel(FLUX_CONFIG with ``changes``), perturbed."""
  torch.manual_seed(seed)
  return _perturbed(FluxTransformer2DModel(**{**FLUX_CONFIG, **changes}), seed)


def saved_and_converted(model, folder: str, **save_kwargs):
  """Saves ``model`` with save_pretrained (safetensors) into ``folder``; returns (config,
  params) read back by dit_convert.load_transformer."""
  model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
  assert any(f.endswith(".safetensors") for f in os.listdir(folder))
  return dit_convert.load_transformer(folder)


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def flux_ids(height: int, width: int):
  """FluxPipeline's (txt_ids, img_ids) for latents H x W and TEXT_LEN tokens (torch)."""
  ids = torch.zeros(height // 2, width // 2, 3)
  ids[..., 1] += torch.arange(height // 2)[:, None]
  ids[..., 2] += torch.arange(width // 2)[None, :]
  return torch.zeros(TEXT_LEN, 3), ids.reshape(-1, 3)


def torch_pack(latents):
  """FluxPipeline._pack_latents of NCHW torch latents."""
  b, c, h, w = latents.shape
  x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def torch_unpack(tokens, height: int, width: int):
  """FluxPipeline._unpack_latents (latent sizes, not pixel sizes)."""
  b, _, c4 = tokens.shape
  x = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
  return x.reshape(b, c4 // 4, height, width)


def t5_tokenizer():
  """The library's tiny offline T5TokenizerFast (models/flow_tiny.py)."""
  return flow_tiny.t5_tokenizer()


def clip_tokenizer(directory):
  """The project's tiny CLIP tokenizer (models/tiny.py), written to ``directory``."""
  tiny.write_tiny_tokenizer(directory)
  return transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


def torch_t5(vocab_size: int, seed: int = 0):
  """A tiny T5 v1.1 encoder (gated GELU, as SD3's and Flux's T5-XXL), d_model 96."""
  torch.manual_seed(seed)
  return transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab_size, d_model=96, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()


def torch_clip(clip_tok, family: str = "sdxl", index: int = 0, projection: bool = True,
               seed: int = 0):
  """A tiny CLIP text encoder (models/tiny.py's configs: SDXL's two widths, or SD1's)."""
  torch.manual_seed(seed + index)
  cls = (transformers.CLIPTextModelWithProjection if projection
         else transformers.CLIPTextModel)
  return cls(transformers.CLIPTextConfig(**tiny.tiny_text_config(clip_tok, family, index))).eval()


def torch_vae(latent_channels: int = 4, seed: int = 7):
  """A tiny AutoencoderKL of the SD3 / Flux kind (no quant convs, a shift factor)."""
  torch.manual_seed(seed)
  return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                       latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
                       use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                       shift_factor=0.0609).eval()
