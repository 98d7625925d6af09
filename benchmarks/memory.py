r"""Peak memory of the lambda gradient at the real Stable Diffusion v1.x size, without weights.

The program is OUR code path: ``pipeline.render`` (``mixing.mix`` -> ``sampler.sample`` CFG DDIM
scan -> VAE decode) with ``models.make_eps_fn`` / ``models.make_decode_fn``, and

    loss(lambda) = mean(decode(sample(x_T, noise, lambda)))     value_and_grad w.r.t. lambda [T]

or, with --objective=full, the method's whole objective (``optimize.objective``: the same render,
then the directional CLIP loss through CLIP ViT-B/32 at 224 px and beta times the VGG16
perceptual loss at 224 px against a reference image)

at 512 x 512 (latents 64x64x4, text 77x768, batch 1, guidance 7.5). The UNet and VAE are built
from SD v1.5's published config.json values with abstract parameters (``jax.eval_shape``), and
the program is only compiled: ``jax.jit(fn).lower(abstract args).compile()`` on XLA:CPU, whose
``memory_analysis()`` gives the buffer assignment (arguments = weights + inputs, temporaries =
the peak of everything else). XLA:CPU figures are estimates of a GPU/TPU run's needs, not
measurements on one. ``cost_analysis()`` counts a loop body once, whatever the trip count.

Variants (``--variants``):
  none            no rematerialisation (measured at --none_steps and extrapolated per step)
  step            jax.checkpoint around each sampling step (SamplerConfig remat="full")
  step_bf16       + bfloat16 modules and weights (latents and the sampler stay float32)
  step_chunked    + chunked attention (use_memory_efficient_attention=True)
  step_bf16_chunked
  step_chunked_split, step_bf16_chunked_split
                  + the CFG batch of 2 run as two batch-1 UNet calls, each under its own
                  remat.recompute_in_backward (nested in the step's; plain jax.checkpoint
                  is merged back into the forward by XLA:CPU's CSE, see remat.py): the step's
                  backward holds one half's
                  activations at a time, for one extra UNet forward per step
  step_chunked_vae, step_bf16_chunked_vae   + remat.recompute_in_backward around the decoder
  step_chunked_blocks, step_chunked_layers, step_bf16_chunked_layers
                  + remat inside the UNet and the VAE decoder (model.block_remat "blocks":
                  per down/mid/up block and transformer block; "layers": per ResNet,
                  transformer and VAE attention block), see disentangle_jax/remat.py
  step_chunked_split_layers   the CFG split and "layers" together

Usage:
  DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error \
      python benchmarks/memory.py --steps=50 --variants=none,step,step_bf16_chunked
"""
from __future__ import annotations

import dataclasses
import functools
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
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from disentangle_jax import (loss_models, losses, models, optimize, pipeline, remat, sampler,
                             schedule)
from sd_configs import SCALING_FACTOR, SD15_UNET, SD15_VAE, SD21_UNET, SDXL_UNET, SDXL_VAE
# pylint: enable=g-import-not-at-top,g-bad-import-order

ALL_VARIANTS = ("none", "step", "step_bf16", "step_chunked", "step_bf16_chunked",
                "step_chunked_split", "step_bf16_chunked_split", "step_chunked_vae",
                "step_bf16_chunked_vae", "step_chunked_blocks", "step_chunked_layers",
                "step_bf16_chunked_layers", "step_chunked_split_layers")
DEFAULT_VARIANTS = ("none", "step", "step_chunked", "step_chunked_blocks", "step_chunked_layers")

_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps T of the remat variants.")
_NONE_STEPS = flags.DEFINE_list(
    "none_steps", ["2", "4"],
    "Step counts for the no-remat variant (its compile grows with T); the last two give the "
    "per-step growth used to extrapolate to --steps.")
_VARIANTS = flags.DEFINE_list("variants", list(DEFAULT_VARIANTS), f"Any of {ALL_VARIANTS}.")
COMPONENT_VARIANTS = {"f32": "step", "f32_chunked": "step_chunked", "bf16": "step_bf16",
                      "bf16_chunked": "step_bf16_chunked",
                      "f32_chunked_blocks": "step_chunked_blocks",
                      "f32_chunked_layers": "step_chunked_layers"}
_COMPONENTS = flags.DEFINE_list(
    "components", ["f32_chunked", "f32_chunked_layers"],
    f"Variants ({', '.join(COMPONENT_VARIANTS)}) whose parts are also compiled alone, to show "
    "where the peak comes from: the gradient through one CFG UNet call, through the VAE "
    "decoder and (--objective=full) through the CLIP + VGG losses. Empty to skip.")
_FAMILIES = flags.DEFINE_list(
    "families", [], "Also measure the lambda gradient (objective mean(images), step remat, "
    "chunked attention, float32 and bfloat16) at other families' native sizes: sd21 (768 px), "
    "sdxl (1024 px). Empty to skip.")
_TARGET_GIB = flags.DEFINE_float("target_gib", 6.0, "Target for weights + temporaries (GiB).")
_OBJECTIVE = flags.DEFINE_enum(
    "objective", "full", ["mean", "full"],
    "mean: mean(images); full: optimize.objective with CLIP ViT-B/32 and VGG16 losses.")

GUIDANCE = 7.5
CLIP_SIZE, CLIP_DIM, VGG_SIZE = 224, 512, losses.VGG_INPUT_SIZE  # CLIP ViT-B/32, VGG16
TEXT_LENGTH, TEXT_WIDTH = 77, 768
LATENT = 64  # latent H = W of 512 x 512 images

# The decoder is all the lambda gradient needs of the VAE.
_DECODER_PARAMS = ("decoder", "post_quant_conv")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  remat: str  # SamplerConfig.remat
  bf16: bool
  chunked: bool
  split_cfg: bool
  vae_remat: bool
  block_remat: str  # models.ModelConfig.block_remat

  @classmethod
  def parse(cls, name: str) -> "Variant":
    if name not in ALL_VARIANTS:
      raise ValueError(f"--variants has {name!r}; use any of {ALL_VARIANTS}.")
    return cls(name=name, remat="none" if name == "none" else "full", bf16="bf16" in name,
               chunked="chunked" in name, split_cfg="_split" in name,
               vae_remat=name.endswith("_vae"),
               block_remat=name.rsplit("_", 1)[1] if name.endswith(("_blocks", "_layers"))
               else "none")

  @property
  def model_config(self) -> models.ModelConfig:
    return models.ModelConfig(block_remat=self.block_remat)


def build_modules(variant: Variant):
  """(unet, vae, abstract params {"unet", "vae"}) at SD v1.5 size in the variant's dtype."""
  dtype = jnp.bfloat16 if variant.bf16 else jnp.float32
  unet = diffusers.FlaxUNet2DConditionModel.from_config(
      SD15_UNET, dtype=dtype, use_memory_efficient_attention=variant.chunked)
  vae = diffusers.FlaxAutoencoderKL.from_config(SD15_VAE, dtype=dtype)
  key = jax.random.PRNGKey(0)
  vae_shapes = jax.eval_shape(vae.init_weights, key)
  params = {"unet": jax.eval_shape(unet.init_weights, key),
            "vae": {k: vae_shapes[k] for k in _DECODER_PARAMS}}
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), params)
  return unet, vae, params


def abstract_inputs(steps: int, text_dtype):
  """Abstract (x_T, noise, lam, prompts, guidance) and numpy tables for T steps, batch 1."""
  latent = jax.ShapeDtypeStruct((1, LATENT, LATENT, 4), jnp.float32)
  noise = jax.ShapeDtypeStruct((steps, 1, LATENT, LATENT, 4), jnp.float32)
  lam = jax.ShapeDtypeStruct((steps,), jnp.float32)
  emb = jax.ShapeDtypeStruct((TEXT_LENGTH, TEXT_WIDTH), text_dtype)
  guidance = jax.ShapeDtypeStruct((), jnp.float32)
  tables = schedule.step_tables(schedule.ScheduleConfig(), steps)
  return latent, noise, lam, pipeline.PromptPair(emb, emb, emb), guidance, tables


def split_cfg(eps_fn):
  """eps_fn that runs its batch [2B] as two [B] calls, each rematerialised on its own."""
  half = remat.recompute_in_backward(eps_fn, skip_tie=(0,))

  def fn(params, x, t, emb):
    b = x.shape[0] // 2
    return jnp.concatenate([half(params, x[:b], t, emb[:b]), half(params, x[b:], t, emb[b:])])
  return fn


def loss_networks():
  """(clip image apply, vgg apply, abstract params {"clip", "vgg"}): CLIP ViT-B/32, VGG16."""
  clip_module, clip_flat = loss_models.clip_shapes(
      transformers.CLIPConfig())  # the defaults are ViT-B/32's
  clip_params = flax.traverse_util.unflatten_dict(clip_flat)
  vgg = loss_models.VGG16Features()
  vgg_params = jax.eval_shape(vgg.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, VGG_SIZE, VGG_SIZE, 3)))["params"]
  return (loss_models.make_clip_image_fn(clip_module), loss_models.make_vgg_fn(vgg),
          {"clip": clip_params, "vgg": vgg_params})


def grad_program(unet, vae, variant: Variant):
  """jit(value_and_grad of the objective w.r.t. lambda), our code path.

  mean: fn(lam, params {"unet", "vae"}, x_T, noise, prompts, guidance, tables);
  full: fn(lam, params {"sd", "clip", "vgg"}, EditProblem).
  """
  decode = models.make_decode_fn(vae, SCALING_FACTOR, variant.model_config)
  if variant.vae_remat:
    decode = remat.recompute_in_backward(decode, skip_tie=(0,))
  eps_fn = models.make_eps_fn(unet, variant.model_config)
  if variant.split_cfg:
    eps_fn = split_cfg(eps_fn)
  sampler_cfg = sampler.SamplerConfig("ddim", remat=variant.remat)
  if _OBJECTIVE.value == "full":
    clip_fn, vgg_fn, _ = loss_networks()
    nets = optimize.Networks(eps=eps_fn, decode=decode, clip_image=clip_fn, vgg=vgg_fn,
                             clip_image_size=CLIP_SIZE, vgg_input_size=VGG_SIZE)
    return jax.jit(jax.value_and_grad(
        lambda lam, params, problem: optimize.objective(
            lam, params, problem, nets, optimize.LossConfig(preprocess="standard"),
            sampler_cfg)[0]))
  render = functools.partial(pipeline.render, eps_fn, decode, config=sampler_cfg)

  def loss(lam, params, x_T, noise, prompts, guidance, tables):
    images = render(params, x_T, noise, lam, prompts, guidance, tables)
    return jnp.mean(images.astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss))


def full_problem(x_T, noise, prompts, guidance, tables) -> optimize.EditProblem:
  """An abstract EditProblem of one edit, batch 1."""
  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)
  emb = prompts.c0
  return optimize.EditProblem(
      x_T=x_T, noise=noise,
      prompts=pipeline.PromptPair(spec((1,) + emb.shape, emb.dtype),
                                  spec((1,) + emb.shape, emb.dtype), emb),
      guidance=guidance, tables=tables, reference=spec((1, 8 * LATENT, 8 * LATENT, 3)),
      text0=spec((1, CLIP_DIM)), text1=spec((1, CLIP_DIM)), mask=spec((1,)),
      group=spec((1,), jnp.int32))


def _flops(compiled_or_lowered) -> float:
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def measure(variant: Variant, steps: int) -> dict:
  """Compiles the variant's gradient program at T steps; returns its memory and cost stats."""
  unet, vae, params = build_modules(variant)
  x_T, noise, lam, prompts, guidance, tables = abstract_inputs(
      steps, jnp.bfloat16 if variant.bf16 else jnp.float32)
  fn = grad_program(unet, vae, variant)
  start = time.perf_counter()
  if _OBJECTIVE.value == "full":
    params = {"sd": params, **loss_networks()[2]}
    lowered = fn.lower(lam, params, full_problem(x_T, noise, prompts, guidance, tables))
  else:
    lowered = fn.lower(lam, params, x_T, noise, prompts, guidance, tables)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  return {
      "variant": variant.name, "steps": steps,
      "weights": sum(np.prod(p.shape) * p.dtype.itemsize for p in jax.tree.leaves(params)),
      "arguments": mem.argument_size_in_bytes, "temps": mem.temp_size_in_bytes,
      "outputs": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes,
      "flops": _flops(compiled), "seconds": seconds,
  }


def forward_flops() -> tuple[float, float]:
  """TFLOP of one CFG UNet call (batch 2) and one VAE decode at SD size, float32 (no compile)."""
  unet, vae, params = build_modules(Variant.parse("step"))
  eps_fn, decode = models.make_eps_fn(unet), models.make_decode_fn(vae, SCALING_FACTOR)
  x = jax.ShapeDtypeStruct((2, LATENT, LATENT, 4), jnp.float32)
  emb = jax.ShapeDtypeStruct((2, TEXT_LENGTH, TEXT_WIDTH), jnp.float32)
  unet_lowered = jax.jit(eps_fn).lower(params["unet"], x, jnp.int32(500), emb)
  vae_lowered = jax.jit(decode).lower(params["vae"], jax.ShapeDtypeStruct((1,) + x.shape[1:],
                                                                          jnp.float32))
  return _flops(unet_lowered) / 1e12, _flops(vae_lowered) / 1e12


def component_rows(name: str) -> list[list]:
  """Temporaries of the gradient through one CFG UNet call and through the decoder alone."""
  variant = Variant.parse(COMPONENT_VARIANTS[name])
  unet, vae, params = build_modules(variant)
  eps_fn = models.make_eps_fn(unet, variant.model_config)
  decode = models.make_decode_fn(vae, SCALING_FACTOR, variant.model_config)
  emb_dtype = jnp.bfloat16 if variant.bf16 else jnp.float32
  x = jax.ShapeDtypeStruct((2, LATENT, LATENT, 4), jnp.float32)
  emb = jax.ShapeDtypeStruct((2, TEXT_LENGTH, TEXT_WIDTH), emb_dtype)
  z = jax.ShapeDtypeStruct((1, LATENT, LATENT, 4), jnp.float32)
  parts = {
      "one CFG UNet call (batch 2), grad w.r.t. x and emb": (
          lambda x, emb, p: jnp.mean(eps_fn(p, x, 500, emb).astype(jnp.float32)),
          (x, emb, params["unet"]), (0, 1)),
      "VAE decoder, grad w.r.t. latents": (
          lambda z, p: jnp.mean(decode(p, z).astype(jnp.float32)), (z, params["vae"]), 0),
  }
  if _OBJECTIVE.value == "full":
    clip_fn, vgg_fn, loss_params = loss_networks()
    images = jax.ShapeDtypeStruct((1, 8 * LATENT, 8 * LATENT, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((1, CLIP_DIM), jnp.float32)

    def loss_part(images, p, reference, text0, text1):
      f_ref, f_edit = (losses.clip_image_features(clip_fn, p["clip"], x, "standard", CLIP_SIZE)
                       for x in (reference, images))
      l_dir = losses.directional_clip_loss(f_ref, f_edit, text0, text1)
      return jnp.sum(l_dir + losses.vgg_perceptual_loss(vgg_fn, p["vgg"], images, reference,
                                                        VGG_SIZE))
    parts["CLIP + VGG losses, grad w.r.t. images"] = (
        loss_part, (images, loss_params, images, text, text), 0)
  rows = []
  for part, (fn, args, argnums) in parts.items():
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(fn, argnums=argnums)).lower(*args).compile()
    seconds = time.perf_counter() - start
    rows.append([name, part, harness.gib(compiled.memory_analysis().temp_size_in_bytes),
                 seconds])
  return rows


def row(stats: dict, note: str = "") -> list:
  w, t = harness.gib(stats["arguments"]), harness.gib(stats["temps"])
  return [stats["variant"], stats["steps"], w, t, w + t, harness.gib(stats["outputs"]),
          stats["flops"] / 1e12, stats["seconds"], note]


def none_rows(variant: Variant, steps: int) -> list[list]:
  """Rows of the no-remat variant at --none_steps, plus its extrapolation to ``steps``."""
  stats = [measure(variant, t) for t in (int(s) for s in _NONE_STEPS.value)]
  for s in stats:
    print(f"  measured {variant.name} at T={s['steps']} in {s['seconds']:.0f} s", flush=True)
  rows = [row(s) for s in stats]
  if len(stats) >= 2:
    a, b = stats[-2], stats[-1]
    per_step = (b["temps"] - a["temps"]) / (b["steps"] - a["steps"])
    extrapolated = dict(b, steps=steps, temps=b["temps"] + per_step * (steps - b["steps"]),
                        seconds=float("nan"), flops=float("nan"))
    rows.append(row(extrapolated, f"extrapolated: +{harness.gib(per_step):.2f} GiB/step"))
  return rows


# Other families at their native size: (UNet config, VAE config, latent H = W, text
# conditioning shapes {leaf: (L, D)} or one (L, D)).
FAMILY_SIZES = {
    "sd21": (SD21_UNET, SD15_VAE, 96, (77, 1024)),
    "sdxl": (SDXL_UNET, SDXL_VAE, 128, {"tokens": (77, 2048), "pooled": (1, 1280)}),
}


def family_row(family: str, bf16: bool, steps: int) -> list:
  """One row: value_and_grad of mean(decode(sample)) w.r.t. lambda [T] at ``family``'s size
  (``models.make_eps_fn`` takes SDXL's pooled embedding and time ids), step remat + chunked
  attention, batch 1, abstract weights."""
  unet_cfg, vae_cfg, latent, text = FAMILY_SIZES[family]
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  unet = diffusers.FlaxUNet2DConditionModel.from_config(
      unet_cfg, dtype=dtype, use_memory_efficient_attention=True)
  vae = diffusers.FlaxAutoencoderKL.from_config(vae_cfg, dtype=jnp.float32 if family == "sdxl"
                                                else dtype)  # SDXL's VAE runs in float32
  key = jax.random.PRNGKey(0)
  vae_shapes = jax.eval_shape(vae.init_weights, key)
  params = {"unet": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                                 jax.eval_shape(unet.init_weights, key)),
            "vae": {k: vae_shapes[k] for k in _DECODER_PARAMS}}
  emb = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), text,
                     is_leaf=lambda x: isinstance(x, tuple))
  eps_fn = models.make_eps_fn(unet)
  decode = models.make_decode_fn(vae, vae_cfg["scaling_factor"])
  render = functools.partial(pipeline.render, eps_fn, decode,
                             config=sampler.SamplerConfig("ddim", remat="full"))

  def loss(lam, params, x_T, noise, prompts, guidance, tables):
    return jnp.mean(render(params, x_T, noise, lam, prompts, guidance, tables))

  x_T = jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32)
  noise = jax.ShapeDtypeStruct((steps, 1, latent, latent, 4), jnp.float32)
  lam = jax.ShapeDtypeStruct((steps,), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(
      lam, params, x_T, noise, pipeline.PromptPair(emb, emb, emb),
      jax.ShapeDtypeStruct((), jnp.float32), schedule.step_tables(schedule.ScheduleConfig(),
                                                                   steps)).compile()
  mem = compiled.memory_analysis()
  w, t = harness.gib(mem.argument_size_in_bytes), harness.gib(mem.temp_size_in_bytes)
  return [f"{family} {8 * latent} px {'bf16' if bf16 else 'f32'}", steps, w, t, w + t,
          time.perf_counter() - start]


def print_header(steps: int) -> None:
  print("## Peak memory of value_and_grad w.r.t. lambda, SD v1.5 size (XLA:CPU estimates)\n")
  print(harness.machine_report())
  print(f"- 512x512, latents 64x64x4, text 77x768, batch 1, CFG {GUIDANCE} DDIM + VAE decode, "
        "abstract weights (nothing allocated); 'weights' = argument buffers (UNet + VAE decoder "
        "params and the inputs); temporaries = XLA's temp allocation")
  if _OBJECTIVE.value == "full":
    print("- objective: optimize.objective (directional CLIP ViT-B/32 loss + 0.05 x VGG16 "
          "perceptual loss, both at 224 px, 'standard' preprocessing); the weights column "
          "includes CLIP (151 M params) and VGG16 features (14.7 M)")
  else:
    print("- objective: mean(images) (no loss networks)")
  unet_tflop, vae_tflop = forward_flops()
  print(f"- forward cost (cost_analysis of the lowered programs): one CFG UNet call (batch 2) "
        f"{unet_tflop:.2f} TFLOP, one VAE decode {vae_tflop:.2f} TFLOP; a {steps}-step sample "
        f"{steps * unet_tflop + vae_tflop:.1f} TFLOP. The 'TFLOP' column below is "
        "cost_analysis of the gradient program, which counts each loop body once.\n", flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    variants = [Variant.parse(v) for v in _VARIANTS.value]
  except ValueError as e:
    sys.exit(f"error: {e}")
  unknown = set(_COMPONENTS.value) - set(COMPONENT_VARIANTS)
  if unknown:
    sys.exit(f"error: --components has {sorted(unknown)}; use any of {list(COMPONENT_VARIANTS)}.")
  steps = _STEPS.value
  print_header(steps)

  rows, best = [], None
  for variant in variants:
    if variant.remat == "none":
      rows += none_rows(variant, steps)
      continue
    stats = measure(variant, steps)
    rows.append(row(stats))
    total = stats["arguments"] + stats["temps"]
    if best is None or total < best[1]:
      best = (variant.name, total)
    print(f"  measured {variant.name}: {harness.gib(total):.2f} GiB in {stats['seconds']:.0f} s",
          flush=True)
  print()
  print(harness.markdown_table(
      ["variant", "T", "weights GiB", "temporaries GiB", "weights+temporaries GiB",
       "outputs GiB", "TFLOP (loop bodies once)", "compile s", "note"], rows))
  if best is not None:
    verdict = "meets" if harness.gib(best[1]) <= _TARGET_GIB.value else "misses"
    print(f"\nBest variant: {best[0]} with {harness.gib(best[1]):.2f} GiB weights + temporaries: "
          f"{verdict} the target of <= {_TARGET_GIB.value:g} GiB (the reference release needs a "
          "48 GB GPU).")
  if any(v.bf16 for v in variants):
    print("\nNote: XLA:CPU has no native bfloat16 convolutions/matmuls and runs them in float32 "
          "(converts around each op), so its bf16 temporaries are NOT half of float32's; on "
          "GPU/TPU expect roughly half. The bf16 weights figure is exact.")
  if _FAMILIES.value:
    fam_rows = [family_row(f, bf16, steps) for f in _FAMILIES.value for bf16 in (False, True)]
    print("\n## Other families at their native size: lambda gradient of mean(images), step "
          "remat + chunked attention, batch 1\n")
    print(harness.markdown_table(["family", "T", "weights GiB", "temporaries GiB",
                                  "weights+temporaries GiB", "compile s"], fam_rows))
    print("\nbf16 rows: XLA:CPU runs bf16 convolutions/matmuls in float32 (converts around each "
          "op), so their temporaries are not half of float32's there; the weights are exact.")
  if _COMPONENTS.value:
    comp = [r for name in _COMPONENTS.value for r in component_rows(name)]
    print("\nWhere the peak comes from (each part's gradient compiled alone; the step-remat "
          "program cannot need much less than the larger of the two):\n")
    print(harness.markdown_table(["dtype/attention", "part", "temporaries GiB", "compile s"],
                                 comp))


if __name__ == "__main__":
  app.run(main)
