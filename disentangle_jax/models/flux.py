"""Flux.1's transformer (diffusers' ``FluxTransformer2DModel``) as a Flax module.

Pure Flax, no diffusers import; weights are an explicit tree (``dit_convert.flux_params``).
Double-stream blocks (image and text tokens with their own weights, one joint attention), then
single-stream blocks (one sequence, attention and MLP in parallel), rotary positions over three
axes (text tokens at (0, 0, 0), image token (row, col) at (0, row, col)), and Flux.1-dev's
distilled-guidance embedding.

    v = Flux(config)(params, x [B,S,C_in], tokens [B,L,J], pooled [B,P], t [B], guidance [B],
                     rope (cos, sin) [L + S, K])  -> [B, S, C_out]

``x`` is the packed latent sequence (``pack``: 2 x 2 latent patches, S = H W / 4, C_in = 4 C);
``t`` and ``guidance`` are what FluxPipeline passes (timestep / 1000 and the guidance scale; the
model multiplies both by 1000); ``rope`` comes from ``rope_for(L, H, W)`` on the host (positions
depend only on shapes, so they are constants of the program). ``velocity`` wraps it all for
NHWC latents.

Run options are module fields: ``remat`` (each block through ``dit_layers.run_block``: its
backward recomputes it), ``attention`` ("dot_product" | "reference" | "chunked"), ``dtype``
(compute dtype; weights stay float32).

Shapes: B batch, H W C latent (NHWC, C = 16), S image tokens, L text tokens, J
joint_attention_dim, P pooled width, D model width, K head width.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from disentangle_jax.models import dit_layers as L
from disentangle_jax.models import mmdit

ROPE_THETA = 10000  # diffusers' FluxPosEmbed(theta=10000)
MLP_RATIO = 4  # FluxSingleTransformerBlock's mlp_ratio


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """The fields of a FluxTransformer2DModel config.json (defaults: Flux.1-schnell/dev sizes)."""

  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple = (16, 56, 56)

  def __post_init__(self):
    object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
    if self.patch_size != 1:
      raise ValueError(f"transformer patch_size={self.patch_size} is not supported: Flux packs "
                       "2 x 2 latent patches in the pipeline and uses patch_size 1.")
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"transformer axes_dims_rope={self.axes_dims_rope} sums to "
                       f"{sum(self.axes_dims_rope)}, not attention_head_dim="
                       f"{self.attention_head_dim}: the rotary tables must cover a head.")
    if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(f"transformer axes_dims_rope={self.axes_dims_rope} must be three even "
                       "widths (text index, row, column).")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out(self) -> int:
    return self.out_channels or self.in_channels

  @classmethod
  def from_diffusers_config(cls, config: dict) -> "FluxConfig":
    """From transformer/config.json; unknown architecture keys are refused by name."""
    return cls(**mmdit._known_fields(cls, config, mmdit._IGNORED_KEYS))  # pylint: disable=protected-access


def pack(x):
  """FluxPipeline._pack_latents for NHWC: [B, H, W, C] -> [B, H W / 4, 4 C] (channel c*4 + 2 dy
  + dx of token (row, col) is latent (2 row + dy, 2 col + dx, c))."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, height: int, width: int):
  """The inverse of ``pack``: [B, H W / 4, 4 C] -> [B, H, W, C]."""
  b, _, c4 = tokens.shape
  x = tokens.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, height, width, c4 // 4)


def image_ids(height: int, width: int) -> np.ndarray:
  """FluxPipeline._prepare_latent_image_ids for latents H x W: [H W / 4, 3] (0, row, col)."""
  rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
  ids = np.zeros((height // 2, width // 2, 3), np.float32)
  ids[..., 1], ids[..., 2] = rows, cols
  return ids.reshape(-1, 3)


def rope_for(config: FluxConfig, text_len: int, height: int, width: int):
  """(cos, sin) [L + S, K] for L text tokens (ids 0) then the H x W latent's tokens."""
  ids = np.concatenate([np.zeros((text_len, 3), np.float32), image_ids(height, width)])
  return L.rope_tables(ids, config.axes_dims_rope, ROPE_THETA)


class FluxAttention(nn.Module):
  """diffusers' FluxAttention + FluxAttnProcessor: q/k RMS norm, rotary positions, text tokens
  first. ``joint``: a double-stream block's (added text projections, ``to_add_out``);
  otherwise a single-stream block's (no output projection: ``pre_only``)."""

  num_heads: int
  head_dim: int
  joint: bool = False
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  def _qkv(self, x, names):
    d = self.num_heads * self.head_dim
    q, k, v = (L.heads(L.dense(d, n, self.dtype)(x), self.num_heads) for n in names[:3])
    q = L.RMSNorm(dtype=self.dtype, name=names[3])(q)
    k = L.RMSNorm(dtype=self.dtype, name=names[4])(k)
    return q, k, v

  @nn.compact
  def __call__(self, x, rope, context=None):
    d = self.num_heads * self.head_dim
    q, k, v = self._qkv(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
    if self.joint:
      cq, ck, cv = self._qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj",
                                       "norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    cos, sin = rope
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    out = L.attention(q, k, v, self.attention)
    out = out.reshape(out.shape[:2] + (d,))
    if not self.joint:
      return out
    n_text = context.shape[1]
    return (L.dense(x.shape[-1], "to_out_0", self.dtype)(out[:, n_text:]),
            L.dense(context.shape[-1], "to_add_out", self.dtype)(out[:, :n_text]))


class DoubleBlock(nn.Module):
  """diffusers' FluxTransformerBlock (AdaLN-zero on both streams, one joint attention)."""

  config: FluxConfig
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb, cos, sin):
    cfg = self.config
    d = cfg.inner_dim
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = L.AdaNormZero(
        d, 6, self.dtype, name="norm1")(temb)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = L.AdaNormZero(
        d, 6, self.dtype, name="norm1_context")(temb)
    attn_out, context_out = FluxAttention(
        cfg.num_attention_heads, cfg.attention_head_dim, True, self.attention, self.dtype,
        name="attn")(L.modulate(x, shift_msa, scale_msa), (cos, sin),
                     L.modulate(context, c_shift_msa, c_scale_msa))
    x = x + gate_msa[:, None] * attn_out
    x = x + gate_mlp[:, None] * L.FeedForward(d, self.dtype, name="ff")(
        L.modulate(x, shift_mlp, scale_mlp))
    context = context + c_gate_msa[:, None] * context_out
    context = context + c_gate_mlp[:, None] * L.FeedForward(d, self.dtype, name="ff_context")(
        L.modulate(context, c_shift_mlp, c_scale_mlp))
    return x, context


class SingleBlock(nn.Module):
  """diffusers' FluxSingleTransformerBlock on the joint sequence [B, L + S, D]."""

  config: FluxConfig
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, temb, cos, sin):
    cfg = self.config
    d = cfg.inner_dim
    shift, scale, gate = L.AdaNormZero(d, 3, self.dtype, name="norm")(temb)
    norm_h = L.modulate(h, shift, scale)
    mlp = nn.gelu(L.dense(MLP_RATIO * d, "proj_mlp", self.dtype)(norm_h), approximate=True)
    attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, False, self.attention,
                         self.dtype, name="attn")(norm_h, (cos, sin))
    out = L.dense(d, "proj_out", self.dtype)(jnp.concatenate([attn, mlp], axis=-1))
    return h + gate[:, None] * out


class Flux(nn.Module):
  """FluxTransformer2DModel on packed latents (module docstring)."""

  config: FluxConfig
  remat: bool = False
  attention: str = "dot_product"
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, tokens, pooled, t, guidance, rope):
    cfg = self.config
    L.check_attention(self.attention)
    if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"x has shape {tuple(x.shape)}; expected packed latents [B, S, "
                       f"{cfg.in_channels}] (flux.pack).")
    cos, sin = rope
    if cos.shape[0] != x.shape[1] + tokens.shape[1]:
      raise ValueError(f"rope has {cos.shape[0]} positions for {tokens.shape[1]} text and "
                       f"{x.shape[1]} image tokens: build it with rope_for(...).")
    h = L.dense(cfg.inner_dim, "x_embedder", self.dtype)(x.astype(self.dtype))
    scale = lambda v: None if v is None else jnp.asarray(v, self.dtype) * 1000  # pylint: disable=g-long-lambda
    temb = L.TimeTextEmbed(cfg.inner_dim, cfg.guidance_embeds, self.dtype,
                           name="time_text_embed")(scale(t), pooled.astype(self.dtype),
                                                   scale(guidance))
    context = L.dense(cfg.inner_dim, "context_embedder", self.dtype)(tokens.astype(self.dtype))
    for i in range(cfg.num_layers):
      h, context = L.run_block(
          DoubleBlock(cfg, self.attention, self.dtype, name=f"transformer_blocks_{i}"),
          self.remat, h, context, temb, cos, sin)
    n_text = context.shape[1]
    # The single-stream blocks see [text, image]; concatenated once (diffusers concatenates and
    # splits in every block: the same numbers).
    joint = jnp.concatenate([context, h], axis=1)
    for i in range(cfg.num_single_layers):
      joint = L.run_block(
          SingleBlock(cfg, self.attention, self.dtype, name=f"single_transformer_blocks_{i}"),
          self.remat, joint, temb, cos, sin)
    h = joint[:, n_text:]
    h = L.modulate_continuous(h, L.AdaNormZero(cfg.inner_dim, 2, self.dtype, name="norm_out")(temb))
    return L.dense(cfg.patch_size**2 * cfg.out, "proj_out", self.dtype)(h)


def velocity(module: Flux, params, x, tokens, pooled, t, guidance=None):
  """The Flux velocity for NHWC latents: x [B, H, W, C] -> [B, H, W, C] (packs, builds the
  rotary tables for the static shapes, unpacks). ``t`` [B] or []: the scheduler timestep
  (sigma * 1000) divided by 1000 as FluxPipeline does; ``guidance`` [B] or [] (guidance-
  distilled models only)."""
  b, hh, ww, _ = x.shape
  if hh % 2 or ww % 2:
    raise ValueError(f"latents have shape {tuple(x.shape)}; Flux packs 2 x 2 patches, so H and "
                     "W must be even.")
  rope = rope_for(module.config, tokens.shape[1], hh, ww)
  t = jnp.broadcast_to(t, (b,))
  if guidance is not None:
    guidance = jnp.broadcast_to(guidance, (b,))
  out = module.apply({"params": params}, pack(x), tokens, pooled, t, guidance, rope)
  return unpack(out, hh, ww)
