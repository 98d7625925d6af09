"""One edit optimisation's problem, built in three steps: encode the edits' prompts, gather the
frozen networks and their parameters, and place the problem and the parameters on the device
mesh (``on_mesh``, also the way to move a prepared problem to another mesh).

``disentangle.prepare`` composes them (after drawing x_T and the noise) and renders the
reference images.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from disentangle_jax import loss_models as loss_models_lib
from disentangle_jax import mixing, models, noise, optimize, param_sharding, parallel, pipeline
from disentangle_jax import schedule


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


def problem(encoded: EncodedEdits, run: noise.RunNoise, group, guidance,
            tables) -> optimize.EditProblem:
  """The problem of ``run``'s B items, on no mesh yet (``on_mesh`` places it; reference None:
  it is rendered from the placed problem)."""
  n = run.x_T.shape[0]
  return optimize.EditProblem(
      x_T=run.x_T, noise=run.noise, prompts=encoded.prompts,
      guidance=jnp.asarray(guidance, jnp.float32),
      tables=schedule.StepTables(*(jnp.asarray(t) for t in tables)), reference=None,
      text0=encoded.text0, text1=encoded.text1, mask=parallel.mask(n, n),
      group=jnp.asarray(group))


def on_mesh(params: dict, problem: optimize.EditProblem, num_items: int,
            mesh) -> tuple[dict, optimize.EditProblem]:
  """A problem and its frozen parameters (``frozen_networks``) placed on ``mesh``, as
  disentangle.prepare places them: the weights by param_sharding's rule (split over 'model';
  unchanged when already so), the batch (x_T, noise, the reference when rendered, group; its
  first ``num_items`` real items, a previous mesh's padding dropped) padded to the mesh's seeds
  axis, masked and sharded, the rest replicated. A problem prepared on one mesh can so be put
  on another (tests/test_model_sharding.py: one preparation, several meshes)."""
  n = num_items
  size = parallel.padded_size(n, mesh)

  def batch(x, axis=0):
    if x.shape[axis] != n:
      x = jax.lax.slice_in_dim(x, 0, n, axis=axis)
    return parallel.shard(parallel.pad_batch(x, size, axis), mesh, axis)
  p = problem
  prompts, tables, text0, text1 = parallel.replicate((p.prompts, p.tables, p.text0, p.text1),
                                                     mesh)
  placed = p._replace(
      x_T=batch(p.x_T), noise=batch(p.noise, axis=1), prompts=prompts, tables=tables,
      reference=None if p.reference is None else batch(p.reference), text0=text0, text1=text1,
      mask=parallel.shard(parallel.mask(n, size), mesh), group=batch(p.group))
  return param_sharding.place(params, mesh), placed
