"""Pure wrappers: diffusers' / transformers' Flax modules as functions of their weights.

Each closes over a static module and the static ``ModelConfig`` only, so jitted code never
captures weights:

  eps_fn(params["unet"], x [N,H,W,C], t [] or [N], emb [N,L,D]) -> eps [N,H,W,C]
  decode(params["vae"], latents [B,H,W,C]) -> images [B,8H,8W,3] in [0, 1]
  encode(params["vae"], images [B,h,w,3] in [0, 1], key=None) -> latents [B,h/8,w/8,C]
  text_fn(params["text_encoder"], ids [N,L] int32) -> embeddings [N,L,D]
  hidden_fn(params["text_encoder_2"], ids) -> (hidden_states[layer] [N,L,D], pooled [N,P] | None)

``predictor(model)`` is the eps_fn of a loaded model whatever its family (family.py): a
``sampler.Predictor`` for v-prediction, SDXL's pooled embedding and time ids as UNet inputs.

Shapes: B batch, N UNet batch (2B under CFG), H W C latent (NHWC), L tokens, D text width.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from disentangle_jax import attention as attention_lib
from disentangle_jax import fast_conv, library_logs, sampler, torch_numerics
from disentangle_jax import remat as remat_lib
from disentangle_jax.models import family as family_lib
from disentangle_jax.models import upsample
from disentangle_jax.models.build import vae_scale_factor
from disentangle_jax.models.config import ModelConfig


@contextlib.contextmanager
def run_options(config: ModelConfig):
  """Applies ``config``'s conv / block_remat / attention / torch_numerics options to diffusers'
  Flax modules.

  Flax method interceptors (fast_conv, remat, attention, torch_numerics modules) active while
  the wrapped ``apply`` traces; parameter trees are untouched. The upsamplers' gather-free
  ``upsample.intercept`` is always active (the same numbers, bit for bit).
  """
  interceptors = [remat_lib.interceptor(config.block_remat), upsample.intercept,
                  attention_lib.intercept if config.attention == "dot_product" else None,
                  fast_conv.intercept if config.conv in ("fast", "fast_hoisted") else None,
                  torch_numerics.intercept if config.torch_numerics else None]
  with contextlib.ExitStack() as stack:
    for interceptor in interceptors:
      if interceptor is not None:
        stack.enter_context(nn.intercept_methods(interceptor))
    yield


def make_eps_fn(unet, config: ModelConfig = ModelConfig(), prediction_type: str = "epsilon",
                vae_factor: int = 8) -> Callable:
  """Wraps the UNet as eps_fn(params, x [N,H,W,C], t [] or [N] int, emb [N,L,D]) -> [N,H,W,C].

  Closes over the module and the static ``config`` (its conv / block_remat / attention run
  options) only. The output has the module's compute dtype. With conv "fast_hoisted" it has
  ``eps_fn.prepare = fast_conv.prepare``, which the sampler applies to the params once, outside
  its scan (``sampler.prepare_params``); eps_fn accepts params with or without it. An SDXL
  UNet (addition_embed_type "text_time") takes emb = {"tokens": [N,L,D], "pooled": [N,1,P]}
  and the time ids of an image of (H, W) * ``vae_factor`` px (family.time_ids). With
  ``prediction_type="v_prediction"`` the result is a ``sampler.Predictor`` (the sampler
  converts v).
  """
  text_time = unet.addition_embed_type == "text_time"

  @library_logs.quietly
  def eps_fn(params, x, t, emb):
    tokens = emb["tokens"] if text_time else emb
    if x.ndim != 4 or tokens.ndim != 3 or tokens.shape[0] != x.shape[0]:
      raise ValueError(f"eps_fn needs x [N, H, W, C] and emb [N, L, D] with the same N; got x "
                       f"{tuple(x.shape)} and emb {tuple(tokens.shape)}.")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    extra = {}
    if text_time:
      ids = family_lib.time_ids(x.shape[1] * vae_factor, x.shape[2] * vae_factor)
      extra["added_cond_kwargs"] = {
          "text_embeds": emb["pooled"][:, 0],
          "time_ids": jnp.broadcast_to(jnp.asarray(ids, emb["pooled"].dtype),
                                       (x.shape[0], len(ids)))}
    with run_options(config):
      out = unet.apply({"params": params}, jnp.transpose(x, (0, 3, 1, 2)), t, tokens,
                       **extra).sample
    return jnp.transpose(out, (0, 2, 3, 1))
  if config.conv == "fast_hoisted":
    eps_fn.prepare = fast_conv.prepare
  if prediction_type == "epsilon":
    return eps_fn
  return sampler.Predictor(eps_fn, prediction_type)


def predictor(model) -> Callable:
  """The noise predictor of a loaded ``StableDiffusion`` (its prediction type, its family's
  UNet inputs, its run options): what programs pass to the sampler and the inversion. For SD 3.x
  / Flux.1 the flow sampler itself (flow_bundle.FlowPredictor, run by pipeline.render_latents)."""
  if getattr(model, "flow", None) is not None:
    from disentangle_jax.models import flow_bundle  # noqa: PLC0415 (flow_bundle imports build)
    return flow_bundle.predictor(model)
  return make_eps_fn(model.unet, model.config, model.schedule.prediction_type,
                     model.vae_scale_factor)


def weights_record(model, sampling, latent_hw) -> tuple[str, Any]:
  """(sampler, schedule) of a weights file learned on a loaded ``StableDiffusion`` with
  ``sampling`` (a sampling.SamplingConfig) on latents ``latent_hw`` (H, W): the config's sampler
  and the model's DDIM ScheduleConfig, or for SD 3.x / Flux.1 flow_settings.SAMPLER and the flow
  schedule that ran (flow_bundle.schedule_record), for weights_file.learned."""
  if getattr(model, "flow", None) is not None:
    from disentangle_jax import flow_settings  # noqa: PLC0415
    from disentangle_jax.models import flow_bundle  # noqa: PLC0415 (flow_bundle imports build)
    return flow_settings.SAMPLER, flow_bundle.schedule_record(model, sampling.num_steps,
                                                              latent_hw)
  return sampling.kind, model.schedule


def decoder(model) -> Callable:
  """The VAE decoder of a loaded ``StableDiffusion`` (its latent scale, its run options):
  decode(params["vae"], latents [B, H, W, C]) -> images [B, h, w, 3] in [0, 1]
  (``make_decode_fn``). With ``predictor``, what ``pipeline.render`` takes."""
  return make_decode_fn(model.vae, model.scaling_factor, model.config)


def make_decode_fn(vae, scaling_factor: float, config: ModelConfig = ModelConfig()) -> Callable:
  """Wraps the VAE decoder as decode(params, latents [B,H,W,C]) -> images [B,8H,8W,3] in [0, 1].

  images = clip(VAE.decode(latents / scaling_factor) / 2 + 0.5, 0, 1), returned in float32 (or
  float64 for a float64 model) whatever the compute dtype: the losses stay in float32.
  """
  channels = vae.config.latent_channels

  @library_logs.quietly
  def decode(params, latents):
    if latents.ndim != 4 or latents.shape[-1] != channels:
      raise ValueError(f"decode needs latents [B, H, W, {channels}] (NHWC); got shape "
                       f"{tuple(latents.shape)}.")
    # FlaxAutoencoderKL.decode takes NHWC when the last axis has latent_channels entries.
    with run_options(config):
      x = vae.apply({"params": params}, latents / scaling_factor, method="decode").sample
    images = jnp.clip(jnp.transpose(x, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)
    return images.astype(jnp.promote_types(images.dtype, jnp.float32))
  return decode


def make_encode_fn(vae, scaling_factor: float, config: ModelConfig = ModelConfig()) -> Callable:
  """Wraps the VAE encoder as encode(params, images [B,h,w,3] in [0,1], key=None) -> latents.

  Returns [B, h/8, w/8, C] in float32 (float64 for a float64 model): the posterior mean (a
  posterior sample when ``key`` is given) times ``scaling_factor``. h and w must be multiples of
  the VAE scale factor (8).
  """
  factor = vae_scale_factor(vae.config)

  @library_logs.quietly
  def encode(params, images, key=None):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"encode needs images [B, h, w, 3] in [0, 1]; got shape "
                       f"{tuple(images.shape)}.")
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"encode needs image height and width divisible by {factor}; got "
                       f"{tuple(images.shape[1:3])}: resize or crop the image first.")
    x = jnp.transpose(images * 2 - 1, (0, 3, 1, 2))
    with run_options(config):
      dist = vae.apply({"params": params}, x, method="encode").latent_dist
    z = dist.mean
    if key is not None:
      z = z + dist.std * jax.random.normal(key, z.shape, z.dtype)
    z = z * scaling_factor
    return z.astype(jnp.promote_types(z.dtype, jnp.float32))
  return encode


def make_text_fn(text_encoder) -> Callable:
  """Wraps the CLIP text encoder as text_fn(params, ids [N,L] int32) -> last hidden state [N,L,D].

  No attention mask, as in Stable Diffusion's pipelines (CLIP's causal mask does the work).
  """
  module = text_encoder.module

  @library_logs.quietly
  def text_fn(params, ids):
    ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = module.apply({"params": params}, ids, jnp.ones_like(ids), positions)
    return out.last_hidden_state
  return text_fn


def make_hidden_fn(text_encoder, layer: int = -2) -> Callable:
  """Wraps a CLIP text encoder as hidden_fn(params, ids [N,L]) -> (hidden_states[layer]
  [N,L,D], pooled [N,P] or None).

  ``layer`` -2 is the penultimate layer's output (before the final layer norm: SDXL's token
  embeddings); pooled is a CLIPTextModelWithProjection's projected text_embeds, else None.
  """
  module = text_encoder.module

  @library_logs.quietly
  def hidden_fn(params, ids):
    ids = jnp.asarray(ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
    out = module.apply({"params": params}, ids, jnp.ones_like(ids), positions,
                       output_hidden_states=True)
    return out.hidden_states[layer], getattr(out, "text_embeds", None)
  return hidden_fn
