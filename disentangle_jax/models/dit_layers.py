"""Layers shared by the flow-matching transformers (mmdit.py: SD 3.x, flux.py: Flux.1).

Pure Flax (no diffusers import): each layer computes what the diffusers 0.39 PyTorch layer of
the same name computes, and its parameters sit at the path diffusers' state-dict key spells
(``ff.net.0.proj.weight`` -> ``ff/net_0/proj/kernel``: a list index joins the name before it;
dit_convert.py relies on this), so a converted tree fits the module without a key table.

Run options are plain fields, visible at construction:
  dtype      the compute dtype (parameters are cast to it; norms and softmax run in at least
             float32, as torch's own LayerNorm / RMSNorm / SDPA kernels do for bf16 inputs).
  attention  "dot_product" (``jax.nn.dot_product_attention``: XLA's kernel on CPU, a fused one
             on GPUs for bf16), "reference" (einsum, softmax, einsum; every step visible) or
             "chunked" (``chunked_attention``: the reference math over blocks of QUERY_CHUNK
             queries, forward and backward, so no [S, S] score matrix is ever held whole; the
             kind that bounds memory where no fused kernel exists, e.g. XLA:CPU).

Block remat (``run_block``): the MMDiT / Flux blocks run under recompute.recompute_in_backward
when the model's ``remat`` is on: only each block's inputs are kept for the backward, which
recomputes the block (plain ``nn.remat`` is undone by XLA:CPU's CSE; recompute.py).

Shapes: B batch, S sequence (image tokens, text tokens or both), D model width, N heads,
K head width (D = N K), P pooled-projection width.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import recompute

ATTENTIONS = ("dot_product", "reference", "chunked")
# Queries per block of "chunked" attention: one block's scores are [B, N, QUERY_CHUNK, Sk]
# (SD 3.5 medium at 1024 px under CFG: 2 x 24 x 512 x 4429 float32 = 0.4 GiB, against 3.5 GiB
# for the whole [S, S] matrix).
QUERY_CHUNK = 512

Dtype = Any

# Normalisation epsilons of the MMDiT / Flux blocks (diffusers hard-codes them, not configs).
NORM_EPS = 1e-6
# Sinusoidal timestep embedding width and frequency base (diffusers' Timesteps(256, ...)).
TIME_CHANNELS = 256
MAX_PERIOD = 10000


def check_attention(attention: str) -> None:
  if attention not in ATTENTIONS:
    raise ValueError(f"model.attention={attention!r} is unknown; use one of {ATTENTIONS}.")


def _stat_dtype(x):
  """float32 for half types, else x's own (float64 stays float64 for gradient checks)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def layer_norm(x, eps: float = NORM_EPS):
  """LayerNorm over the last axis without affine parameters (biased variance, as torch)."""
  h = x.astype(_stat_dtype(x))
  mean = h.mean(-1, keepdims=True)
  var = jnp.square(h - mean).mean(-1, keepdims=True)
  return ((h - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """diffusers' RMSNorm / torch.nn.RMSNorm with a weight (``scale``): x / rms(x) * scale."""

  eps: float = NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    h = x.astype(_stat_dtype(x))
    h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
    return (h * scale.astype(h.dtype)).astype(self.dtype)


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


def attention(q, k, v, kind: str):
  """Softmax attention, q [B, Sq, N, K], k v [B, Sk, N, K] -> [B, Sq, N, K], scale K^-1/2."""
  check_attention(kind)
  if kind == "chunked":
    return chunked_attention(q, k, v)
  # jax.nn.dot_product_attention forms its logits in float32 even for float64 inputs, which
  # would spoil float64 gradient checks: float64 always takes the einsum path.
  if kind == "dot_product" and q.dtype != jnp.float64:
    return jax.nn.dot_product_attention(q, k, v)
  return _softmax_attention(q, k, v)


def _softmax_attention(q, k, v):
  """The reference: einsum, softmax in at least float32, einsum (float64 stays float64)."""
  scores = jnp.einsum("bqnk,bsnk->bnqs", q, k) / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(scores.astype(_stat_dtype(scores)), axis=-1).astype(v.dtype)
  return jnp.einsum("bnqs,bsnk->bqnk", weights, v)


def chunked_attention(q, k, v, chunk: int = QUERY_CHUNK):
  """``attention``'s "reference" math over blocks of ``chunk`` queries: the same numbers (each
  query row's softmax is whole), but only one block's [B, N, chunk, Sk] scores live at a time,
  in the forward (``lax.map`` over the blocks) and in the backward (a ``custom_vjp`` that keeps
  q, k, v and recomputes each block's scores inside a scan whose carry sums dk and dv).

  q [B, Sq, N, K], k v [B, Sk, N, K] -> [B, Sq, N, K]; Sq is padded to a multiple of the chunk
  (the padded rows are dropped, their cotangent is zero)."""
  return _chunked(q, k, v, min(chunk, q.shape[1]))


def _split(x, chunk: int):
  """[B, S, N, K] -> [S' / chunk, B, chunk, N, K], S zero-padded to S' (a multiple of chunk)."""
  n = -(-x.shape[1] // chunk)
  x = jnp.pad(x, ((0, 0), (0, n * chunk - x.shape[1]), (0, 0), (0, 0)))
  return x.reshape((x.shape[0], n, chunk) + x.shape[2:]).swapaxes(0, 1)


def _merge(x, length: int):
  """The inverse of ``_split``: [S' / chunk, B, chunk, N, K] -> [B, length, N, K]."""
  x = x.swapaxes(0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q, k, v, chunk: int):
  return _merge(lax.map(lambda qc: _softmax_attention(qc, k, v), _split(q, chunk)), q.shape[1])


def _chunked_fwd(q, k, v, chunk: int):
  return _chunked(q, k, v, chunk), (q, k, v)


def _chunked_bwd(chunk: int, residuals, g):
  q, k, v = residuals
  acc = _stat_dtype(k)  # dk, dv summed over the blocks in at least float32

  def block(carry, xs):
    qc, gc = xs
    _, vjp = jax.vjp(_softmax_attention, qc, k, v)
    dq, dk, dv = vjp(gc)
    return (carry[0] + dk.astype(acc), carry[1] + dv.astype(acc)), dq

  zeros = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
  (dk, dv), dq = lax.scan(block, zeros, (_split(q, chunk), _split(g.astype(q.dtype), chunk)))
  return _merge(dq, q.shape[1]), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def run_block(block: nn.Module, remat: bool, *args):
  """``block(*args)`` for a child block the caller has just constructed; with ``remat`` its
  backward recomputes its forward (recompute.recompute_in_backward): only the block's array
  inputs are saved, not its activations.

  The block runs as a pure function of (its variables, its array arguments), weights not tied
  to the cotangent; other arguments (host numpy constants such as Flux's rotary tables) are
  constants of the recomputation. At init it is a plain call (no variables exist yet)."""
  if not remat or block.is_initializing():
    return block(*args)
  arrays, merge = recompute.split_arrays(args)

  def pure(variables, arrays):
    return block.clone(parent=None).apply(variables, *merge(arrays))

  return recompute.recompute_in_backward(pure, skip_tie=(0,))(block.variables, arrays)


def heads(x, num_heads: int):
  """[B, S, N K] -> [B, S, N, K]."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def timestep_embedding(t, dtype, channels: int = TIME_CHANNELS):
  """diffusers' Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0): [N] -> [N, C].

  cos first, then sin; computed in float32 (float64 when ``dtype`` is), as torch does.
  """
  calc = jnp.promote_types(dtype, jnp.float32)
  half = channels // 2
  exponent = -math.log(MAX_PERIOD) * jnp.arange(half, dtype=calc) / half
  emb = jnp.asarray(t, calc)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.cos(emb), jnp.sin(emb)], axis=-1).astype(dtype)


class MLPEmbedder(nn.Module):
  """linear_1, SiLU, linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection(silu)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(self.features, "linear_1", self.dtype)(x)
    return dense(self.features, "linear_2", self.dtype)(nn.silu(x))


class TimeTextEmbed(nn.Module):
  """diffusers' CombinedTimestep(Guidance)TextProjEmbeddings: t [N], pooled [N, P] -> [N, D].

  With ``guidance`` (Flux.1-dev's distilled guidance, [N]) a second timestep MLP embeds it.
  """

  features: int
  guidance_embeds: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t, pooled, guidance=None):
    emb = MLPEmbedder(self.features, self.dtype, name="timestep_embedder")(
        timestep_embedding(t, self.dtype))
    if self.guidance_embeds:
      if guidance is None:
        raise ValueError("this transformer has a guidance embedding (guidance_embeds=True): "
                         "pass guidance [N] (3.5 for Flux.1-dev).")
      emb = emb + MLPEmbedder(self.features, self.dtype, name="guidance_embedder")(
          timestep_embedding(guidance, self.dtype))
    return emb + MLPEmbedder(self.features, self.dtype, name="text_embedder")(pooled)


class GeluProj(nn.Module):
  """FeedForward's first layer (diffusers' GELU(approximate="tanh")): proj, then tanh-GELU."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(dense(self.features, "proj", self.dtype)(x), approximate=True)


class FeedForward(nn.Module):
  """diffusers' FeedForward(dim, activation_fn="gelu-approximate"): D -> 4D -> D."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GeluProj(4 * self.features, self.dtype, name="net_0")(x)
    return dense(self.features, "net_2", self.dtype)(h)


class AdaNormZero(nn.Module):
  """``linear(silu(temb))`` split into ``chunks`` modulation vectors [B, D] (AdaLayerNormZero:
  6, SD35AdaLayerNormZeroX: 9, AdaLayerNormZeroSingle: 3, AdaLayerNormContinuous: 2), in
  diffusers' chunk order."""

  features: int
  chunks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb):
    emb = dense(self.chunks * self.features, "linear", self.dtype)(nn.silu(temb))
    return jnp.split(emb, self.chunks, axis=-1)


def modulate(x, shift, scale):
  """layer_norm(x) * (1 + scale) + shift, with shift / scale [B, D] broadcast over S."""
  return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def modulate_continuous(x, chunks):
  """diffusers' AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6) given its two
  chunks (``AdaNormZero(D, 2)``): note the (scale, shift) order, the reverse of the
  AdaLayerNormZero layers'."""
  scale, shift = chunks
  return modulate(x, shift, scale)


def apply_rope(x, cos, sin):
  """diffusers' apply_rotary_emb (use_real, unbind -1): x [B, S, N, K], cos sin [S, K].

  Channels pair as (2j, 2j + 1); computed in at least float32, cast back to x's dtype.
  """
  calc = _stat_dtype(x)
  h = x.astype(calc)
  pairs = h.reshape(h.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(h.shape)
  cos = jnp.asarray(cos, calc)[None, :, None, :]
  sin = jnp.asarray(sin, calc)[None, :, None, :]
  return (h * cos + rotated * sin).astype(x.dtype)


def rope_tables(ids: np.ndarray, axes_dims, theta: float = 10000.0):
  """Flux's 3-axis rotary tables (diffusers' FluxPosEmbed): ids [S, A] -> (cos, sin) [S, K].

  Host numpy: positions are float32 (ids.float()), frequencies and angles float64, the tables
  cast to float32, exactly as diffusers on CPU. K = sum(axes_dims); each axis' frequencies are
  repeated pairwise (repeat_interleave_real).
  """
  ids = np.asarray(ids)
  if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
    raise ValueError(f"ids has shape {ids.shape}; expected [S, {len(axes_dims)}] (one column "
                     f"per rotary axis of axes_dims_rope={tuple(axes_dims)}).")
  pos = ids.astype(np.float32).astype(np.float64)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.outer(pos[:, axis], freqs)
    cos.append(np.repeat(np.cos(angles), 2, axis=1).astype(np.float32))
    sin.append(np.repeat(np.sin(angles), 2, axis=1).astype(np.float32))
  return np.concatenate(cos, axis=1), np.concatenate(sin, axis=1)


def sincos_pos_embed(dim: int, grid_size: int, base_size: int) -> np.ndarray:
  """SD3's 2-D sinusoidal table (diffusers' get_2d_sincos_pos_embed): [1, G*G, D] float32.

  Only for freshly initialised weights: checkpoints carry the table (``pos_embed.pos_embed``).
  The first half of the channels encodes the column, the second the row, each as (sin, cos).
  """
  if dim % 4:
    raise ValueError(f"the model width {dim} must be divisible by 4 for SD3's positions.")
  coords = (np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size))
  col, row = np.meshgrid(coords, coords, indexing="xy")

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_axis(col), one_axis(row)], axis=1)[None].astype(np.float32)
