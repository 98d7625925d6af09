"""Stable Diffusion 3 / 3.5's MMDiT (diffusers' ``SD3Transformer2DModel``) as a Flax module.

Pure Flax, no diffusers import; weights are an explicit tree (``dit_convert.sd3_params`` reads
a diffusers checkpoint into it, ``MMDiT.init`` makes random ones). Covers SD 3.0 (no q/k norm),
SD 3.5 large (``qk_norm="rms_norm"``) and SD 3.5 medium (``dual_attention_layers``: a second,
image-only self-attention in those blocks, modulated by three more AdaLN chunks).

    v = MMDiT(config)(params, x [B,H,W,C], tokens [B,L,J], pooled [B,P], t [B])  -> [B,H,W,C]

``t`` is the scheduler's timestep (sigma * 1000, a float); the output is the flow velocity
(noise - data) that FlowMatchEulerDiscreteScheduler steps with. Latents are NHWC (the library's
layout; diffusers' are NCHW); tokens are the joint T5 + CLIP embeddings, pooled the two CLIP
pooled projections concatenated.

Run options are module fields: ``remat`` (each block through ``dit_layers.run_block``: the
backward recomputes a block from its inputs instead of keeping its activations), ``attention``
("dot_product" | "reference" | "chunked", dit_layers.py), ``dtype`` (compute dtype, e.g.
bfloat16; weights stay float32).

Shapes: B batch, H W C latent, L text tokens, J joint_attention_dim, P pooled width, D model
width, S image tokens (H W / patch^2).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from disentangle_jax.models import dit_layers as L

QK_NORMS = (None, "rms_norm")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """The architecture fields of an SD3Transformer2DModel config.json (defaults: SD 3.0 medium).

  A static, hashable module field: every field changes the parameter tree or the program.
  """

  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple = ()  # SD 3.5 medium: (0, ..., 12)
  qk_norm: Any = None  # None (SD 3.0) | "rms_norm" (SD 3.5)

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"transformer qk_norm={self.qk_norm!r} is not supported; use one of "
                       f"{QK_NORMS} (SD 3.5 uses 'rms_norm').")
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(
          f"transformer caption_projection_dim={self.caption_projection_dim} differs from the "
          f"model width num_attention_heads * attention_head_dim = {self.inner_dim}: the joint "
          "attention needs them equal (every released SD3 has them equal).")
    if not self.pos_embed_max_size:
      raise ValueError("transformer pos_embed_max_size is missing: SD3 checkpoints carry a "
                       "cropped position table of that size; set it (96 or 192).")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"transformer dual_attention_layers {bad} are outside the "
                       f"{self.num_layers} layers.")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @classmethod
  def from_diffusers_config(cls, config: dict) -> "MMDiTConfig":
    """From transformer/config.json; unknown architecture keys are refused by name."""
    return cls(**_known_fields(cls, config, _IGNORED_KEYS))


# config.json keys that do not change what the transformer computes.
_IGNORED_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _known_fields(cls, config: dict, ignored) -> dict:
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(k for k in config if k not in fields and k not in ignored)
  if unknown:
    raise ValueError(f"transformer config has option(s) {unknown} that {cls.__name__} does not "
                     "implement; remove them only if they are at their no-op value.")
  return {k: v for k, v in config.items() if k in fields}


class PatchProj(nn.Module):
  """PatchEmbed's patch x patch stride-patch convolution as a reshape and one matmul (the same
  numbers; a convolution's input gradient inside a scan is slow on XLA:CPU). Weights in Flax
  conv layout: kernel [p, p, C, D], bias [D]."""

  patch: int
  features: int
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    p = self.patch
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features),
                        jnp.float32).astype(self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    patches = x.reshape(b, hh // p, p, ww // p, p, c)
    out = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel)
    return (out + bias.astype(self.dtype)).reshape(b, -1, self.features)


class PatchEmbed(nn.Module):
  """diffusers' PatchEmbed with SD3 cropping: [B, H, W, C] -> [B, S, D] plus the centre crop of
  the [1, M*M, D] position table (a weight of the checkpoint)."""

  config: MMDiTConfig
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    p, m, d = cfg.patch_size, cfg.pos_embed_max_size, cfg.inner_dim
    h, w = x.shape[1] // p, x.shape[2] // p
    if h > m or w > m:
      raise ValueError(f"latents of {x.shape[1]} x {x.shape[2]} make a {h} x {w} patch grid, "
                       f"larger than pos_embed_max_size={m}: use a smaller image.")
    table = self.param(
        "pos_embed",
        lambda _: jnp.asarray(L.sincos_pos_embed(d, m, cfg.sample_size // p)), )
    top, left = (m - h) // 2, (m - w) // 2
    crop = table.reshape(1, m, m, d)[:, top:top + h, left:left + w].reshape(1, h * w, d)
    tokens = PatchProj(p, d, self.dtype, name="proj")(x)
    return (tokens.astype(jnp.promote_types(tokens.dtype, jnp.float32)) + crop).astype(self.dtype)


class JointAttention(nn.Module):
  """diffusers' Attention + JointAttnProcessor2_0: image tokens and (optionally) text tokens in
  one softmax, split again after it.

  ``context_pre_only``: None = no text stream (SD 3.5's attn2); False = text in and out;
  True = text keys/values only (the last block: no ``to_add_out``).
  """

  num_heads: int
  head_dim: int
  qk_norm: Any = None
  context_pre_only: Any = None
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  def _qkv(self, x, prefix: str, out_names):
    d = self.num_heads * self.head_dim
    q, k, v = (L.heads(L.dense(d, f"{prefix}{n}", self.dtype)(x), self.num_heads)
               for n in out_names[:3])
    if self.qk_norm == "rms_norm":
      q = L.RMSNorm(dtype=self.dtype, name=out_names[3])(q)
      k = L.RMSNorm(dtype=self.dtype, name=out_names[4])(k)
    return q, k, v

  @nn.compact
  def __call__(self, x, context=None):
    d = self.num_heads * self.head_dim
    q, k, v = self._qkv(x, "", ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
    s = x.shape[1]
    if self.context_pre_only is not None:
      cq, ck, cv = self._qkv(context, "",
                             ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q",
                              "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
    out = L.attention(q, k, v, self.attention)
    out = out.reshape(out.shape[:2] + (d,))
    image = L.dense(x.shape[-1], "to_out_0", self.dtype)(out[:, :s])
    if self.context_pre_only is None or self.context_pre_only:
      return image, None
    return image, L.dense(context.shape[-1], "to_add_out", self.dtype)(out[:, s:])


class JointBlock(nn.Module):
  """diffusers' JointTransformerBlock (use_dual_attention for SD 3.5 medium's first layers)."""

  config: MMDiTConfig
  context_pre_only: bool = False
  dual: bool = False
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    cfg = self.config
    d = cfg.inner_dim
    attn = lambda pre_only, name: JointAttention(  # pylint: disable=g-long-lambda
        cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm, pre_only, self.attention,
        self.dtype, name=name)
    if self.dual:  # SD35AdaLayerNormZeroX: the second attention has its own shift/scale/gate.
      (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
       gate_msa2) = L.AdaNormZero(d, 9, self.dtype, name="norm1")(temb)
      normed = L.layer_norm(x)
      norm_x = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
      norm_x2 = normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
    else:
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.AdaNormZero(
          d, 6, self.dtype, name="norm1")(temb)
      norm_x = L.modulate(x, shift_msa, scale_msa)
    if self.context_pre_only:
      norm_c = L.modulate_continuous(
          context, L.AdaNormZero(d, 2, self.dtype, name="norm1_context")(temb))
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
          L.AdaNormZero(d, 6, self.dtype, name="norm1_context")(temb))
      norm_c = L.modulate(context, c_shift_msa, c_scale_msa)

    attn_out, context_out = attn(self.context_pre_only, "attn")(norm_x, norm_c)
    x = x + gate_msa[:, None] * attn_out
    if self.dual:
      x = x + gate_msa2[:, None] * attn(None, "attn2")(norm_x2)[0]
    x = x + gate_mlp[:, None] * L.FeedForward(d, self.dtype, name="ff")(
        L.modulate(x, shift_mlp, scale_mlp))
    if self.context_pre_only:
      return x, None
    context = context + c_gate_msa[:, None] * context_out
    context = context + c_gate_mlp[:, None] * L.FeedForward(d, self.dtype, name="ff_context")(
        L.modulate(context, c_shift_mlp, c_scale_mlp))
    return x, context


class MMDiT(nn.Module):
  """SD3Transformer2DModel: (x [B,H,W,C], tokens [B,L,J], pooled [B,P], t [B]) -> v [B,H,W,C]."""

  config: MMDiTConfig
  remat: bool = False
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, tokens, pooled, t):
    cfg = self.config
    L.check_attention(self.attention)
    b, hh, ww, c = x.shape
    p = cfg.patch_size
    if c != cfg.in_channels or hh % p or ww % p:
      raise ValueError(f"latents have shape {tuple(x.shape)}; expected [B, H, W, "
                       f"{cfg.in_channels}] with H and W multiples of patch_size={p}.")
    h = PatchEmbed(cfg, self.dtype, name="pos_embed")(x.astype(self.dtype))
    temb = L.TimeTextEmbed(cfg.inner_dim, dtype=self.dtype, name="time_text_embed")(
        t, pooled.astype(self.dtype))
    context = L.dense(cfg.caption_projection_dim, "context_embedder", self.dtype)(
        tokens.astype(self.dtype))
    for i in range(cfg.num_layers):
      block = JointBlock(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers,
                         self.attention, self.dtype, name=f"transformer_blocks_{i}")
      h, context = L.run_block(block, self.remat, h, context, temb)
    h = L.modulate_continuous(h, L.AdaNormZero(cfg.inner_dim, 2, self.dtype, name="norm_out")(temb))
    h = L.dense(p * p * cfg.out_channels, "proj_out", self.dtype)(h)
    # unpatchify: token (row, col) holds a p x p x C_out patch, channels last.
    h = h.reshape(b, hh // p, ww // p, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, hh, ww, cfg.out_channels)
