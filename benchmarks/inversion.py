r"""Real-image editing cost: encode + inversion, and the edit with given weights.

  inversion: VAE encode (posterior mean) + DDIM inversion (T CFG UNet calls) + the c0
             reconstruction pass that computes the residuals (T more CFG UNet calls), one jit.
  edit:      the lambda = 0 reconstruction and the lambda edit, two sampler runs of batch B
             (2T CFG UNet calls) + one VAE decode of 3B latents (inversion.make_edit_fn, what
             launch.edit runs with --config.weights).

Sizes: "tiny" is the built-in tiny model (8x8 latents); "mid" is the tiny configs widened to
UNet channels (64, 128) at 32x32 latents (256 px images), random weights. The compile column
is the first edit call minus the median (noisy on a loaded machine); medians are of interleaved
calls after a warm-up. The last column checks the inversion: with residuals at every step the
lambda = 0 run of the edit program ends at z0 up to float32 rounding.

Usage:
  python benchmarks/inversion.py --steps=50 --repeats=3 --sizes=tiny,mid
"""
from __future__ import annotations

import dataclasses
import sys
import time

from absl import app
from absl import flags
from absl import logging

import harness  # pylint: disable=g-bad-import-order

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import diffusers
import jax
import jax.numpy as jnp

from disentangle_jax import inversion, mixing, models, pipeline, real_images, sampling
# pylint: enable=g-import-not-at-top,g-bad-import-order

_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps T (50 in the paper).")
_INJECT = flags.DEFINE_integer("inject_steps", 33, "Steps with residuals (33 of 50).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "mid"], "Model sizes: tiny, mid.")
_MID_LATENT = flags.DEFINE_integer("mid_latent", 32, "Latent H = W of the mid-size model.")

SIZES = ("tiny", "mid")
GUIDANCE = 7.5
SEED = 42
PROMPT0 = "a photo of church"
PROMPT1 = "a photo of church style"


def build(size: str, mid_latent: int):
  """A models.StableDiffusion of the named size (random weights)."""
  if size == "tiny":
    return models.build_tiny(models.ModelConfig())
  tiny = models.build_tiny(models.ModelConfig(tiny_latent_size=mid_latent))  # tokenizer, CLIP
  unet_cfg = dict(models.tiny_unet_config(mid_latent), block_out_channels=[64, 128])
  vae_cfg = models.tiny_vae_config(mid_latent * tiny.vae_scale_factor)
  unet = diffusers.FlaxUNet2DConditionModel.from_config(unet_cfg, dtype=jnp.float32)
  vae = diffusers.FlaxAutoencoderKL.from_config(vae_cfg, dtype=jnp.float32)
  params = dict(tiny.params, unet=unet.init_weights(jax.random.PRNGKey(0)),
                vae=vae.init_weights(jax.random.PRNGKey(1)))
  return tiny._replace(unet=unet, vae=vae, params=params, latent_size=mid_latent)


def bench_size(size: str, steps: int, inject: int, repeats: int) -> list:
  model = build(size, _MID_LATENT.value)
  px = model.latent_size * model.vae_scale_factor
  image = jnp.asarray(real_images.synthetic(px))[None]
  c0, c1, uncond = models.encode_prompts(model, [PROMPT0, PROMPT1, ""])
  prompts = pipeline.PromptPair(c0, c1, uncond)
  cfg = inversion.InversionConfig(sampling.SamplingConfig(num_steps=steps, guidance=GUIDANCE),
                                  inject_steps=inject)
  inverter = inversion.make_inverter(model, cfg.pin)
  edit = inversion.make_edit_fn(models.make_eps_fn(model.unet),
                                models.make_decode_fn(model.vae, model.scaling_factor))
  lam = mixing.hard_switch(steps, min(10, steps), 1.1)

  def run_inversion():
    inv = inversion.invert_images(inverter, model.params, image, c0, uncond, [SEED], cfg,
                                  model.schedule)
    return jax.block_until_ready(inv)

  inv = run_inversion()
  def run_edit():
    return jax.block_until_ready(edit(model.params, inv.z0, inv.run, lam, prompts, GUIDANCE,
                                      inv.tables))

  t0 = time.perf_counter()
  run_edit()
  first_edit = time.perf_counter() - t0
  times = harness.interleaved_medians({"inversion": run_inversion, "edit": run_edit}, repeats,
                                      warmup=0)
  n_unet = sum(x.size for x in jax.tree.leaves(model.params["unet"]))
  med_inv, med_edit = harness.median(times["inversion"]), harness.median(times["edit"])
  # Reconstruction check (untimed; K is traced, no recompile): residuals at every step, so the
  # lambda = 0 run should end at z0 up to float32 rounding.
  full = inversion.invert_images(inverter, model.params, image, c0, uncond, [SEED],
                                 dataclasses.replace(cfg, inject_steps=steps), model.schedule)
  rec = edit(model.params, full.z0, full.run, lam, prompts, GUIDANCE, full.tables).z_rec
  err = float(jnp.max(jnp.abs(rec - full.z0)) / jnp.max(jnp.abs(full.z0)))
  return [
      size, f"{model.latent_size}x{model.latent_size}x4 ({px} px)", f"{n_unet / 1e6:.2f} M",
      steps, med_inv, 1e3 * med_inv / (2 * steps), med_edit, 1e3 * med_edit / (2 * steps),
      first_edit - med_edit, err,
  ]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  bad = set(_SIZES.value) - set(SIZES)
  if bad:
    sys.exit(f"error: --sizes has {sorted(bad)}; use {', '.join(SIZES)}.")
  if not 0 <= _INJECT.value <= _STEPS.value:
    sys.exit(f"error: --inject_steps={_INJECT.value} must be in [0, --steps={_STEPS.value}].")
  print("## Real-image inversion and editing\n")
  print(harness.machine_report())
  print(f"- job: B=1 image, T={_STEPS.value} DDIM steps, CFG {GUIDANCE}, residuals in the first "
        f"{_INJECT.value} steps, float32; median of {_REPEATS.value} interleaved calls after a "
        "warm-up")
  rows = [bench_size(s, _STEPS.value, _INJECT.value, _REPEATS.value) for s in _SIZES.value]
  print()
  print(harness.markdown_table(
      ["size", "latents", "UNet params", "T", "encode + inversion (s)",
       "ms / CFG UNet call (inv.)", "edit, apply weights (s)", "ms / CFG UNet call (edit)",
       "first edit call - median (~compile, s)", "max abs(z_rec - z0) / max abs(z0), K = T"], rows))


if __name__ == "__main__":
  app.run(main)
