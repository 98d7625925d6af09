"""SD 3.x and Flux.1 as a loaded model of the programs: a flow_folder.FlowModel inside the
``StableDiffusion`` bundle, so that every program runs these families from the same code.

The family is a property of the loaded model; the programs never look. The seams, each inside
the models package or the pipeline (nowhere else):

  sampler    ``models.predictor(model)`` is a ``FlowPredictor`` (static, hashable).
             ``pipeline.render_latents`` hands it the mixed per-step conditioning and it runs the
             flow-matching Euler sampler (flow_sampler.py) instead of sampler.sample. The DDIM
             tables the programs build from the bundle's schedule give only the step count T:
             the flow tables are the family's pipeline's (FlowModel.tables) for T steps and the
             latents' H x W, constants of the compiled program. The programs' noise
             [T, B, H, W, C] is added after each Euler step: zeros for text-to-image (eta = 0;
             eta > 0 is refused by flow_settings.py before loading), an inversion's residuals
             for a real image.
  inversion  ``inversion.make_invert_fn`` runs ``FlowPredictor.invert`` (the Euler inversion,
             flow_inversion.py) on inversion.invert's arguments, so launch.edit and the study's
             real images invert through the same code as the UNet families.
  guidance   SD 3.x: CFG with the negative-prompt embedding (StableDiffusion3Pipeline encodes ""
             like any prompt) and the programs' guidance scale. Flux.1: no CFG; the programs'
             guidance IS FluxPipeline's ``guidance_scale`` (diffusers' naming): the distilled
             guidance fed to the transformer's guidance embedding every call (Flux.1-dev: 3.5,
             the ``,flux`` presets' value; traced, so changing it never recompiles). A Flux
             model without that embedding (guidance_embeds=False, schnell-like) uses no
             guidance at all. True CFG for Flux stays library-level (flow_sampler.sample).
  decoder    the bundle's ``vae`` is a ``ShiftedVAE``: apply.make_decode_fn divides by the
             scaling factor and the wrapper adds the shift (VAE.decode(z / scaling + shift), as
             both pipelines decode); encoding gives (z - shift) * scaling.
  prompts    bundle.encode_prompts calls the FlowModel's token_ids + encode_fn (flow_text.py):
             {"tokens": [N, L, J], "pooled": [N, 1, P]}, mixed by mixing.mix with one lambda[i]
             for both leaves, as SDXL's. check_pairs compares the CLIP tokenizers' ids
             (``Family.tokenizers``).
  sizes      latents are H x W x 16, H and W multiples of the patch (2): ``FlowNet.downsampling``.

The bundle's ``unet`` is a ``FlowNet`` (the transformer's static description) and
``params["unet"]`` the transformer's weights, so the programs' parameter plumbing
(``params["sd"]["unet"]``, sharding, placement) is unchanged. The bundle's ``schedule`` is a
default DDIM ScheduleConfig that only counts steps (weights files record it; the sigmas that
ran are flow_schedule's for the loaded scheduler config).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from disentangle_jax import errors, flow_sampler, flow_schedule, flow_settings
from disentangle_jax import noise as noise_lib
from disentangle_jax import schedule as schedule_lib
from disentangle_jax.models import build
from disentangle_jax.models import family as family_lib
from disentangle_jax.models import flow_folder
from disentangle_jax.models import flux as flux_lib
from disentangle_jax.models import mmdit
from disentangle_jax.models.config import ModelConfig, compute_dtype

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # flow_folder checks the transformer and the VAE against it
# The families as programs see them: the CLIP encoders whose tokenizers check_pairs compares
# (the T5 encoder is named by flow_folder; it reads the same words, longer).
SD3 = family_lib.Family("sd3", ("text_encoder", "text_encoder_2"), hidden_layer=-2, pooled=True)
FLUX = family_lib.Family("flux", ("text_encoder",), pooled=True)
FAMILIES = {"sd3": SD3, "flux": FLUX}
# ModelConfig.attention -> dit_layers' attention: "standard" is the plain softmax of the
# reference einsums, "chunked" the same math over query blocks (no [S, S] scores held whole,
# forward or backward), "dot_product" jax.nn.dot_product_attention (a GPU's fused kernel).
_ATTENTION = {"standard": "reference", "chunked": "chunked", "dot_product": "dot_product"}


@dataclasses.dataclass(frozen=True)
class FlowNet:
  """The transformer of a flow model, as the bundle's ``unet``: static and hashable."""

  family: str  # "sd3" | "flux"
  transformer_config: Any  # mmdit.MMDiTConfig | flux.FluxConfig
  schedule: flow_schedule.FlowScheduleConfig

  @property
  def downsampling(self) -> int:
    """Latent pixels per image token side: SD3's patch, Flux's 2 x 2 packing."""
    return self.transformer_config.patch_size if self.family == "sd3" else 2

  @property
  def cfg(self) -> bool:
    """SD 3.x guides with CFG; Flux.1 (guidance-distilled) does not."""
    return self.family == "sd3"

  def tables(self, num_steps: int, height: int, width: int) -> flow_schedule.FlowTables:
    return flow_schedule.tables(self.schedule, num_steps, self.family,
                                seq_len=flow_schedule.image_seq_len(height, width,
                                                                    self.downsampling))


@dataclasses.dataclass(frozen=True)
class FlowPredictor:
  """``models.predictor`` of a flow model: the flow sampler with the model's run options
  (module docstring). Not a noise predictor: calling it is refused by name."""

  net: FlowNet
  remat: bool = False
  attention: str = "dot_product"
  dtype: Any = np.float32

  def velocity_fn(self) -> flow_sampler.VelocityFn:
    cfg = self.net.transformer_config
    if self.net.family == "sd3":
      return flow_sampler.sd3_velocity_fn(mmdit.MMDiT(cfg, self.remat, self.attention,
                                                      self.dtype))
    return flow_sampler.flux_velocity_fn(flux_lib.Flux(cfg, self.remat, self.attention,
                                                       self.dtype))

  def guidance_args(self, guidance):
    """(CFG scale, embedded guidance) of the programs' ``guidance``: SD 3.x's CFG scale, or
    Flux.1's distilled guidance (module docstring; unused by Flux without guidance_embeds)."""
    return (guidance, 0.0) if self.net.cfg else (1.0, guidance)

  def sample(self, params, x_T, noise, cond, uncond, guidance, tables, config):
    """sampler.sample's contract (``tables``: schedule.StepTables, for T only; ``config``:
    sampler.SamplerConfig, for its step remat) through the flow sampler; ``noise`` [T, B, H, W,
    C] is added after each step; ``guidance`` []: ``guidance_args`` (module docstring)."""
    if config.kind != "ddim":
      raise errors.UserError(f"sampler={config.kind!r} does not apply to the {self.net.family} "
                             "model: it samples with the flow-matching Euler sampler; leave "
                             "sampler at 'ddim'.")
    num_steps = int(np.shape(tables.timesteps)[0])
    flow_tables = self.net.tables(num_steps, int(x_T.shape[1]), int(x_T.shape[2]))
    guidance, embedded = self.guidance_args(guidance)
    return flow_sampler.sample(
        self.velocity_fn(), params, x_T, cond, uncond, guidance, flow_tables,
        flow_sampler.FlowSamplerConfig(cfg=self.net.cfg, remat=config.remat),
        embedded_guidance=embedded, noise=noise)

  def invert(self, params, z0, eps, cond, uncond, guidance, tables, inject_steps,
             pin: str = "next") -> noise_lib.RunNoise:
    """inversion.invert's contract through the Euler inversion (flow_inversion.invert): z0
    [B, H, W, C] -> RunNoise(x_T, noise [T, B, H, W, C]) for ``sample``.

    ``eps``: target_noise [T, B, H, W, C]; the rectified-flow path xf(s) = (1 - s) z0 + s eps
    has one eps per seed, its first draw (its own stream: independent of the seed's x_T).
    ``cond``: c0, leaves [L, D] or [B, L, D], the same at every step. ``tables``: the DDIM
    tables, for T only. ``pin``: "next" only (flow_settings.check refuses the other)."""
    # flow_sampler imports the models package (its transformers), which imports this module:
    # flow_inversion's defaults need flow_sampler complete, so it is imported when first used.
    from disentangle_jax import flow_inversion  # noqa: PLC0415
    if pin != "next":
      raise errors.UserError(f"pin={pin!r} does not apply to the {self.net.family} model: its "
                             "Euler inversion pins to the next level only; set pin='next'.")
    num_steps = int(np.shape(tables.timesteps)[0])
    flow_tables = self.net.tables(num_steps, int(z0.shape[1]), int(z0.shape[2]))
    per_step = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_steps,) + leaf.shape),
                            cond)
    guidance, embedded = self.guidance_args(guidance)
    x_T, noise = flow_inversion.invert(
        self.velocity_fn(), params, z0, eps[0], per_step, uncond, guidance, flow_tables,
        flow_sampler.FlowSamplerConfig(cfg=self.net.cfg), embedded_guidance=embedded,
        inject_steps=inject_steps)
    return noise_lib.RunNoise(x_T=x_T, noise=noise)

  def __call__(self, *args):
    raise errors.UserError(
        f"the {self.net.family} model is a flow-matching transformer: the programs run it "
        "through pipeline.render (FlowPredictor.sample) and inversion.make_invert_fn "
        "(FlowPredictor.invert), not as a noise predictor.")


def schedule_record(model, num_steps: int, latent_hw) -> dict:
  """The weights file's "schedule" entry of a flow run of ``num_steps`` on latents ``latent_hw``
  (H, W): the flow schedule that ran (flow_settings.schedule_record)."""
  net = model.unet
  tables = net.tables(num_steps, *latent_hw)
  sigmas = np.concatenate([tables.sigma, tables.sigma_next[-1:]])
  return flow_settings.schedule_record(net.family, net.schedule, sigmas, latent_hw)


def predictor(model) -> FlowPredictor:
  """The FlowPredictor of a loaded flow bundle with its ModelConfig's run options."""
  config = model.config
  return FlowPredictor(model.unet, remat=config.block_remat != "none",
                       attention=_ATTENTION[config.attention], dtype=compute_dtype(config))


@dataclasses.dataclass(frozen=True, eq=False)
class ShiftedVAE:
  """The 16-channel VAE with its shift factor, as the bundle's ``vae``: apply.make_decode_fn
  and make_encode_fn run it as the UNet families' VAE (module docstring)."""

  vae: Any  # diffusers FlaxAutoencoderKL
  shift_factor: float

  @property
  def config(self):
    return self.vae.config

  @property
  def dtype(self):
    return self.vae.dtype

  def apply(self, variables, x, method: str):
    if method == "decode":
      return self.vae.apply(variables, x + self.shift_factor, method="decode")
    if method == "encode":
      out = self.vae.apply(variables, x, method="encode")
      dist = out.latent_dist
      return _Encoded(_Shifted(dist.mean - self.shift_factor, dist.std))
    raise ValueError(f"ShiftedVAE.apply: method={method!r} is not 'decode' or 'encode'.")

  def __eq__(self, other):
    return (isinstance(other, ShiftedVAE) and other.vae == self.vae
            and other.shift_factor == self.shift_factor)

  def __hash__(self):
    return hash((id(self.vae), self.shift_factor))


@dataclasses.dataclass(frozen=True)
class _Shifted:
  mean: Any
  std: Any


@dataclasses.dataclass(frozen=True)
class _Encoded:
  latent_dist: _Shifted


def bundle(flow, params: dict, config: ModelConfig, latent_size: int):
  """The StableDiffusion bundle of a flow_folder.FlowModel ``flow`` (its modules, tokenizers,
  configs) with device weights ``params`` {"transformer", "vae", "text_encoder", ...}."""
  from disentangle_jax.models.bundle import StableDiffusion  # noqa: PLC0415 (bundle imports us)
  fam = FAMILIES[flow.family]
  dtype = compute_dtype(config)
  vae = flow.modules["vae"]
  sd_params = {("unet" if k == "transformer" else k): v for k, v in params.items()}
  sd_params = {k: build.to_device(v, vae.dtype if k == "vae" else dtype)
               for k, v in sd_params.items()}
  return StableDiffusion(
      unet=FlowNet(flow.family, flow.transformer_config, flow.schedule),
      vae=ShiftedVAE(vae, flow.vae_shift_factor),
      text_encoder=flow.modules["text_encoder"], tokenizer=flow.tokenizers["tokenizer"],
      params=sd_params, schedule=schedule_lib.ScheduleConfig(),
      latent_channels=LATENT_CHANNELS,
      latent_size=latent_size, vae_scale_factor=build.vae_scale_factor(vae.config),
      scaling_factor=flow.vae_scaling_factor, config=config, family=fam,
      text_encoder_2=flow.modules.get("text_encoder_2") if flow.family == "sd3" else None,
      tokenizer_2=flow.tokenizers.get("tokenizer_2") if flow.family == "sd3" else None,
      flow=dataclasses.replace(flow, params=None))


def encode_prompts(model, prompts):
  """{"tokens": [N, L, J], "pooled": [N, 1, P]} of ``prompts`` through the flow model's
  encoders (one jitted program per loaded model)."""
  flow = model.flow
  fn = _ENCODE_FNS.get(flow)
  if fn is None:
    fn = _ENCODE_FNS[flow] = jax.jit(flow.encode_fn())
  names = [n for n in model.params if n.startswith("text_encoder")]
  return fn({n: model.params[n] for n in names}, *flow.token_ids(list(prompts)))


_ENCODE_FNS: dict = {}


def is_flow_folder(path: str) -> bool:
  """Whether ``path``'s model_index.json names a pipeline of these families (the supported ones
  and those flow_folder refuses by name), so that flow_folder reads and checks it."""
  name = flow_settings.pipeline_class(path)  # None: folder.py reports the file by name
  return name in flow_folder.PIPELINES or name in flow_folder.REFUSED_PIPELINES


def load_folder(config: ModelConfig):
  """The bundle of a StableDiffusion3Pipeline / FluxPipeline folder (flow_folder.load; its
  refusals are one user-error line naming the file and the field). Default size: SD 3.x's
  transformer sample_size, Flux.1's native 1024 px (128 latents)."""
  flow = flow_folder.load(os.path.expanduser(config.path))
  cfg = flow.transformer_config
  if flow.family == "flux" and not cfg.guidance_embeds:
    logger.warning("%s: this Flux transformer has no guidance embedding (guidance_embeds=False, "
                   "schnell-like): the programs' guidance is not used.", config.path)
  latent_size = cfg.sample_size if flow.family == "sd3" else FLUX_LATENT_SIZE
  return bundle(flow, flow.params, config, latent_size)


FLUX_LATENT_SIZE = 128  # 1024 px, FluxPipeline's default (its transformer config has no size)
