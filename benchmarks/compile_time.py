r"""Compile time of the jitted sampler + decoder at T = 10 vs T = 50 steps (tiny model).

The sampler is a ``jax.lax.scan`` over steps, so the program (and its compile time) should not
grow with T. Programs measured, each as ``jax.jit(f).lower(*args)`` (trace + lower to
StableHLO) and ``.compile()`` (XLA), with a fresh function object per measurement so no cache
hits, after one untimed warm-up compile, repeats interleaved over T:

  forward:        pipeline.render (CFG DDIM scan + VAE decode), remat "none".
  value_and_grad: d/d lambda of mean(render(...)), step remat "full" (jax.checkpoint around the
                  scan body).
  flax pipeline:  diffusers' FlaxStableDiffusionPipeline's pmapped _generate (fori_loop), for
                  contrast (--flax_pipeline).

Usage:
  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error \
      python benchmarks/compile_time.py --steps=10,50 --repeats=3
"""
from __future__ import annotations

import functools
import time

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
from diffusers.pipelines.stable_diffusion import pipeline_flax_stable_diffusion

from disentangle_jax import models, noise, pipeline, sampler, schedule
# pylint: enable=g-import-not-at-top,g-bad-import-order

_STEPS = flags.DEFINE_list("steps", ["10", "50"], "Step counts T to compare (first = baseline).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measurements per program and T (median).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch B.")
_LATENT = flags.DEFINE_integer("latent", 8, "Latent H = W of the tiny model.")
_FLAX_PIPELINE = flags.DEFINE_bool("flax_pipeline", True,
                                   "Also time diffusers' Flax pipeline compile.")

GUIDANCE = 7.5


def inputs(sd, steps: int, batch: int):
  """Concrete arguments of render(params, x_T, noise, lam, prompts, guidance, tables)."""
  tables = schedule.step_tables(sd.schedule, steps)
  shape = (sd.latent_size, sd.latent_size, sd.latent_channels)
  rn = noise.draw(jax.random.PRNGKey(0), np.arange(batch), shape, tables.sigma)
  c0, c1, uncond = models.encode_prompts(sd, ["a photo of person", "a photo of person smiling",
                                              ""])
  params = {"unet": sd.params["unet"], "vae": sd.params["vae"]}
  lam = jnp.asarray(np.linspace(0, 1, steps, dtype=np.float32))
  return (params, rn.x_T, rn.noise, lam, pipeline.PromptPair(c0, c1, uncond), GUIDANCE, tables)


def forward_program(sd):
  """A fresh jitted render (new closures, new jit object: nothing cached)."""
  return jax.jit(functools.partial(
      pipeline.render, models.make_eps_fn(sd.unet),
      models.make_decode_fn(sd.vae, sd.scaling_factor), config=sampler.SamplerConfig("ddim")))


def grad_program(sd):
  """A fresh jitted value_and_grad of mean(render) w.r.t. lambda, step remat "full"."""
  render = functools.partial(
      pipeline.render, models.make_eps_fn(sd.unet),
      models.make_decode_fn(sd.vae, sd.scaling_factor),
      config=sampler.SamplerConfig("ddim", remat="full"))

  def loss(lam, params, x_T, noise_, prompts, guidance, tables):
    return jnp.mean(render(params, x_T, noise_, lam, prompts, guidance, tables))

  grad = jax.value_and_grad(loss)

  def fn(params, x_T, noise_, lam, prompts, guidance, tables):
    return grad(lam, params, x_T, noise_, prompts, guidance, tables)
  return jax.jit(fn)


def time_jax(make_program, sd, args) -> tuple[float, float]:
  """(lower seconds, compile seconds) of a fresh program."""
  fn = make_program(sd)
  start = time.perf_counter()
  lowered = fn.lower(*args)
  mid = time.perf_counter()
  lowered.compile()
  return mid - start, time.perf_counter() - mid


class FlaxPipelineProgram:
  """diffusers' pmapped ``_generate`` for the same tiny model (lower + compile)."""

  def __init__(self, sd, batch: int):
    self.sd = sd
    self.scheduler = diffusers.FlaxDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1)
    self.params = flax.jax_utils.replicate({
        "unet": sd.params["unet"], "vae": sd.params["vae"],
        "text_encoder": sd.params["text_encoder"],
        "scheduler": self.scheduler.create_state()})
    self.size = sd.latent_size * sd.vae_scale_factor
    self.batch = batch

  def time(self, steps: int) -> tuple[float, float]:
    sd = self.sd
    pipe = diffusers.FlaxStableDiffusionPipeline(  # a new static argument: no cache hit
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=self.scheduler, safety_checker=None, feature_extractor=None)
    ids = common_utils.shard(pipe.prepare_inputs(["a photo of person smiling"] * self.batch))
    rng = jax.random.split(jax.random.PRNGKey(0), jax.local_device_count())
    guidance = jnp.full((jax.local_device_count(), 1), GUIDANCE)
    start = time.perf_counter()
    lowered = pipeline_flax_stable_diffusion._p_generate.lower(  # pylint: disable=protected-access
        pipe, ids, self.params, rng, steps, self.size, self.size, guidance, None, None)
    mid = time.perf_counter()
    lowered.compile()
    return mid - start, time.perf_counter() - mid


def measure(programs: dict, steps_list, repeats: int) -> dict:
  """{(program, T): [(lower s, compile s), ...]}, repeats interleaved over programs and T."""
  results = {(name, t): [] for name in programs for t in steps_list}
  for _ in range(repeats):
    for name, timer in programs.items():
      for t in steps_list:
        results[(name, t)].append(timer(t))
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  steps_list = [int(s) for s in _STEPS.value]
  sd = models.build_tiny(models.ModelConfig(tiny_latent_size=_LATENT.value))
  args = {t: inputs(sd, t, _BATCH.value) for t in steps_list}
  programs = {
      "forward (render)": lambda t: time_jax(forward_program, sd, args[t]),
      "value_and_grad wrt lambda, remat full": lambda t: time_jax(grad_program, sd, args[t]),
  }
  if _FLAX_PIPELINE.value:
    flax_pipe = FlaxPipelineProgram(sd, _BATCH.value)
    programs["diffusers FlaxStableDiffusionPipeline (pmap)"] = flax_pipe.time

  print("## Compile time vs step count\n")
  print(harness.machine_report())
  print(f"- tiny model, latents {_LATENT.value}x{_LATENT.value}x4, batch {_BATCH.value}, CFG "
        f"DDIM + VAE decode, float32; median of {_REPEATS.value} fresh compiles each, after one "
        "warm-up compile per program")
  for timer in programs.values():  # warm-up: first compiles in a process pay one-off costs
    timer(steps_list[0])
  results = measure(programs, steps_list, _REPEATS.value)

  base = steps_list[0]
  headers = ["program"]
  for t in steps_list:
    headers += [f"T={t} lower s", f"T={t} compile s", f"T={t} total s"]
  headers += [f"total T{t}/T{base}" for t in steps_list[1:]]
  rows = []
  for name in programs:
    row, totals = [name], {}
    for t in steps_list:
      lower = harness.median([r[0] for r in results[(name, t)]])
      comp = harness.median([r[1] for r in results[(name, t)]])
      totals[t] = harness.median([r[0] + r[1] for r in results[(name, t)]])
      row += [lower, comp, totals[t]]
    row += [totals[t] / totals[base] for t in steps_list[1:]]
    rows.append(row)
  print()
  print(harness.markdown_table(headers, rows))


if __name__ == "__main__":
  app.run(main)
