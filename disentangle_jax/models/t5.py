"""The T5 v1.1 encoder of SD 3.x and Flux.1 (transformers' ``T5EncoderModel``) as a Flax module.

Own port because transformers 4.57's FlaxT5EncoderModel does not run on the pinned jax 0.10: its
relative-position bucketing calls ``jnp.clip(..., a_max=...)``, a keyword jax removed. Pure
Flax, no transformers import; weights are an explicit tree at the PyTorch key paths
(``encoder.block.0.layer.1.DenseReluDense.wi_0.weight`` -> ``encoder/block_0/layer_1/
DenseReluDense/wi_0/kernel``; ``convert_state_dict``).

What it computes (eval mode): token embedding (``shared``); per block a pre-norm self-attention
(T5's RMS "layer norm" with a weight, no bias; unscaled dot-product logits plus a learned
bidirectional relative-position bias, block 0's reused by every block; softmax in float32) and
a pre-norm gated-GELU feed-forward (``wo(gelu_tanh(wi_0 x) * wi_1 x)``); a final norm.
No attention mask, as the pipelines call it.

    hidden = T5Encoder(config)(params, ids [N, L] int) -> [N, L, D]

Shapes: N prompts, L tokens, D d_model, H heads, K d_kv.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax.models import dit_convert
from disentangle_jax.models import dit_layers as L

FEED_FORWARDS = ("gated-gelu",)  # T5 v1.1 (SD3's and Flux's T5-XXL)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of a T5Config (config.json) that the encoder's computation depends on."""

  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARDS:
      raise ValueError(f"text encoder feed_forward_proj={self.feed_forward_proj!r} is not "
                       f"supported; this port runs {FEED_FORWARDS} (T5 v1.1).")

  @classmethod
  def from_dict(cls, config: dict) -> "T5Config":
    """From a transformers config.json dict (other keys: training-only or decoder settings)."""
    if config.get("is_gated_act") is False or config.get("dense_act_fn") not in (None, "gelu_new",
                                                                              "gelu_pytorch_tanh"):
      raise ValueError(f"text encoder dense_act_fn={config.get('dense_act_fn')!r} is not "
                       "supported; T5 v1.1 uses 'gelu_new' in a gated feed-forward.")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position buckets [L, L] (host numpy, float32 logs as torch)."""
  context = np.arange(length)[:, None]
  memory = np.arange(length)[None, :]
  rel = memory - context
  num_buckets //= 2
  buckets = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) where the exact branch is taken anyway
    large = max_exact + (np.log(rel.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact))
  large = np.minimum(np.where(rel < max_exact, 0, large).astype(np.int64), num_buckets - 1)
  return buckets + np.where(rel < max_exact, rel, large)


class T5Norm(nn.Module):
  """T5LayerNorm: x / rms(x) * weight (``scale``), statistics in float32."""

  eps: float
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
    return (scale * h).astype(self.dtype)


class SelfAttention(nn.Module):
  config: T5Config
  has_bias: bool = False
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias):
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    q, k, v = (L.heads(L.dense(inner, n, self.dtype, use_bias=False)(x), cfg.num_heads)
               for n in ("q", "k", "v"))
    if self.has_bias:
      table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                         (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
      buckets = relative_buckets(x.shape[1], cfg.relative_attention_num_buckets,
                                 cfg.relative_attention_max_distance)
      position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, L, L]
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + position_bias
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", weights, v).reshape(x.shape[:2] + (inner,))
    return L.dense(cfg.d_model, "o", self.dtype, use_bias=False)(out), position_bias


class Block(nn.Module):
  """T5Block of the encoder: layer_0 (self-attention), layer_1 (feed-forward), residuals."""

  config: T5Config
  first: bool = False
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias):
    out, position_bias = _Layer0(self.config, self.first, self.dtype, name="layer_0")(
        x, position_bias)
    x = x + out
    return x + _Layer1(self.config, self.dtype, name="layer_1")(x), position_bias


class _Layer0(nn.Module):
  """T5LayerSelfAttention: layer_norm, SelfAttention."""

  config: T5Config
  first: bool = False
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, position_bias):
    h = T5Norm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    return SelfAttention(self.config, self.first, self.dtype, name="SelfAttention")(
        h, position_bias)


class _GatedFF(nn.Module):
  """T5DenseGatedActDense: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

  config: T5Config
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = nn.gelu(L.dense(cfg.d_ff, "wi_0", self.dtype, use_bias=False)(x), approximate=True)
    h = gate * L.dense(cfg.d_ff, "wi_1", self.dtype, use_bias=False)(x)
    return L.dense(cfg.d_model, "wo", self.dtype, use_bias=False)(h)


class _Layer1(nn.Module):
  """T5LayerFF: layer_norm, DenseReluDense."""

  config: T5Config
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = T5Norm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
    return _GatedFF(self.config, self.dtype, name="DenseReluDense")(h)


class _Stack(nn.Module):
  config: T5Config
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    position_bias = None
    for i in range(self.config.num_layers):
      x, position_bias = Block(self.config, i == 0, self.dtype, name=f"block_{i}")(
          x, position_bias)
    return T5Norm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
  """T5EncoderModel's last_hidden_state: ids [N, L] -> [N, L, D]."""

  config: T5Config
  dtype: L.Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    cfg = self.config
    table = self.param("shared", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                       jnp.float32)
    x = table[jnp.asarray(ids, jnp.int32)].astype(self.dtype)
    return _Stack(cfg, self.dtype, name="encoder")(x)


# State-dict keys that are embedding tables (kept [rows, width], not transposed).
_EMBEDDINGS = ("shared.weight", "relative_attention_bias.weight")


def convert_state_dict(state_dict: dict[str, np.ndarray], config: T5Config,
                       source: str = "text_encoder") -> dict:
  """A T5EncoderModel state dict -> the T5Encoder tree, checked against its shapes. The tied
  copy ``encoder.embed_tokens.weight`` stands in for ``shared.weight`` when only it is saved."""
  state = dict(state_dict)
  tied = state.pop("encoder.embed_tokens.weight", None)
  if "shared.weight" not in state and tied is not None:
    state["shared.weight"] = tied
  embeddings = {k: state.pop(k) for k in list(state) if k.endswith(_EMBEDDINGS)}
  params = dit_convert.to_flax(state)
  for key, value in embeddings.items():
    path, _ = dit_convert.flax_key(key, 2)
    node = params
    for part in path[:-2]:
      node = node.setdefault(part, {})
    node[path[-2]] = np.asarray(value)  # "shared" / "relative_attention_bias" are the params
  shapes = jax.eval_shape(
      lambda ids: T5Encoder(config).init(jax.random.key(0), ids),
      jax.ShapeDtypeStruct((1, 2), jnp.int32))["params"]
  return dit_convert.check_tree(params, shapes, source)
