r"""Seconds per optimisation iteration: our lambda gradient vs PyTorch autograd on the same weights.

The job of one iteration of the method without its loss networks: T steps of CFG (7.5) DDIM
(eta 0) from the same x_T with c_i = lam_i c1 + (1 - lam_i) c0, the VAE decoder, images
clipped to [0, 1], loss = mean((images - target)^2) for a fixed random target, and its
gradient w.r.t. lambda [T]. (The CLIP / VGG losses cost the same on both sides and are left
out, so the table measures the sampler and decoder.)

  ours (remat/conv[/block_remat]):  jax.jit(jax.value_and_grad(loss)) around pipeline.render
           with sampler.SamplerConfig("ddim", remat) and models.ModelConfig(conv=...,
           block_remat=...); "forward" is the jitted loss alone.
  pytorch autograd:  the same loop written with diffusers' UNet2DConditionModel and
           AutoencoderKL, loss.backward(); forward under torch.no_grad().
  pytorch checkpoint:  the same with each step under torch.utils.checkpoint (use_reentrant=False).

Weights: created by PyTorch and converted with the library's converter (shared_weights.py).
Before timing, the script checks that both sides give the same loss and gradient (relative
errors printed; it stops if they exceed --check_rtol). Threads: XLA and PyTorch use the CPUs
this process may run on (its affinity), so pin with taskset for a one-core row:

  taskset -c 0 python benchmarks/iteration.py                 # 1 core
  python benchmarks/iteration.py                              # all cores (2 on the dev VM)
  python benchmarks/iteration.py --quick                      # tiny, T=10, 2 repeats (~2 min)
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

import harness  # pylint: disable=g-bad-import-order

harness.quiet_libraries()
harness.add_repo_to_path()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils.checkpoint

from disentangle_jax import models, noise, pipeline, sampler, schedule
from shared_weights import SharedWeights, describe, size_configs
# pylint: enable=g-import-not-at-top,g-bad-import-order

_SIZES = flags.DEFINE_list("sizes", ["tiny", "mid"], "Model sizes: tiny, mid (see throughput.py).")
_STEPS = flags.DEFINE_list("steps", ["10", "50"], "Sampling step counts T.")
_OURS = flags.DEFINE_list(
    "ours", ["full/xla", "full/fast", "full/fast_hoisted", "none/fast", "full/fast/blocks"],
    "Our variants as remat/conv[/block_remat] (sampler.REMAT_POLICIES / model.conv / "
    "model.block_remat).")
_TORCH = flags.DEFINE_list("torch", ["autograd", "checkpoint"], "PyTorch rows.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row (median), interleaved.")
_MID_LATENT = flags.DEFINE_integer("mid_latent", 16, "Latent H = W of the mid-size model.")
_CHECK_RTOL = flags.DEFINE_float("check_rtol", 1e-2,
                                 "Max relative loss / gradient difference ours vs PyTorch.")
_QUICK = flags.DEFINE_bool("quick", False, "tiny, T=10, full/xla + full/fast + autograd, "
                           "2 repeats: a smoke run.")

GUIDANCE = 7.5
PROMPTS = ("a photo of person", "a photo of person smiling", "")


class Problem:
  """One size and T: shared weights, embeddings, x_T, tables, target, lambda."""

  def __init__(self, size: str, steps: int, mid_latent: int):
    unet_cfg, vae_cfg, latent = size_configs(size, mid_latent)
    self.shared = SharedWeights(unet_cfg, vae_cfg, latent)
    self.description = describe(unet_cfg, vae_cfg, latent, self.shared.sd.params)
    sd = self.shared.sd
    self.tables = schedule.step_tables(sd.schedule, steps)
    c0, c1, uncond = models.encode_prompts(sd, list(PROMPTS))
    self.prompts = pipeline.PromptPair(c0, c1, uncond)
    rn = noise.draw(jax.random.key(0), [0], (latent, latent, 4), self.tables.sigma)
    self.x_T, self.noise = rn.x_T, rn.noise
    size_px = latent * sd.vae_scale_factor
    self.target = jax.random.uniform(jax.random.key(1), (1, size_px, size_px, 3))
    self.lam = jnp.linspace(0.2, 0.9, steps)


def ours_program(problem: Problem, variant: str):
  """(jitted value_and_grad, jitted loss, their arguments after lambda) of one of our variants."""
  remat, conv, *rest = variant.split("/")
  config = models.ModelConfig(conv=conv, block_remat=rest[0] if rest else "none")
  sd = problem.shared.sd
  eps = models.make_eps_fn(sd.unet, config)
  decode = models.make_decode_fn(sd.vae, sd.scaling_factor, config)
  params = {"unet": sd.params["unet"], "vae": sd.params["vae"]}
  scfg = sampler.SamplerConfig("ddim", remat)

  def loss(lam, params, x_T, noise_, prompts, tables, target):
    images = pipeline.render(eps, decode, params, x_T, noise_, lam, prompts, GUIDANCE, tables,
                             scfg)
    return jnp.mean((images - target) ** 2)

  args = (params, problem.x_T, problem.noise, problem.prompts, problem.tables, problem.target)
  return jax.jit(jax.value_and_grad(loss)), jax.jit(loss), args


def ours(problem: Problem, variant: str):
  """(grad_fn, forward_fn, check_fn) of one of our variants; each call blocks until done."""
  grad, fwd, args = ours_program(problem, variant)
  return (lambda: jax.block_until_ready(grad(problem.lam, *args)),
          lambda: jax.block_until_ready(fwd(problem.lam, *args)),
          lambda: tuple(np.asarray(v) for v in grad(problem.lam, *args)))


def pytorch(problem: Problem, checkpoint: bool):
  """(grad_fn, forward_fn, check_fn) of the same loop in PyTorch (NCHW)."""
  sw, tb = problem.shared, problem.tables
  unet, vae, scaling = sw.torch_unet, sw.torch_vae, sw.sd.scaling_factor
  for p in list(unet.parameters()) + list(vae.parameters()):
    p.requires_grad_(False)
  c0, c1, uncond = (torch.from_numpy(np.array(e))[None] for e in problem.prompts)
  x_T = torch.from_numpy(np.array(problem.x_T)).permute(0, 3, 1, 2).contiguous()
  target = torch.from_numpy(np.array(problem.target)).permute(0, 3, 1, 2)
  coefs = [(int(t), float(a), float(ap)) for t, a, ap in zip(tb.timesteps, tb.alpha,
                                                               tb.alpha_prev)]

  def step(x, cond, t, a, a_prev):
    e = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
    e_u, e_c = e.chunk(2)
    e = e_u + GUIDANCE * (e_c - e_u)
    x0 = (x - (1 - a) ** 0.5 * e) / a ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e

  def loss_of(lam):
    x = x_T
    for i, (t, a, a_prev) in enumerate(coefs):
      cond = lam[i] * c1 + (1 - lam[i]) * c0
      if checkpoint:
        x = torch.utils.checkpoint.checkpoint(step, x, cond, t, a, a_prev, use_reentrant=False)
      else:
        x = step(x, cond, t, a, a_prev)
    images = (vae.decode(x / scaling).sample / 2 + 0.5).clamp(0, 1)
    return ((images - target) ** 2).mean()

  lam0 = torch.from_numpy(np.array(problem.lam))

  def grad():
    lam = lam0.clone().requires_grad_(True)
    value = loss_of(lam)
    value.backward()
    return value.detach().numpy(), lam.grad.numpy()

  def fwd():
    with torch.no_grad():
      return loss_of(lam0)
  return grad, fwd, grad


def _rel(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-30))


def bench(size: str, steps: int, ours_variants, torch_rows, repeats: int, check_rtol: float):
  problem = Problem(size, steps, _MID_LATENT.value)
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f"\n### `{size}`, T={steps}, {threads} thread(s): {problem.description}\n", flush=True)
  rows = {f"ours {v}": ours(problem, v) for v in ours_variants}
  rows.update({f"pytorch {r}": pytorch(problem, r == "checkpoint") for r in torch_rows})
  results = {name: fns[2]() for name, fns in rows.items()}
  ref_name = next(iter(results))
  for name, (value, grad) in results.items():
    errs = _rel(value, results[ref_name][0]), _rel(grad, results[ref_name][1])
    print(f"- check {name} vs {ref_name}: loss {float(value):.7g}, rel. diff loss {errs[0]:.1e}, "
          f"gradient {errs[1]:.1e}", flush=True)
    if max(errs) > check_rtol:
      sys.exit(f"error: {name} and {ref_name} disagree beyond --check_rtol={check_rtol}.")
  fns = {}
  for name, (grad, fwd, _) in rows.items():
    fns[name + " grad"], fns[name + " fwd"] = grad, fwd
  times = harness.interleaved_medians(fns, repeats)
  autograd = times.get("pytorch autograd grad")
  out = []
  for name in rows:
    g, f = times[name + " grad"], times[name + " fwd"]
    speedup = harness.median(autograd) / harness.median(g) if autograd else float("nan")
    out.append([size, steps, threads, name, harness.median(g), f"{min(g):.3g}-{max(g):.3g}",
                harness.median(f), harness.median(g) / harness.median(f), speedup])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sizes, steps, ours_variants, torch_rows, repeats = (
      _SIZES.value, [int(s) for s in _STEPS.value], _OURS.value, _TORCH.value, _REPEATS.value)
  if _QUICK.value:
    sizes, steps, ours_variants, torch_rows, repeats = (
        ["tiny"], [10], ["full/xla", "full/fast"], ["autograd"], 2)
  print("## Optimisation iteration: ours vs PyTorch autograd\n")
  print(harness.machine_report())
  print(f"- job: CFG {GUIDANCE} DDIM (eta 0), batch 1, VAE decode, mean squared error to a "
        f"random image, d/d lambda [T]; float32; median of {repeats} interleaved calls after "
        "a warm-up", flush=True)
  rows = []
  for size in sizes:
    for t in steps:
      rows += bench(size, t, ours_variants, torch_rows, repeats, _CHECK_RTOL.value)
  print()
  print(harness.markdown_table(
      ["size", "T", "threads", "implementation", "s/iteration (median)", "s/it (min-max)",
       "forward s", "gradient / forward", "PyTorch autograd s/it / this"], rows))


if __name__ == "__main__":
  app.run(main)
