"""Config sections shared by every program (imported by configs/*.py; run from the repo root)."""
import ml_collections
from ml_collections import config_dict

from disentangle_jax import errors


def model_config() -> ml_collections.ConfigDict:
  """The Stable Diffusion model section (-> models.ModelConfig)."""
  return ml_collections.ConfigDict(dict(
      path=config_dict.placeholder(str),  # SD v1.x dir (diffusers) or .safetensors/.ckpt; unset: tiny
      tokenizer_path=config_dict.placeholder(str),  # single file: dir of vocab.json + merges.txt
      config_path=config_dict.placeholder(str),  # single file: diffusers config dir, unset: SD v1
      allow_pickle=False,  # allow PyTorch .bin (pickle) weights; off by default: pickle can run code
      dtype="float32",  # compute dtype: float32 | bfloat16 | float64
      attention="standard",  # "standard" | "chunked" (memory-efficient) | "dot_product" (jax.nn)
      conv="fast",  # "fast" (custom-VJP conv) | "fast_hoisted" (+ flips out of the loop) | "xla"
      block_remat="none",  # remat inside UNet/VAE: "none" | "blocks" | "layers" (less memory)
      tiny_seed=0,  # seed of the built-in tiny random model
      torch_numerics=False,  # UNet numerics of diffusers' PyTorch UNet (exact GELU, eps 1e-6)
      tiny_family="",  # tiny random model: "" (SD 1.x layout) | sd2 | sdxl | sd3 | flux
  ))


def loss_models_config() -> ml_collections.ConfigDict:
  """The frozen loss networks (-> loss_models.LossModelConfig)."""
  return ml_collections.ConfigDict(dict(
      clip_path=config_dict.placeholder(str),  # CLIP ViT-B/32 dir (HF layout); unset = tiny random
      vgg_path=config_dict.placeholder(str),  # torchvision VGG16 .safetensors (.pth: allow_pickle)
      vgg_input_size=config_dict.placeholder(int),  # resize before VGG; unset: 224 (file) / 32 (tiny)
      allow_pickle=False,  # allow a pickled .pth VGG16 file
      tiny_seed=0,  # seed of the tiny random CLIP / VGG
  ))


def add_sampling(c: ml_collections.ConfigDict, sampler: bool = True) -> None:
  """The sampling settings (-> sampling.SamplingConfig, via launch/common.py's ``sampling``),
  added as top-level fields (--config.num_steps=10). ``sampler=False``: DDIM with eta = 0 fixed
  (real-image editing: the inversion's residuals replace the random noise)."""
  c.rng_seed = 0  # base key; each seed's key is fold_in(key(rng_seed), seed)
  c.num_steps = 50  # sampling steps T (one weight per step; weights files must match)
  c.guidance = 7.5  # classifier-free guidance scale
  c.negative_prompt = ""  # CFG's unconditional prompt ("" = none, the paper's); never mixed
  c.mesh = mesh_config()  # the device mesh every sampling program runs on
  if sampler:
    c.sampler = "ddim"  # "ddim" | "plms" (the reference release's; weights files must match)
    c.eta = 0.0  # DDIM stochasticity (the noise is fixed per seed either way)


def mesh_config() -> ml_collections.ConfigDict:
  """The device mesh, seeds x model (-> parallel.make_mesh, via launch/common.py's ``mesh``)."""
  return ml_collections.ConfigDict(dict(
      model=1,  # devices sharing one copy of the weights, each holding 1/model (1 = replicated)
  ))


def add_learning(c: ml_collections.ConfigDict, t_star: int, lambda_late: float) -> None:
  """The fields of learning lambda (-> disentangle.EditSpec), added as top-level fields;
  ``t_star`` is given for the paper's 50 steps. Call after ``add_sampling``."""
  # hard-switch initialisation: lambda = 0 for the first T* steps (default: the preset's T* of
  # 50 steps, scaled to num_steps)
  c.t_star = steps_of_50(c, t_star)
  c.lambda_late = lambda_late  # ... and lambda_late afterwards
  c.remat = "full"  # rematerialise each sampling step: "none" | "full" | "dots" | "dots_no_batch"
  c.faithful = False  # reproduce the release's quirks (uint8 reference, its CLIP resize, ...)
  c.loss = loss_config()
  c.optimizer = optimizer_config()
  c.checkpoint_every = 1  # iterations between checkpoints (resume after a kill)


def loss_config() -> ml_collections.ConfigDict:
  """The objective's weights (-> optimize.LossConfig)."""
  return ml_collections.ConfigDict(dict(
      beta=0.05,  # weight of the VGG content loss (0.03 for some attributes)
      preprocess="standard",  # CLIP preprocessing when not faithful: "standard" | "release"
  ))


def optimizer_config() -> ml_collections.ConfigDict:
  """The optimiser of lambda (-> optimize.OptimizerConfig)."""
  return ml_collections.ConfigDict(dict(
      name="adam",  # "adam" | "sgd" | "adamw"
      learning_rate=0.05,  # the paper's
      schedule="constant",  # "constant" | "cosine"
      iterations=10,  # the paper's
  ))


def steps_of_50(c: ml_collections.ConfigDict, steps: int):
  """A step count given for the paper's 50 steps that follows ``c.num_steps`` (rounded) until
  it is set explicitly: --config.num_steps=10 alone moves T* = 20 to 4."""
  return (c.get_ref("num_steps") * steps + 25) // 50


# Real-model settings by family (the model itself comes from --config.model.path; its family,
# prediction type and schedule are read from the folder): native image size in px.
SIZES = {
    "sd": 512,  # Stable Diffusion v1.x (the paper's)
    "sd2": 512,  # SD 2.x base (512 px, epsilon prediction)
    "sd21": 768,  # SD 2.1 (768 px, v-prediction)
    "sdxl": 1024,  # SDXL base (two text encoders, micro-conditioning)
    "sd35": 1024,  # SD 3.5 (MMDiT, flow matching, CLIP-L/G + T5; CFG with the negative prompt)
    "flux": 1024,  # Flux.1 (flow matching, CLIP-L + T5; guidance = distilled 3.5, no CFG)
}


# The size presets' sampling settings other than add_sampling's defaults: on Flux.1 the
# programs' `guidance` is FluxPipeline's guidance_scale, the distilled guidance its transformer
# embeds (Flux.1-dev's 3.5; unused by a model without a guidance embedding, e.g. schnell).
GUIDANCE = {"flux": 3.5}

# The flow presets' memory options. At 1024 px and T = 50 the lambda gradient needs 145 GiB
# (Flux.1-dev, f32) and 57 GiB (SD 3.5 medium) per device without block remat, 71 and 26 GiB
# with it and the chunked attention (benchmarks/memory_flow.md, XLA estimates): with these the
# presets fit one 80 GB GPU as they stand. On a GPU in bf16, model.attention=dot_product (cuDNN
# flash attention) is the faster choice.
MEMORY = {size: {"attention": "chunked", "block_remat": "layers"} for size in ("sd35", "flux")}


def native_size(c: ml_collections.ConfigDict, size: str) -> None:
  """Sets ``c.image_size`` to the SIZES entry ``size`` and, where GUIDANCE has one, its
  guidance, and where MEMORY has them, the model's memory options (call after
  ``add_sampling``)."""
  c.image_size = SIZES[size]
  if size in GUIDANCE:
    c.guidance = GUIDANCE[size]
  for field, value in MEMORY.get(size, {}).items():
    c.model[field] = value


def parse_preset_arg(arg: str, presets: dict, program: str,
                     sizes=tuple(SIZES)) -> tuple[str, str]:
  """"<preset>[,sd|,sd2|,sd21|,sdxl|,sd35|,flux]" (the part after ":" in --config) -> (preset
  name, "" or the size key of SIZES). ``sizes``: the suffixes this config knows (() for a config
  of one fixed model, which refuses every suffix instead of ignoring it)."""
  name, _, size = arg.partition(",")
  if name not in presets:
    raise errors.UserError(f"{program} has no preset {name!r}; presets: "
                     f"{', '.join(sorted(presets))}.")
  if size and size not in sizes:
    known = (f"use one of {', '.join(',' + s for s in sizes)}" if sizes else
             f"its model is fixed: write {program}:{name}")
    raise errors.UserError(f"{program}: unknown suffix {size!r} after the preset; {known}.")
  return name, size


def check_variant(arg: str, program: str) -> str:
  """A "tiny" | SIZES-key variant argument of a program without presets; returns it."""
  if arg != "tiny" and arg not in SIZES:
    raise errors.UserError(f"{program} has no variant {arg!r}: use 'tiny' or one of "
                           f"{', '.join(repr(s) for s in SIZES)}.")
  return arg
