r"""One prepared accelerator run: memory and speed of the optimisation iteration at SD v1.5 size.

For each variant (dtype x remat) it builds Stable Diffusion v1.5's UNet and VAE, CLIP ViT-B/32
and VGG16 with random weights of the real shapes (no files, no network), and runs the real
optimisation step ``optimize.make_update_fn`` (T CFG DDIM steps -> VAE decode -> directional
CLIP + VGG losses -> d/d lambda -> Adam), 512x512, batch 1. It reports

  - peak device memory (``device.memory_stats()["peak_bytes_in_use"]``; where the backend has
    no memory stats, e.g. CPU, XLA's compile-time estimate arguments + temporaries instead),
  - compile seconds and the median seconds per iteration (after an untimed warm-up call),
  - sampling throughput (images/s of the jitted forward ``pipeline.make_render_fn``, batch
    --sample_batch, same T) for each dtype.

Variants: {f32,bf16}_{step,layers}: model.dtype float32 | bfloat16 (the mixed-precision policy:
bf16 weights and activations, float32 latents, schedule arithmetic and losses), with step remat
(SamplerConfig remat "full") alone or plus model.block_remat="layers". Attention (--attention
auto): "chunked" in float32, where jax.nn.dot_product_attention has no fused kernel and keeps
the 4096x4096 attention maps for the backward; "dot_product" in bf16 (cuDNN's fused flash
attention on GPUs). Each variant runs in its
own process so that peak memory is its own. With --jobs=N up to N variant processes run at once:
their compilations (CPU) overlap, while the timed sections take turns under a file lock, so a
timing never shares the accelerator (compile seconds then include CPU contention).

  python benchmarks/gpu.py --jobs=4              # SD v1.5 size, T=50, on one GPU
  python benchmarks/gpu.py --size=tiny --steps=2 --repeats=1 --in_process   # CPU smoke run
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

import harness  # pylint: disable=g-bad-import-order

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import diffusers
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from disentangle_jax import loss_models, losses, models, noise, optimize, pipeline, sampler
from disentangle_jax import schedule
from sd_configs import SCALING_FACTOR, SD15_UNET, SD15_VAE
# pylint: enable=g-import-not-at-top,g-bad-import-order

VARIANTS = ("f32_step", "f32_layers", "bf16_step", "bf16_layers")
_SIZE = flags.DEFINE_enum("size", "sd", ["sd", "tiny"], "sd: SD v1.5 at 512 px; tiny: smoke.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps T.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed iterations per variant after the first.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {VARIANTS}.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 4, "Images per sampling call (0: skip).")
_ATTENTION = flags.DEFINE_string(
    "attention", "auto",
    "model.attention of every run; auto: chunked for float32 (no fused kernel: dot_product "
    "keeps the 4096x4096 attention maps), dot_product for bf16 (cuDNN flash attention).")
_IN_PROCESS = flags.DEFINE_bool("in_process", False,
                                "Run variants in this process (peak memory is then cumulative).")
_JOBS = flags.DEFINE_integer("jobs", 1, "Variant processes at once (timed sections take turns).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one variant, print one JSON line.")
_LOCK = flags.DEFINE_string("lock", None, "Internal: the file lock the timed sections share.")


def _random_tree(shape_tree, dtype, seed: int):
  """Random weights of the shapes in ``shape_tree`` (models.build_tiny's recipe), in dtype."""
  params = noise.random_params(shape_tree, [seed])
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def build(size: str, config: models.ModelConfig):
  """(StableDiffusion-like pieces, Networks, params {"sd", "clip", "vgg"})."""
  dtype = models.DTYPES[config.dtype]
  if size == "tiny":
    sd = models.build_tiny(config)
    lm = loss_models.load_loss_models(tokenizer=sd.tokenizer)
    unet, vae, scaling, latent = sd.unet, sd.vae, sd.scaling_factor, sd.latent_size
    sd_params = {"unet": sd.params["unet"], "vae": sd.params["vae"]}
    clip_fn, vgg_fn, loss_params = lm.clip_image_apply, lm.vgg_apply, lm.params
    clip_size, vgg_size, text_dim = lm.clip_image_size, lm.vgg_input_size, None
  else:
    unet = diffusers.FlaxUNet2DConditionModel.from_config(
        SD15_UNET, dtype=dtype, use_memory_efficient_attention=config.attention == "chunked")
    vae = diffusers.FlaxAutoencoderKL.from_config(SD15_VAE, dtype=dtype)
    key = jax.random.PRNGKey(0)
    sd_params = {"unet": _random_tree(jax.eval_shape(unet.init_weights, key), dtype, 0),
                 "vae": _random_tree(jax.eval_shape(vae.init_weights, key), dtype, 1)}
    scaling, latent = SCALING_FACTOR, SD15_UNET["sample_size"]
    clip_module, clip_flat = loss_models.clip_shapes(
        transformers.CLIPConfig())  # ViT-B/32
    vgg = loss_models.VGG16Features()
    vgg_shapes = jax.eval_shape(vgg.init, key, jnp.zeros((1, 224, 224, 3)))["params"]
    loss_params = {"clip": _random_tree(flax.traverse_util.unflatten_dict(clip_flat),
                                        jnp.float32, 2),
                   "vgg": _random_tree(vgg_shapes, jnp.float32, 3)}
    clip_fn = loss_models.make_clip_image_fn(clip_module)
    vgg_fn = loss_models.make_vgg_fn(vgg)
    clip_size, vgg_size, text_dim = 224, losses.VGG_INPUT_SIZE, 512
  nets = optimize.Networks(
      eps=models.make_eps_fn(unet, config),
      decode=models.make_decode_fn(vae, scaling, config),
      clip_image=clip_fn, vgg=vgg_fn, clip_image_size=clip_size, vgg_input_size=vgg_size)
  text_dim = text_dim or int(jax.eval_shape(
      lambda p: clip_fn(p, jnp.zeros((1, clip_size, clip_size, 3))), loss_params["clip"]).shape[-1])
  emb_shape = (77, SD15_UNET["cross_attention_dim"] if size == "sd" else 32)
  return nets, {"sd": sd_params, **loss_params}, latent, emb_shape, text_dim, dtype


def problem(steps, latent, emb_shape, text_dim, dtype, batch=1) -> optimize.EditProblem:
  tables = schedule.step_tables(schedule.ScheduleConfig(), steps)
  rn = noise.draw(jax.random.key(0), np.arange(batch), (latent, latent, 4), tables.sigma)
  keys = jax.random.split(jax.random.key(1), 4)
  emb = jax.random.normal(keys[0], (3,) + emb_shape).astype(dtype)
  return optimize.EditProblem(
      x_T=rn.x_T, noise=rn.noise,
      prompts=pipeline.PromptPair(emb[0][None], emb[1][None], emb[2]),
      guidance=jnp.float32(7.5), tables=schedule.StepTables(*(jnp.asarray(t) for t in tables)),
      reference=jax.random.uniform(keys[1], (batch, 8 * latent, 8 * latent, 3)),
      text0=jax.random.normal(keys[2], (1, text_dim)),
      text1=jax.random.normal(keys[3], (1, text_dim)),
      mask=jnp.ones((batch,)), group=jnp.zeros((batch,), jnp.int32))


def _peak_bytes(compiled=None) -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device peak"
  if compiled is not None:
    mem = compiled.memory_analysis()
    return float(mem.argument_size_in_bytes + mem.temp_size_in_bytes), "XLA estimate"
  return float("nan"), "-"


@contextlib.contextmanager
def _accelerator_turn(path: str | None):
  """Holds the accelerator alone (an exclusive lock on ``path``) while timing; no-op if None."""
  if not path:
    yield
    return
  with open(path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_variant(name: str) -> dict:
  """Times the optimisation step (and sampling) of one variant."""
  dtype, remat = name.split("_")
  attention = _ATTENTION.value
  if attention == "auto":
    attention = "chunked" if dtype == "f32" else "dot_product"
  config = models.ModelConfig(dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
                              attention=attention,
                              block_remat="layers" if remat == "layers" else "none")
  nets, params, latent, emb_shape, text_dim, compute_dtype = build(_SIZE.value, config)
  prob = problem(_STEPS.value, latent, emb_shape, text_dim, compute_dtype)
  tx = optimize.make_optimizer(optimize.OptimizerConfig())
  sampler_cfg = sampler.SamplerConfig("ddim", "full")
  update = optimize.make_update_fn(nets, optimize.LossConfig(preprocess="standard"),
                                   sampler_cfg, tx)
  state = optimize.init_state(jnp.full((_STEPS.value,), 0.5), tx)
  start = time.perf_counter()
  compiled = update.lower(state, params, prob).compile()
  compile_s = time.perf_counter() - start
  sampling = None
  if _SAMPLE_BATCH.value and remat == "step":  # compiled here, outside the timed turn
    render = jax.jit(functools.partial(pipeline.render, nets.eps, nets.decode,
                                       config=sampler_cfg))
    sp = problem(_STEPS.value, latent, emb_shape, text_dim, compute_dtype, _SAMPLE_BATCH.value)
    args = (params["sd"], sp.x_T, sp.noise, jnp.full((_STEPS.value,), 0.5),
            pipeline.PromptPair(sp.prompts.c0[0], sp.prompts.c1[0], sp.prompts.uncond),
            sp.guidance, sp.tables)
    sampling = (render.lower(*args).compile(), args)
  with _accelerator_turn(_LOCK.value):
    times = []
    for _ in range(_REPEATS.value + 1):  # the first call (warm-up) is not timed
      start = time.perf_counter()
      state, metrics, _ = compiled(state, params, prob)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    times = times[1:]
    peak, peak_kind = _peak_bytes(compiled)
    mem = compiled.memory_analysis()
    result = {"variant": name, "attention": attention, "compile_s": compile_s,
              "s_per_it": float(np.median(times)),
              "peak_gib": peak / 2**30, "peak_kind": peak_kind,
              "xla_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30,
              "loss": float(metrics["loss"]), "finite": bool(jnp.isfinite(metrics["grad_norm"]))}
    if sampling is not None:
      render_compiled, args = sampling
      jax.block_until_ready(render_compiled(*args))
      start = time.perf_counter()
      jax.block_until_ready(render_compiled(*args))
      result["images_per_s"] = _SAMPLE_BATCH.value / (time.perf_counter() - start)
  return result


def _run_children(names, jobs: int):
  """Yields (name, result or None) as each variant's own process finishes, ``jobs`` at once."""
  args = [a for a in sys.argv[1:] if not a.startswith(("--child", "--lock"))]
  with tempfile.TemporaryDirectory() as tmp:
    lock = os.path.join(tmp, "accelerator.lock")
    pending, running = list(names), {}
    while pending or running:
      while pending and len(running) < max(jobs, 1):
        name = pending.pop(0)
        running[name] = subprocess.Popen(
            [sys.executable, sys.argv[0], *args, f"--child={name}", f"--lock={lock}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # Memory on demand: several variants share the device, and each peak is its own.
            env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
      time.sleep(1)
      for name, proc in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        out, err = proc.communicate()
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
          print(f"variant {name} failed (exit {proc.returncode}):\n{err[-3000:]}", flush=True)
          yield name, None
        else:
          yield name, json.loads(lines[-1][len("RESULT "):])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CHILD.value:
    print("RESULT " + json.dumps(run_variant(_CHILD.value)), flush=True)
    return
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    sys.exit(f"error: --variants has {sorted(unknown)}; use any of {VARIANTS}.")
  print(f"## Optimisation iteration on {jax.devices()[0].device_kind}, size {_SIZE.value}\n")
  print(harness.machine_report())
  print(f"- T={_STEPS.value} CFG DDIM, batch 1, 512 px (tiny: 64 px), full objective (CLIP + "
        f"VGG), Adam; median of {_REPEATS.value} iterations\n", flush=True)
  results = (((n, run_variant(n)) for n in _VARIANTS.value) if _IN_PROCESS.value
             else _run_children(_VARIANTS.value, _JOBS.value))
  by_name = {}
  for name, result in results:
    if result is not None:
      print(f"  {name}: {result}", flush=True)
      by_name[name] = result
  rows = [[name, r["attention"], r["peak_gib"], r["peak_kind"], r["xla_gib"], r["compile_s"],
           r["s_per_it"], r.get("images_per_s", float("nan")), r["finite"]]
          for name in _VARIANTS.value if (r := by_name.get(name))]
  print()
  print(harness.markdown_table(
      ["variant", "attention", "peak GiB", "peak from", "XLA args+temps GiB", "compile s",
       "s/iteration", "sampling images/s", "finite grad"], rows))


if __name__ == "__main__":
  app.run(main)
