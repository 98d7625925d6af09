"""One edit optimisation's problem, built in three steps: encode the edits' prompts, gather the
frozen networks and their parameters, and place the problem on the device mesh.

``disentangle.prepare`` composes them (after drawing x_T and the noise) and renders the
reference images.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax import mixing, models, noise, optimize, parallel, pipeline, schedule


class EncodedEdits(NamedTuple):
  """The K edits' prompts, encoded once: SD embeddings and CLIP text features."""

  prompts: pipeline.PromptPair  # c0, c1 [K, L, D]; uncond [L, D]
  text0: jax.Array  # [K, E] CLIP features of each c0
  text1: jax.Array  # [K, E] ... and of each c1


def encode_edits(model, loss_models, edits: Sequence, negative_prompt: str = "") -> EncodedEdits:
  """Every edit's c0 and c1 (``edits``: disentangle.EditSpec, each with prompt and
  target_prompt) and the shared unconditional ``negative_prompt`` through the SD text encoder,
  c0 and c1 through CLIP's, in one call each."""
  texts = [t for e in edits for t in (e.prompt, e.target_prompt)]
  emb, uncond = models.encode_with_negative(model, texts, negative_prompt, pairs=True)
  feats = loss_models_lib.encode_texts(loss_models, texts)
  prompts = pipeline.PromptPair(mixing.select(emb, slice(0, None, 2)),
                                mixing.select(emb, slice(1, None, 2)), uncond)
  return EncodedEdits(prompts, feats[0::2], feats[1::2])


# The last Networks built, by what they are made of (static modules, settings and apply
# functions; never parameters). Preparing again with the same model and loss networks (another
# prompt, a sweep, a notebook) gets the same Networks, and with them the compiled update and
# render programs, which are cached by their networks.
_NETWORKS: list[tuple[tuple, optimize.Networks]] = []
_NETWORKS_KEPT = 4


def _static_parts(model, loss_models) -> tuple:
  return (model.unet, model.vae, model.scaling_factor, model.config,
          model.schedule.prediction_type, model.vae_scale_factor, loss_models.clip_image_apply,
          loss_models.vgg_apply, loss_models.clip_image_size, loss_models.vgg_input_size)


def networks(model, loss_models) -> optimize.Networks:
  """The objective's networks (static apply functions): the same object for every call with
  equal modules, settings and loss apply functions."""
  key = _static_parts(model, loss_models)
  for known, nets in _NETWORKS:
    if known == key:
      return nets
  nets = optimize.Networks(
      eps=models.predictor(model),
      decode=models.make_decode_fn(model.vae, model.scaling_factor, model.config),
      clip_image=loss_models.clip_image_apply, vgg=loss_models.vgg_apply,
      clip_image_size=loss_models.clip_image_size, vgg_input_size=loss_models.vgg_input_size)
  _NETWORKS[:] = [(key, nets)] + _NETWORKS[:_NETWORKS_KEPT - 1]
  return nets


def frozen_networks(model, loss_models) -> tuple[optimize.Networks, dict]:
  """The objective's networks (``networks``) and their frozen parameters
  {"sd": {"unet", "vae"}, "clip", "vgg"}."""
  nets = networks(model, loss_models)
  params = {"sd": {"unet": model.params["unet"], "vae": model.params["vae"]},
            "clip": loss_models.params["clip"], "vgg": loss_models.params["vgg"]}
  return nets, params


def place(encoded: EncodedEdits, run: noise.RunNoise, group, guidance, tables,
          mesh) -> optimize.EditProblem:
  """The problem on the mesh: the batch padded to the mesh and sharded, the rest replicated
  (reference left None: it is rendered from the placed problem)."""
  n = run.x_T.shape[0]
  size = parallel.padded_size(n, mesh)
  return optimize.EditProblem(
      x_T=parallel.shard(parallel.pad_batch(run.x_T, size), mesh),
      noise=parallel.shard(parallel.pad_batch(run.noise, size, axis=1), mesh, axis=1),
      prompts=parallel.replicate(encoded.prompts, mesh),
      guidance=jnp.asarray(guidance, jnp.float32),
      tables=parallel.replicate(schedule.StepTables(*(jnp.asarray(t) for t in tables)), mesh),
      reference=None, text0=parallel.replicate(encoded.text0, mesh),
      text1=parallel.replicate(encoded.text1, mesh),
      mask=parallel.shard(parallel.mask(n, size), mesh),
      group=parallel.shard(parallel.pad_batch(jnp.asarray(group), size), mesh))
