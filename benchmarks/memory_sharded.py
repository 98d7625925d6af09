r"""Memory per device of the lambda gradient with the weights split over a 'model' mesh axis.

For SD 1.5 (512 px), SD 2.1 (768 px) and SDXL (1024 px) at model axis 1, 2, 4, 8: the XLA
estimate, per device, of one optimiser step (``optimize.update_step``: value_and_grad of the
method's whole objective ``optimize.objective`` -- CFG DDIM sampling with step remat, the VAE
decoder, CLIP ViT-B/32's directional loss and the VGG16 perceptual loss -- then Adam; chunked
attention and ``--block_remat`` inside the UNet and the decoder, default "layers", the setting of
benchmarks/memory.py's lowest SD 1.5 figure) on a
(1 x model) mesh of fake CPU devices, batch 1. Weights are abstract (``jax.eval_shape``) and
carry the shardings of ``param_sharding`` (the library's rule); the program is only compiled,
and ``compiled.memory_analysis()`` of the partitioned (per-device) program gives:

  weights      the parameter bytes one device holds (param_sharding.bytes_per_device; the
               argument total below is checked against it)
  optimiser    lambda and the Adam moments (replicated, tiny)
  inputs       x_T, noise, prompts, tables, reference (replicated; the rest of the arguments)
  temporaries  XLA's temp allocation: activations, residuals and the gathered weights

XLA:CPU figures estimate a TPU/GPU run's needs; they are not measurements on one. The seeds
axis multiplies the copies, not the per-device memory, so (1 x model) meshes suffice.
Full-size programs take minutes each to partition and compile on a small CPU: --models and
--axes choose a subset.

Usage:
  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error \
      python benchmarks/memory_sharded.py --models=sd15,sd21,sdxl --axes=1,2,4,8 --steps=50
"""
from __future__ import annotations

import os
import sys

# Fake CPU devices for the mesh (before jax is imported, with memory.py below).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

import harness  # pylint: disable=g-bad-import-order,g-import-not-at-top,wrong-import-position

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
import diffusers
import jax
import jax.numpy as jnp
import numpy as np

import memory  # the SD-size modules and loss networks of benchmarks/memory.py
from disentangle_jax import models, optimize, param_sharding, parallel, pipeline, sampler
from disentangle_jax import schedule
from sd_configs import SCALING_FACTOR, SD15_UNET, SD15_VAE
# pylint: enable=g-import-not-at-top,g-bad-import-order,wrong-import-position

# family: (UNet config, VAE config, latent H = W, text conditioning {leaf: (L, D)} or (L, D)).
FAMILIES = {"sd15": (SD15_UNET, SD15_VAE, memory.LATENT, (memory.TEXT_LENGTH, memory.TEXT_WIDTH)),
            **memory.FAMILY_SIZES}
CHIPS_GB = (16, 32)  # TPU v5e (16 GB HBM), v4 / a 32 GB GPU

# (memory.py's flags are defined too; --steps, T, is the one read here.)
_MODELS = flags.DEFINE_list("models", list(FAMILIES), f"Any of {list(FAMILIES)}.")
_AXES = flags.DEFINE_list("axes", ["1", "2", "4", "8"], "Model axis sizes (divisors of 8).")
_BLOCK_REMAT = flags.DEFINE_enum(
    "block_remat", "layers", ["none", "blocks", "layers"],
    "model.block_remat of the UNet and the VAE decoder (remat.py).")
_COMPILE = flags.DEFINE_bool(
    "compile", True, "False: only the weights per device (the rule's exact bytes), in seconds "
    "instead of minutes per program.")


def family_program(family: str, block_remat: str = "none"):
  """(update fn, abstract params {"sd", "clip", "vgg"}, abstract EditProblem) at the family's
  native size, float32, chunked attention, step remat and ``block_remat``; the update is
  optimize.update_step with Adam."""
  unet_cfg, vae_cfg, latent, text = FAMILIES[family]
  config = models.ModelConfig(attention="chunked", block_remat=block_remat)
  unet = diffusers.FlaxUNet2DConditionModel.from_config(
      unet_cfg, dtype=jnp.float32, use_memory_efficient_attention=True)
  vae = diffusers.FlaxAutoencoderKL.from_config(vae_cfg, dtype=jnp.float32)
  key = jax.random.PRNGKey(0)
  vae_shapes = jax.eval_shape(vae.init_weights, key)
  clip_fn, vgg_fn, loss_params = memory.loss_networks()
  # The objective reads CLIP's image tower only; jit drops the text tower from the arguments,
  # so it is left out here too (the weights column is then what the program holds).
  loss_params["clip"] = {k: v for k, v in loss_params["clip"].items()
                         if k not in ("text_model", "text_projection")}
  params = {"sd": {"unet": jax.eval_shape(unet.init_weights, key),
                   "vae": {k: vae_shapes[k] for k in memory._DECODER_PARAMS}},  # pylint: disable=protected-access
            **loss_params}
  nets = optimize.Networks(
      eps=models.make_eps_fn(unet, config), decode=models.make_decode_fn(vae, vae_cfg.get(
          "scaling_factor", SCALING_FACTOR), config),
      clip_image=clip_fn, vgg=vgg_fn, clip_image_size=memory.CLIP_SIZE,
      vgg_input_size=memory.VGG_SIZE)
  tx = optimize.make_optimizer(optimize.OptimizerConfig())
  update = jax.jit(lambda state, p, problem: optimize.update_step(
      state, p, problem, nets=nets, loss_cfg=optimize.LossConfig(preprocess="standard"),
      sampler_cfg=sampler.SamplerConfig("ddim", remat="full"), tx=tx), donate_argnums=0)
  steps = memory._STEPS.value  # pylint: disable=protected-access

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)
  emb = jax.tree.map(lambda shape: spec(shape), text, is_leaf=lambda x: isinstance(x, tuple))
  edit_emb = jax.tree.map(lambda e: spec((1,) + e.shape), emb)
  problem = optimize.EditProblem(
      x_T=spec((1, latent, latent, 4)), noise=spec((steps, 1, latent, latent, 4)),
      prompts=pipeline.PromptPair(edit_emb, edit_emb, emb), guidance=spec(()),
      tables=schedule.step_tables(schedule.ScheduleConfig(), steps),
      reference=spec((1, 8 * latent, 8 * latent, 3)), text0=spec((1, memory.CLIP_DIM)),
      text1=spec((1, memory.CLIP_DIM)), mask=spec((1,)), group=spec((1,), jnp.int32))
  state = jax.eval_shape(lambda: optimize.init_state(jnp.zeros((1, steps)), tx))
  return update, params, problem, state



def weights_row(family: str, axes) -> list:
  """The family's weights per device at each model axis (no compilation)."""
  _, params, _, _ = family_program(family)
  return [family, harness.gib(harness.tree_nbytes(params))] + [
      harness.gib(sum(param_sharding.bytes_per_device(params, a))) for a in axes]


def measure(family: str, model: int) -> dict:
  """Compiles the family's update on a (1 x model) mesh; per-device bytes by kind."""
  update, params, problem, state = family_program(family, _BLOCK_REMAT.value)
  mesh = parallel.make_mesh(jax.devices()[:model], model=model)
  problem = problem._replace(tables=jax.tree.map(
      lambda t: jax.ShapeDtypeStruct(np.shape(t), jnp.asarray(t).dtype), problem.tables))
  mem, seconds, cpu_seconds = harness.compile_on_mesh(update, state, params, problem, mesh)
  weights = sum(param_sharding.bytes_per_device(params, model))
  optimiser = harness.tree_nbytes(state)
  return {"family": family, "model": model, "weights": weights, "optimiser": optimiser,
          "inputs": mem.argument_size_in_bytes - weights - optimiser,
          "arguments": mem.argument_size_in_bytes, "temps": mem.temp_size_in_bytes,
          "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes,
          "full_weights": harness.tree_nbytes(params), "seconds": seconds,
          "cpu_seconds": cpu_seconds}


def fits(total: float) -> str:
  gb = total / 1e9
  return ", ".join(f"{c} GB" for c in CHIPS_GB if gb <= c) or "neither"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = set(_MODELS.value) - set(FAMILIES)
  axes = [int(a) for a in _AXES.value]
  if unknown:
    sys.exit(f"error: --models has {sorted(unknown)}; use any of {list(FAMILIES)}.")
  if any(8 % a for a in axes):
    sys.exit(f"error: --axes={_AXES.value}: each must divide the 8 fake devices.")
  print("## The lambda gradient's memory per device with the weights split over 'model' "
        "(XLA:CPU estimates)\n")
  print(harness.machine_report())
  print(f"- one Adam step of optimize.objective (CLIP ViT-B/32 + VGG16 losses), batch 1, "
        f"T = {memory._STEPS.value}, float32, step remat + chunked attention + block remat "
        f"{_BLOCK_REMAT.value!r} in the UNet and the VAE decoder; each family at "
        "its native size; (1 x model) mesh of fake CPU devices, weights by param_sharding's "
        f"rule (leaves >= {param_sharding.MIN_SHARDED_SIZE} elements split); 'fits' compares "
        "weights + optimiser + inputs + temporaries with a 16 / 32 GB chip\n", flush=True)
  if not _COMPILE.value:
    print(harness.markdown_table(
        ["family", "all weights GiB"] + [f"weights/device GiB, model={a}" for a in axes],
        [weights_row(family, axes) for family in _MODELS.value]))
    return
  rows = []
  for family in _MODELS.value:
    for model in axes:
      s = measure(family, model)
      print(f"  measured {family} model={model} in {s['seconds']:.0f} s ("
            f"{s['cpu_seconds']:.0f} CPU-s): weights {harness.gib(s['weights']):.3g}, "
            f"temporaries {harness.gib(s['temps']):.3g}, total {harness.gib(s['total']):.3g} GiB",
            flush=True)
      g = harness.gib
      rows.append([family, model, g(s["full_weights"]), g(s["weights"]), g(s["optimiser"]),
                   g(s["inputs"]), g(s["temps"]), g(s["total"]), fits(s["total"]),
                   s["seconds"], s["cpu_seconds"]])
  print()
  print(harness.markdown_table(
      ["family", "model axis", "all weights GiB", "weights/device GiB", "optimiser GiB",
       "inputs GiB", "temporaries GiB", "total/device GiB", "fits", "compile s",
       "compile CPU-s"], rows))


if __name__ == "__main__":
  app.run(main)
