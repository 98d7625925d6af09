"""The own Flax MMDiT and Flux ports against diffusers' PyTorch classes on tiny random weights,
and the converter's reading (sharded index, bfloat16, refusals)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from disentangle_jax.models import dit_convert, dit_layers, flux, mmdit
from tests import flow_tiny

RTOL = 1e-4  # relative to the output's largest magnitude, float32


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  model = flow_tiny.torch_sd3()
  folder = str(tmp_path_factory.mktemp("sd3"))
  cfg, params = flow_tiny.saved_and_converted(model, folder)
  return model, cfg, params, folder


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
  model = flow_tiny.torch_flux()
  folder = str(tmp_path_factory.mktemp("flux"))
  cfg, params = flow_tiny.saved_and_converted(model, folder)
  return model, cfg, params, folder


def _sd3_inputs(seed=1, height=8, width=6):
  gen = torch.Generator().manual_seed(seed)
  x = torch.randn(2, 4, height, width, generator=gen)
  tokens = torch.randn(2, flow_tiny.TEXT_LEN, 12, generator=gen)
  pooled = torch.randn(2, 10, generator=gen)
  t = torch.tensor([1000.0, 3.7])
  return x, tokens, pooled, t


def test_sd3_matches_diffusers(sd3, attention="dot_product", remat=False):
  """Dual attention, q/k RMS norm, the context_pre_only last block, a non-square latent that
  crops the position table off-centre: the same velocity as SD3Transformer2DModel."""
  model, cfg, params, _ = sd3
  assert cfg.dual_attention_layers == (0,) and cfg.qk_norm == "rms_norm"
  x, tokens, pooled, t = _sd3_inputs()
  with torch.no_grad():
    expected = model(x, tokens, pooled, t).sample.numpy()
  module = mmdit.MMDiT(cfg, remat=remat, attention=attention)
  out = jax.jit(module.apply)({"params": params}, flow_tiny.nchw_to_nhwc(x), tokens.numpy(),
                              pooled.numpy(), t.numpy())
  assert out.shape == (2, 8, 6, 4)
  assert _rel(flow_tiny.nhwc_to_nchw(out), expected) < RTOL


def test_attention_kinds_agree():
  """"reference" (einsum, softmax, einsum) and "dot_product" compute the same attention."""
  q, k, v = np.random.default_rng(0).normal(size=(3, 2, 7, 3, 4)).astype(np.float32)
  k, v = k[:, :5], v[:, :5]
  attend = jax.jit(dit_layers.attention, static_argnums=3)
  np.testing.assert_allclose(attend(q, k, v, "reference"), attend(q, k, v, "dot_product"),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="model.attention"):
    dit_layers.attention(q, k, v, "flash")


def test_sd3_position_table_matches_diffusers(sd3):
  """Freshly initialised weights carry diffusers' 2-D sin-cos table."""
  model = sd3[0]
  table = dit_layers.sincos_pos_embed(16, 6, 8 // 2)
  np.testing.assert_allclose(table, model.pos_embed.pos_embed.numpy(), rtol=0, atol=1e-6)


def test_flux_matches_diffusers(flux_model, attention="reference", remat=True):
  """Double and single blocks, rotary positions over (text, row, col), the guidance embedding:
  the same velocity as FluxTransformer2DModel on packed latents."""
  model, cfg, params, _ = flux_model
  gen = torch.Generator().manual_seed(2)
  h, w = 8, 4
  latents = torch.randn(2, 4, h, w, generator=gen)
  tokens = torch.randn(2, flow_tiny.TEXT_LEN, 12, generator=gen)
  pooled = torch.randn(2, 10, generator=gen)
  t = torch.tensor([1000.0, 3.7]) / 1000
  guidance = torch.tensor([3.5, 3.5])
  txt_ids, img_ids = flow_tiny.flux_ids(h, w)
  with torch.no_grad():
    expected = model(flow_tiny.torch_pack(latents), tokens, pooled, t, img_ids, txt_ids,
                     guidance).sample
  expected = flow_tiny.torch_unpack(expected, h, w).numpy()
  module = flux.Flux(cfg, remat=remat, attention=attention)
  out = jax.jit(lambda p, *a: flux.velocity(module, p, *a))(
      params, flow_tiny.nchw_to_nhwc(latents), tokens.numpy(), pooled.numpy(), t.numpy(),
      guidance.numpy())
  assert _rel(flow_tiny.nhwc_to_nchw(out), expected) < RTOL


def test_pack_is_diffusers_packing():
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 8)).astype(np.float32)
  packed = flow_tiny.torch_pack(torch.from_numpy(x)).numpy()
  np.testing.assert_array_equal(flux.pack(flow_tiny.nchw_to_nhwc(x)), packed)
  np.testing.assert_array_equal(flux.unpack(packed, 6, 8), flow_tiny.nchw_to_nhwc(x))
  _, img_ids = flow_tiny.flux_ids(6, 8)
  np.testing.assert_array_equal(flux.image_ids(6, 8), img_ids.numpy())


def test_sharded_bf16_checkpoint_reads_like_torch(flux_model, tmp_path):
  """save_pretrained with a small max_shard_size writes an index and shards; bfloat16 shards
  read back as torch's own bf16 -> float32 values."""
  model = flux_model[0]
  folder = str(tmp_path / "sharded")
  model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True,
                                           max_shard_size="20KB")
  model.to(torch.float32)
  assert os.path.isfile(os.path.join(folder, dit_convert.INDEX_NAME))
  assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
  state = dit_convert.read_state_dict(folder)
  expected = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
  assert sorted(state) == sorted(expected)
  for key, value in expected.items():
    assert state[key].dtype == np.float32
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  cfg, params = dit_convert.load_transformer(folder)
  assert cfg == flux_model[1]
  assert jax.tree.structure(params) == jax.tree.structure(flux_model[2])


def test_converter_names_what_does_not_fit(sd3):
  """A state dict of another configuration, or with an extra part, is refused by entry name."""
  _, cfg, _, folder = sd3
  state = dit_convert.read_state_dict(folder)
  with pytest.raises(ValueError, match="ip_adapter"):
    dit_convert.sd3_params({**state, "ip_adapter.proj.weight": np.zeros((2, 2))}, cfg)
  del state["transformer_blocks.0.attn2.to_q.weight"]
  with pytest.raises(ValueError, match="transformer_blocks_0/attn2/to_q/kernel"):
    dit_convert.sd3_params(state, cfg)


def test_configs_refuse_unknown_options(tmp_path):
  with pytest.raises(ValueError, match="qk_norm"):
    mmdit.MMDiTConfig(qk_norm="layer_norm_across_heads")
  with pytest.raises(ValueError, match="use_new_option"):
    flux.FluxConfig.from_diffusers_config({**flow_tiny.FLUX_CONFIG, "use_new_option": True})
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
  with pytest.raises(ValueError, match="UNet2DConditionModel"):
    dit_convert.load_transformer(str(tmp_path))


def test_bf16_programs_trace(sd3, flux_model):
  """dtype=bfloat16 builds both networks with bfloat16 activations end to end (abstractly: a
  bf16 compile on XLA:CPU costs more than the suite can spend; numerics are the GPU's job)."""
  _, cfg, params, _ = sd3
  x, tokens, pooled, t = (a.numpy() for a in _sd3_inputs())
  out = jax.eval_shape(mmdit.MMDiT(cfg, remat=True, dtype=jnp.bfloat16).apply,
                       {"params": params}, flow_tiny.nchw_to_nhwc(x), tokens, pooled, t)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 6, 4)
  _, fcfg, fparams, _ = flux_model
  module = flux.Flux(fcfg, dtype=jnp.bfloat16)
  out = jax.eval_shape(lambda p: flux.velocity(module, p, np.zeros((2, 4, 4, 4), np.float32),
                                               tokens, pooled, t / 1000, np.float32(3.5)),
                       fparams)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4, 4)


def _grads(apply, argnums, *args):
  """The compiled jax.grad of sum(apply(*args) * w) (a fixed random w) w.r.t. ``argnums``, and
  its value at ``args``."""
  w = np.random.default_rng(3).normal(size=jax.eval_shape(apply, *args).shape).astype(np.float32)
  loss = lambda *a: jnp.sum(apply(*a) * w)  # pylint: disable=unnecessary-lambda-assignment
  compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
  return compiled, compiled(*args)


def _assert_trees_close(got, expected, rtol):
  """Every leaf within rtol of the leaf's largest magnitude."""
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert np.abs(np.asarray(g) - np.asarray(e)).max() <= rtol * np.abs(np.asarray(e)).max()


def test_block_remat_keeps_gradients_and_lowers_xla_cpu_memory(flux_model):
  """Block remat (each block through dit_layers.run_block: recompute_in_backward) changes no
  gradient of either transformer (float32; Flux: w.r.t. every weight, the latents and the
  tokens), and on XLA:CPU, which undoes plain nn.remat outside loops, it lowers the compiled
  temporaries of the gradient: an MMDiT of 2 blocks (the dual-attention one and the last) on
  256 image tokens, w.r.t. the latents and the tokens."""
  cfg = mmdit.MMDiTConfig(**{**flow_tiny.SD3_CONFIG, "sample_size": 32, "pos_embed_max_size": 16,
                             "num_attention_heads": 4, "caption_projection_dim": 32})
  rng = np.random.default_rng(8)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                        dit_convert.sd3_shapes(cfg))
  x = rng.normal(size=(2, 32, 32, 4)).astype(np.float32)
  tokens = rng.normal(size=(2, flow_tiny.TEXT_LEN, 12)).astype(np.float32)
  pooled, t = rng.normal(size=(2, 10)).astype(np.float32), np.float32([1000.0, 3.7])
  (plain, expected), (remat, got) = (_grads(lambda p, x, c: mmdit.MMDiT(cfg, remat=r).apply(  # pylint: disable=cell-var-from-loop
      {"params": p}, x, c, pooled, t), (1, 2), params, x, tokens) for r in (False, True))
  _assert_trees_close(got, expected, 1e-5)
  temps = [c.memory_analysis().temp_size_in_bytes / 2**20 for c in (plain, remat)]
  print(f"MMDiT gradient temporaries: plain {temps[0]:.2f} MiB, block remat {temps[1]:.2f} MiB")
  assert temps[1] < 0.8 * temps[0]  # nn.remat: 52.6 vs 53.1 GiB at real size (memory_flow.md)

  _, fcfg, fparams, _ = flux_model
  x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  (_, expected), (_, got) = (_grads(lambda p, x, c: flux.velocity(  # pylint: disable=cell-var-from-loop
      flux.Flux(fcfg, remat=r), p, x, c, pooled, t / 1000, np.float32(3.5)), (0, 1, 2),
      fparams, x, tokens) for r in (False, True))
  _assert_trees_close(got, expected, 1e-5)


def test_chunked_attention_lowers_xla_cpu_memory():
  """The gradient of chunked attention (blocks of 128 of 1024 queries) holds no [S, S] score
  matrix on XLA:CPU; the reference einsums and jax.nn.dot_product_attention each hold several."""
  shape = jax.ShapeDtypeStruct((2, 1024, 2, 16), jnp.float32)
  w = np.random.default_rng(0).normal(size=shape.shape).astype(np.float32)

  def temporaries(attend):
    grad = jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2))
    return jax.jit(grad).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes
  chunked = temporaries(lambda *a: dit_layers.chunked_attention(*a, chunk=128))
  whole = {kind: temporaries(lambda *a: dit_layers.attention(*a, kind))  # pylint: disable=cell-var-from-loop
           for kind in ("reference", "dot_product")}
  print(f"attention gradient temporaries: chunked {chunked / 2**20:.2f} MiB, "
        + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in whole.items()))
  scores = 2 * 2 * 1024 * 1024 * 4  # one [B, N, S, S] float32 score matrix
  assert chunked < scores / 2 and min(whole.values()) > 2 * scores


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_attention_equals_reference(dtype):
  """chunked_attention (3 blocks of 3 queries, the last padded) gives the reference attention's
  values and gradients; float64 exactly as float64."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 7, 3, 4)).astype(dtype)
  k, v = (rng.normal(size=(2, 5, 3, 4)).astype(dtype) for _ in range(2))
  w = rng.normal(size=q.shape).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    def value_and_grads(fn):
      return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(
          q, k, v)
    got = value_and_grads(lambda *a: dit_layers.chunked_attention(*a, chunk=3))
    expected = value_and_grads(lambda *a: dit_layers.attention(*a, "reference"))
    assert got[1][0].dtype == dtype
  _assert_trees_close(got, expected, 1e-6 if dtype == np.float32 else 1e-13)
