r"""Text-to-image sampling throughput: ours vs diffusers' Flax and PyTorch pipelines.

All three run the same job on the same weights: tokenize and encode the prompts, T steps of
CFG (7.5) DDIM with eta = 0 from the same x_T, VAE decode, images on the host as numpy.

  ours:    models.encode_prompts + noise.draw (jitted) + pipeline.make_render_fn (one jit:
           lax.scan sampler + decoder), lambda = 1 so c_i = c1 exactly.
  flax:    diffusers.FlaxStableDiffusionPipeline, jit=True (pmap over the one CPU device, params
           replicated), FlaxDDIMScheduler with SD v1 settings, safety checker off.
  pytorch: diffusers.StableDiffusionPipeline, DDIMScheduler with SD v1 settings, float32,
           torch.set_num_threads(n) for each n in --torch_threads (one row each).

The weights are created once by PyTorch (its default random init, seed 0) and converted with
``convert.torch_to_flax`` (the library's checkpoint path), so all three use identical weights;
the table reports each pipeline's max |image difference| from ours as a check. Compile time is
excluded (one untimed warm-up call each); repeats are interleaved round-robin.

Usage:
  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error \
      python benchmarks/throughput.py --steps=20 --batch=2 --repeats=5 --sizes=tiny,mid
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

import harness  # pylint: disable=g-bad-import-order

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import diffusers
import flax.jax_utils
from flax.training import common_utils
import jax
import jax.numpy as jnp
import numpy as np
import torch

from disentangle_jax import models, noise, pipeline, sampler, schedule
from shared_weights import SharedWeights, describe, size_configs
# pylint: enable=g-import-not-at-top,g-bad-import-order

_STEPS = flags.DEFINE_integer("steps", 20, "Sampling steps T (50 in the paper).")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per call (B; the UNet runs on 2B under CFG).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per implementation (median).")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "mid"], "Model sizes to run: tiny, mid.")
_IMPLS = flags.DEFINE_list("impls", ["ours", "flax", "pytorch"], "Implementations to time.")
_MID_LATENT = flags.DEFINE_integer("mid_latent", 16, "Latent H = W of the mid-size model.")
_TORCH_THREADS = flags.DEFINE_list(
    "torch_threads", ["1", "2"],
    "torch.set_num_threads values; one PyTorch row each (OpenMP suffers on a loaded machine).")

GUIDANCE = 7.5
PROMPT0 = "a photo of person"
PROMPT1 = "a photo of person smiling"  # lambda = 1 renders this prompt (c_i = c1)

# SD v1's scheduler_config.json, as DDIM.
_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def ours_fn(sd, steps: int, batch: int):
  """Our full text-to-image call; returns a function () -> images [B, h, w, 3] numpy."""
  render = pipeline.make_render_fn(models.make_eps_fn(sd.unet),
                                   models.make_decode_fn(sd.vae, sd.scaling_factor),
                                   sampler.SamplerConfig("ddim"))
  draw = jax.jit(noise.draw, static_argnums=(2,))
  tables = schedule.step_tables(sd.schedule, steps)
  params = {"unet": sd.params["unet"], "vae": sd.params["vae"]}
  lam = np.ones((steps,), np.float32)
  seeds = np.arange(batch)
  key = jax.random.PRNGKey(0)
  shape = (sd.latent_size, sd.latent_size, sd.latent_channels)

  def run():
    c0, c1, uncond = models.encode_prompts(sd, [PROMPT0, PROMPT1, ""])
    rn = draw(key, seeds, shape, tables.sigma)
    images = render(params, rn.x_T, rn.noise, lam, pipeline.PromptPair(c0, c1, uncond),
                    GUIDANCE, tables)
    return np.asarray(images)

  x_T = np.asarray(draw(key, seeds, shape, tables.sigma).x_T)
  return run, x_T


def flax_fn(sd, steps: int, batch: int, x_T_nchw: np.ndarray):
  """diffusers' FlaxStableDiffusionPipeline (jit=True, pmap over 1 device)."""
  scheduler = diffusers.FlaxDDIMScheduler(**_SD_SCHEDULER)
  pipe = diffusers.FlaxStableDiffusionPipeline(
      vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None)
  params = flax.jax_utils.replicate({
      "unet": sd.params["unet"], "vae": sd.params["vae"],
      "text_encoder": sd.params["text_encoder"], "scheduler": scheduler.create_state()})
  rng = jax.random.split(jax.random.PRNGKey(0), jax.local_device_count())
  latents = common_utils.shard(jnp.asarray(x_T_nchw))
  size = sd.latent_size * sd.vae_scale_factor

  def run():
    ids = common_utils.shard(pipe.prepare_inputs([PROMPT1] * batch))
    out = pipe(ids, params, rng, steps, height=size, width=size, guidance_scale=GUIDANCE,
               latents=latents, jit=True)
    return np.asarray(out.images).reshape((batch, size, size, 3))
  return run


def torch_fn(ms: SharedWeights, steps: int, batch: int, x_T_nchw: np.ndarray, threads: int):
  """diffusers' PyTorch StableDiffusionPipeline on the same weights, on ``threads`` threads."""
  sd = ms.sd
  pipe = diffusers.StableDiffusionPipeline(
      vae=ms.torch_vae, text_encoder=ms.torch_text, tokenizer=sd.tokenizer, unet=ms.torch_unet,
      scheduler=diffusers.DDIMScheduler(**_SD_SCHEDULER), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(x_T_nchw)
  size = sd.latent_size * sd.vae_scale_factor

  def run():
    torch.set_num_threads(threads)
    return pipe(prompt=[PROMPT1] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE,
                latents=latents, height=size, width=size, output_type="np", eta=0.0).images
  return run


def bench_size(size: str, steps: int, batch: int, repeats: int, impls) -> list[list]:
  unet_cfg, vae_cfg, latent = size_configs(size, _MID_LATENT.value)
  ms = SharedWeights(unet_cfg, vae_cfg, latent)
  print(f"\n### size `{size}`: {describe(unet_cfg, vae_cfg, latent, ms.sd.params)}\n")
  ours, x_T = ours_fn(ms.sd, steps, batch)
  x_T_nchw = np.ascontiguousarray(np.transpose(x_T, (0, 3, 1, 2)))
  fns = {"ours": ours}
  if "flax" in impls:
    fns["flax"] = flax_fn(ms.sd, steps, batch, x_T_nchw)
  if "pytorch" in impls:
    for threads in _TORCH_THREADS.value:
      fns[f"pytorch ({threads} thr)"] = torch_fn(ms, steps, batch, x_T_nchw, int(threads))
  with torch.inference_mode():
    reference = ours()
    diffs = {name: float(np.max(np.abs(fn() - reference))) for name, fn in fns.items()}
    times = harness.interleaved_medians(fns, repeats, warmup=0)  # the diff calls warmed up
  ours_s = harness.median(times["ours"])
  print("  " + ", ".join(f"{n}: {harness.median(t):.3g} s" for n, t in times.items()), flush=True)
  rows = []
  for name, ts in times.items():
    med = harness.median(ts)
    rows.append([size, name, batch / med, med, f"{ts[0]:.3g}-{ts[-1]:.3g}", med / ours_s,
                 diffs[name]])
  return rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = set(_IMPLS.value) - {"ours", "flax", "pytorch"}
  if unknown:
    sys.exit(f"error: --impls has {sorted(unknown)}; use ours, flax, pytorch.")
  bad_sizes = set(_SIZES.value) - {"tiny", "mid"}
  if bad_sizes:
    sys.exit(f"error: --sizes has {sorted(bad_sizes)}; use tiny, mid.")
  print("## Sampling throughput\n")
  print(harness.machine_report())
  print(f"- job: T={_STEPS.value} DDIM steps (eta 0), CFG {GUIDANCE}, batch {_BATCH.value}, "
        f"float32, VAE decode, median of {_REPEATS.value} interleaved calls after a warm-up; "
        f"PyTorch threads {','.join(_TORCH_THREADS.value)}")
  rows = []
  for size in _SIZES.value:
    rows += bench_size(size, _STEPS.value, _BATCH.value, _REPEATS.value, _IMPLS.value)
  print()
  print(harness.markdown_table(
      ["size", "implementation", "images/s", "s/call (median)", "s/call (min-max)",
       "ours speed-up (x)", "max abs image diff vs ours"], rows))


if __name__ == "__main__":
  app.run(main)
