r"""Memory of the lambda gradient at real size for SD 3.5 medium and Flux.1-dev (1024 px).

One Adam step of the method's whole objective (``optimize.update_step``: value_and_grad of
``optimize.objective`` -- the flow-matching Euler sampler with step remat through
``flow_bundle.FlowPredictor``, the 16-channel VAE decoder with its shift factor, CLIP ViT-B/32's
directional loss and the VGG16 perceptual loss -- then Adam), batch 1, T steps, compiled (never
run) on XLA:CPU with abstract weights (``jax.eval_shape``: nothing is allocated). Per case,
``compiled.memory_analysis()`` of the per-device program gives:

  weights      the transformer + VAE decoder + CLIP ViT-B/32 + VGG16 bytes one device holds
               (param_sharding's rule on a (1 x model) mesh of fake CPU devices)
  optimiser    lambda [1, T] and the Adam moments
  inputs       x_T, the (unused) DDIM noise [T, 1, H, W, 16], the prompts, the reference image
  temporaries  XLA's temp allocation: activations, residuals, gathered weights

The transformers are this repository's Flax ports (models/mmdit.py, models/flux.py) built from
the published transformer/config.json values; the VAE is diffusers' FlaxAutoencoderKL with the
published 16-channel vae/config.json (float32 in every case, as flow_folder loads it). Cases
(``--cases``, "model/dtype/block_remat/model_axis"):

  model        sd35m (SD 3.5 medium, 2.2 B: CFG with the negative prompt, batch 2 per call;
               text 77 CLIP + 256 T5 tokens x 4096, pooled 2048) | flux_dev (Flux.1-dev,
               11.9 B: distilled guidance, batch 1 per call; 512 T5 tokens x 4096, pooled 768)
  dtype        f32 | bf16 (the transformer's weights and compute, as flow_bundle casts them;
               the latents, the sampler and the VAE stay float32)
  block_remat  none | layers (the programs' ``model.block_remat``: each transformer block and
               the decoder's layers under recompute.recompute_in_backward)
  model_axis   devices the weights are split over (1 = one device holds everything)

``--attention`` is the programs' ``model.attention`` (default "chunked": dit_layers'
chunked_attention, which never holds a whole [heads, S, S] score matrix, forward or backward).

XLA:CPU figures estimate a GPU/TPU run's needs, they are not measurements on one. Two known
CPU distortions: XLA:CPU runs bf16 matmuls in float32 with converts around them (bf16
temporaries come out larger than on an accelerator), and ``jax.nn.dot_product_attention``
("dot_product") on CPU materialises the [heads, S, S] score matrix that a GPU's fused kernel
never holds.

``--compile=false`` prints only the exact weights per device; ``--part_layers=N`` compiles the
gradient of one guided transformer call with N blocks (and, with ``--decoder_remats``, of the
VAE decoder alone) instead: what sets the temporaries, at a fraction of the compile time.

Usage:
  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error \
      python benchmarks/memory_flow.py --steps=50 --cases=sd35m/f32/none/1,flux_dev/bf16/layers/8
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

# Fake CPU devices for the model axis (before jax is imported, with memory.py below).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

import harness  # pylint: disable=g-bad-import-order,g-import-not-at-top,wrong-import-position

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import memory  # the loss networks and the --steps flag of benchmarks/memory.py
from disentangle_jax import models, optimize, param_sharding, parallel, pipeline, sampler
from disentangle_jax import flow_schedule, schedule
from disentangle_jax.models import dit_convert, flow_bundle, flow_vae
from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit
from disentangle_jax.models.config import ModelConfig
# pylint: enable=g-import-not-at-top,g-bad-import-order,wrong-import-position

IMAGE = 1024  # px, both models' native size
LATENT = IMAGE // 8  # the 16-channel VAE's factor 8
GPU_GB = 80  # one A100 / H100 80 GB

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in
# the first 13 blocks, q/k RMS norm).
SD35_MEDIUM = mmdit.MMDiTConfig(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev transformer/config.json (19 double-, 38 single-stream blocks).
FLUX_DEV = flux_lib.FluxConfig(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Both models' vae/config.json: SD's VAE with 16 latent channels and no quant convs (flow_vae).
FLOW_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=16, norm_num_groups=32, act_fn="silu",
                sample_size=IMAGE, use_quant_conv=False, use_post_quant_conv=False)

# name: (family, transformer config, scheduler, VAE scaling, VAE shift, tokens (L, J), pooled P)
FLOW_MODELS = {
    "sd35m": ("sd3", SD35_MEDIUM, flow_schedule.FlowScheduleConfig(shift=3.0), 1.5305, 0.0609,
              (77 + 256, 4096), 2048),
    "flux_dev": ("flux", FLUX_DEV, flow_schedule.FlowScheduleConfig(
        shift=3.0, use_dynamic_shifting=True), 0.3611, 0.1159, (512, 4096), 768),
}
DTYPES = {"f32": "float32", "bf16": "bfloat16"}
REMATS = ("none", "layers")
DEFAULT_CASES = (
    [f"sd35m/{d}/{r}/1" for d in DTYPES for r in REMATS]
    + [f"flux_dev/{d}/{r}/1" for d in DTYPES for r in REMATS]
    + [f"flux_dev/{d}/layers/{m}" for d in DTYPES for m in (4, 8)])

_CASES = flags.DEFINE_list("cases", DEFAULT_CASES,
                           "model/dtype/block_remat/model_axis entries (module docstring).")
_COMPILE = flags.DEFINE_bool(
    "compile", True, "False: only the weights per device (the rule's exact bytes) of every model "
    "and dtype at model axis 1, 2, 4, 8, in seconds instead of tens of minutes per program.")
_PART_LAYERS = flags.DEFINE_integer(
    "part_layers", 0, "> 0: instead of the cases, compile the gradient of ONE guided transformer "
    "call (w.r.t. the latents and the tokens) with this many blocks, at 1024 px, for each "
    "model/dtype/block_remat of --cases: whether block remat lowers XLA:CPU's temporaries.")


_ATTENTION = flags.DEFINE_enum(
    "attention", "chunked", list(flow_bundle._ATTENTION),  # pylint: disable=protected-access
    "The programs' model.attention for the transformer (flow_bundle maps it to dit_layers').")
_DECODER_REMATS = flags.DEFINE_list(
    "decoder_remats", [], "With --part_layers: also the gradient through the VAE decoder alone "
    "at 1024 px with each of these block_remat levels.")


def parse_case(case: str) -> tuple[str, str, str, int]:
  """"model/dtype/block_remat/model_axis" -> its parts; SystemExit naming the bad part."""
  parts = case.split("/")
  if (len(parts) != 4 or parts[0] not in FLOW_MODELS or parts[1] not in DTYPES
      or parts[2] not in REMATS or parts[3] not in ("1", "2", "4", "8")):
    sys.exit(f"error: --cases has {case!r}; write model/dtype/block_remat/model_axis with model "
             f"in {list(FLOW_MODELS)}, dtype in {list(DTYPES)}, block_remat in {list(REMATS)}, "
             "model_axis in 1, 2, 4, 8.")
  return parts[0], parts[1], parts[2], int(parts[3])


def flow_program(name: str, dtype: str, block_remat: str, steps: int):
  """(update fn, abstract params {"sd", "clip", "vgg"}, abstract EditProblem, abstract state):
  the programs' flow model (flow_bundle.FlowNet as the bundle's ``unet``, its FlowPredictor,
  ShiftedVAE) at real size, built as flow_bundle.bundle and models.predictor build it."""
  family, tcfg, sched, scaling, shift, (length, width), pooled = FLOW_MODELS[name]
  config = ModelConfig(dtype=DTYPES[dtype], attention=_ATTENTION.value, block_remat=block_remat)
  compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  net = flow_bundle.FlowNet(family, tcfg, sched)
  predictor = flow_bundle.FlowPredictor(
      net, remat=block_remat != "none",
      attention=flow_bundle._ATTENTION[_ATTENTION.value], dtype=compute)  # pylint: disable=protected-access
  vae = flow_vae.build_vae(FLOW_VAE)  # float32, as flow_folder loads it
  decode = models.make_decode_fn(flow_bundle.ShiftedVAE(vae, shift), scaling, config)
  shapes = (dit_convert.sd3_shapes(tcfg) if family == "sd3" else dit_convert.flux_shapes(tcfg))
  vae_shapes = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
  clip_fn, vgg_fn, loss_params = memory.loss_networks()
  # The objective reads CLIP's image tower only; jit drops the text tower from the arguments,
  # so it is left out here too (the weights column is then what the program holds).
  loss_params["clip"] = {k: v for k, v in loss_params["clip"].items()
                         if k not in ("text_model", "text_projection")}
  params = {"sd": {"unet": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, compute), shapes),
                   "vae": {k: vae_shapes[k] for k in memory._DECODER_PARAMS}},  # pylint: disable=protected-access
            **loss_params}
  nets = optimize.Networks(eps=predictor, decode=decode, clip_image=clip_fn, vgg=vgg_fn,
                           clip_image_size=memory.CLIP_SIZE, vgg_input_size=memory.VGG_SIZE)
  tx = optimize.make_optimizer(optimize.OptimizerConfig())
  update = jax.jit(lambda state, p, problem: optimize.update_step(
      state, p, problem, nets=nets, loss_cfg=optimize.LossConfig(preprocess="standard"),
      sampler_cfg=sampler.SamplerConfig("ddim", remat="full"), tx=tx), donate_argnums=0)

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)
  emb = {"tokens": spec((length, width), compute), "pooled": spec((1, pooled), compute)}
  edit_emb = jax.tree.map(lambda e: spec((1,) + e.shape, e.dtype), emb)
  tables = jax.tree.map(lambda t: spec(np.shape(t), jnp.asarray(t).dtype),
                        schedule.step_tables(schedule.ScheduleConfig(), steps))
  problem = optimize.EditProblem(
      x_T=spec((1, LATENT, LATENT, 16)), noise=spec((steps, 1, LATENT, LATENT, 16)),
      prompts=pipeline.PromptPair(edit_emb, edit_emb, emb), guidance=spec(()), tables=tables,
      reference=spec((1, IMAGE, IMAGE, 3)), text0=spec((1, memory.CLIP_DIM)),
      text1=spec((1, memory.CLIP_DIM)), mask=spec((1,)), group=spec((1,), jnp.int32))
  state = jax.eval_shape(lambda: optimize.init_state(jnp.zeros((1, steps)), tx))
  return update, params, problem, state



def measure(case: str, steps: int) -> dict:
  """Compiles one case on a (1 x model) mesh; per-device bytes by kind."""
  name, dtype, block_remat, model = parse_case(case)
  update, params, problem, state = flow_program(name, dtype, block_remat, steps)
  mesh = parallel.make_mesh(jax.devices()[:model], model=model)
  mem, seconds, cpu_seconds = harness.compile_on_mesh(update, state, params, problem, mesh)
  weights = sum(param_sharding.bytes_per_device(params, model))
  return {"case": case, "weights": weights, "optimiser": harness.tree_nbytes(state),
          "inputs": mem.argument_size_in_bytes - weights - harness.tree_nbytes(state),
          "temps": mem.temp_size_in_bytes,
          "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
          "transformer": harness.tree_nbytes(params["sd"]["unet"]), "seconds": seconds,
          "cpu_seconds": cpu_seconds}


def weights_rows() -> list:
  """Every model's and dtype's weights per device at model axis 1, 2, 4, 8 (no compilation):
  the transformer in the dtype, the float32 VAE decoder, CLIP's image tower and VGG16."""
  rows = []
  for name in FLOW_MODELS:
    for dtype in DTYPES:
      _, params, _, _ = flow_program(name, dtype, "none", 1)
      rows.append([name, dtype, harness.gib(harness.tree_nbytes(params["sd"]["unet"]))] + [
          harness.gib(sum(param_sharding.bytes_per_device(params, a))) for a in (1, 2, 4, 8)])
  return rows


def part_row(name: str, dtype: str, block_remat: str, layers: int) -> list:
  """Temporaries of the gradient through one guided transformer call (SD 3.5: CFG batch 2;
  Flux: batch 1) with the first ``layers`` blocks (Flux: ``layers`` double and ``layers``
  single), w.r.t. the latents and the tokens, at 1024 px."""
  family, tcfg, sched, _, _, (length, width), pooled = FLOW_MODELS[name]
  if family == "sd3":
    tcfg = dataclasses.replace(tcfg, num_layers=layers, dual_attention_layers=tuple(
        i for i in tcfg.dual_attention_layers if i < layers))
  else:
    tcfg = dataclasses.replace(tcfg, num_layers=layers, num_single_layers=layers)
  compute = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  predictor = flow_bundle.FlowPredictor(
      flow_bundle.FlowNet(family, tcfg, sched), remat=block_remat != "none",
      attention=flow_bundle._ATTENTION[_ATTENTION.value], dtype=compute)  # pylint: disable=protected-access
  velocity = predictor.velocity_fn()
  shapes = (dit_convert.sd3_shapes(tcfg) if family == "sd3" else dit_convert.flux_shapes(tcfg))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, compute), shapes)
  n = 2 if family == "sd3" else 1

  def loss(x, tokens, p):
    cond = {"tokens": tokens, "pooled": jnp.zeros((n, 1, pooled), compute)}
    return jnp.mean(velocity(p, x, jnp.float32(500), cond, jnp.float32(3.5)).astype(jnp.float32))
  args = (jax.ShapeDtypeStruct((n, LATENT, LATENT, 16), jnp.float32),
          jax.ShapeDtypeStruct((n, length, width), compute), params)
  start = time.process_time()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
  cpu_seconds = time.process_time() - start
  mem = compiled.memory_analysis()
  return [name, dtype, block_remat, layers, harness.gib(harness.tree_nbytes(params)),
          harness.gib(mem.temp_size_in_bytes), cpu_seconds]


def decoder_row(block_remat: str) -> list:
  """Temporaries of the gradient through the 16-channel VAE decoder alone at 1024 px (float32,
  the model's ``block_remat``), w.r.t. the latents."""
  config = ModelConfig(block_remat=block_remat)
  vae = flow_vae.build_vae(FLOW_VAE)
  decode = models.make_decode_fn(flow_bundle.ShiftedVAE(vae, 0.0609), 1.5305, config)
  shapes = jax.eval_shape(vae.init_weights, jax.random.PRNGKey(0))
  params = {k: shapes[k] for k in memory._DECODER_PARAMS}  # pylint: disable=protected-access
  z = jax.ShapeDtypeStruct((1, LATENT, LATENT, 16), jnp.float32)
  start = time.process_time()
  compiled = jax.jit(jax.grad(lambda z, p: jnp.mean(decode(p, z)))).lower(z, params).compile()
  cpu_seconds = time.process_time() - start
  return ["VAE decoder", "f32", block_remat, "-", harness.gib(harness.tree_nbytes(params)),
          harness.gib(compiled.memory_analysis().temp_size_in_bytes), cpu_seconds]


def fits(total: float, model: int) -> str:
  """Whether the per-device total fits an 80 GB GPU (per device of the mesh)."""
  gb = total / 1e9
  where = "one GPU" if model == 1 else f"each of {model} GPUs"
  return f"yes ({where})" if gb <= GPU_GB else "no"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cases = list(_CASES.value)
  for case in cases:
    parse_case(case)
  steps = memory._STEPS.value  # pylint: disable=protected-access
  print("## The lambda gradient's memory at real size: SD 3.5 medium and Flux.1-dev, 1024 px "
        "(XLA:CPU estimates)\n")
  print(harness.machine_report())
  if not _COMPILE.value:
    print("- weights per device by param_sharding's rule (exact bytes, no compilation): the "
          "transformer in the dtype, the float32 VAE decoder, CLIP ViT-B/32's image tower, "
          "VGG16\n")
    print(harness.markdown_table(
        ["model", "dtype", "transformer GiB"] + [f"weights/device GiB, model={a}"
                                                 for a in (1, 2, 4, 8)], weights_rows()))
    return
  if _PART_LAYERS.value > 0:
    print(f"- the gradient of one guided transformer call with {_PART_LAYERS.value} block(s) "
          "(Flux: as many double- and single-stream), w.r.t. latents and tokens, 1024 px, "
          f"model.attention={_ATTENTION.value!r}\n", flush=True)
    print(harness.markdown_table(
        ["model", "dtype", "block remat", "blocks", "weights GiB", "temporaries GiB",
         "compile CPU-s"],
        [part_row(*parse_case(case)[:3], _PART_LAYERS.value) for case in cases]
        + [decoder_row(r) for r in _DECODER_REMATS.value]))
    return
  print(f"- one Adam step of optimize.objective (flow Euler sampler, 16-channel VAE decoder, "
        f"CLIP ViT-B/32 + VGG16 losses), batch 1, T = {steps}, step remat, "
        f"model.attention={_ATTENTION.value!r}; latents 128x128x16; abstract weights carrying "
        "param_sharding's shardings on a (1 x model) mesh of fake CPU devices; 'fits 80 GB' "
        "compares weights + optimiser + inputs + temporaries per device with one 80 GB GPU\n",
        flush=True)
  rows = []
  for case in cases:
    s = measure(case, steps)
    print(f"  measured {case} in {s['seconds']:.0f} s ({s['cpu_seconds']:.0f} CPU-s): total "
          f"{harness.gib(s['total']):.3g} GiB (temporaries {harness.gib(s['temps']):.3g})",
          flush=True)
    name, dtype, block_remat, model = parse_case(case)
    g = harness.gib
    rows.append([name, dtype, block_remat, model, g(s["transformer"]), g(s["weights"]),
                 g(s["optimiser"]), g(s["inputs"]), g(s["temps"]), g(s["total"]),
                 fits(s["total"], model), s["seconds"], s["cpu_seconds"]])
  print()
  print(harness.markdown_table(
      ["model", "dtype", "block remat", "model axis", "transformer GiB (all)",
       "weights/device GiB", "optimiser GiB", "inputs GiB", "temporaries GiB",
       "total/device GiB", "fits 80 GB", "compile s", "compile CPU-s"], rows))


if __name__ == "__main__":
  app.run(main)
