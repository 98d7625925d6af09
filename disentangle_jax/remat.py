"""Rematerialisation inside diffusers' Flax UNet and VAE, on their unchanged parameter trees.

Step remat (``sampler.REMAT_POLICIES``) keeps the sampler's memory flat in T, but the backward
of one CFG UNet call, and of the VAE decoder, still holds every activation of that network.
``interceptor(level)`` returns a ``flax.linen.intercept_methods`` interceptor that runs chosen
sub-modules under ``recompute_in_backward``: their backward recomputes their forward from the
block's inputs, so only block boundaries are stored.

Levels (``model.block_remat``):
  "none":   no interceptor.
  "blocks": the UNet's down / mid / up blocks and its transformer blocks, the VAE's encoder
            and decoder blocks (and their mid blocks).
  "layers": every ResNet block and transformer block, and the VAE's attention block: finer,
            so less memory, for one more recomputation of each layer in the backward.

How: the interceptor reads the sub-module's variables (at the caller's trace level), then
calls a pure function of (variables, array arguments) under ``recompute_in_backward`` that
applies an unbound clone of the module with those variables. Non-array arguments
(``deterministic``) are static. Inside the clone other interceptors (fast convolution,
attention) still apply, and a transformer block inside a rematerialised down block is
rematerialised again (nested).
Results are the same up to float32 re-association (the recomputation is the same program).

Why not plain ``jax.checkpoint``: on XLA:CPU it does not rematerialise outside loops. Its
recomputation is kept apart from the forward only by an optimisation barrier over the block's
inputs, and XLA:CPU expands barriers before its CSE pass, which then merges the recomputation
back into the forward (checked in the optimised HLO: no recomputed convolution left; the SD
decoder's backward with "layers" needed 5.25 GiB, 5.95 without remat).
``recompute_in_backward`` (recompute.py, shared with the flow transformers' blocks) is a
``custom_vjp`` that saves the inputs and, in its backward, recomputes from inputs tied to the
cotangent by an exact ``+ 0 * g[0]`` (``_tie``; XLA cannot fold it, g may be inf or NaN), also
behind an optimisation barrier (for backends that keep them): the recomputation can be neither
merged with the forward nor scheduled before the block's backward (the same decoder: 2.50 GiB).
Forward mode (``jax.jvp``) is not available through it (use block_remat "none" for that).
"""
from __future__ import annotations

import contextlib
from typing import Callable

from diffusers.models import attention_flax
from diffusers.models import resnet_flax
from diffusers.models import vae_flax
from diffusers.models.unets import unet_2d_blocks_flax as unet_blocks
import flax.linen as nn
from flax.linen import module as flax_module

from disentangle_jax import recompute
from disentangle_jax.recompute import recompute_in_backward  # noqa: F401 (also this module's API)

LEVELS = ("none", "blocks", "layers")

_BLOCKS = (
    unet_blocks.FlaxCrossAttnDownBlock2D, unet_blocks.FlaxDownBlock2D,
    unet_blocks.FlaxUNetMidBlock2DCrossAttn, unet_blocks.FlaxCrossAttnUpBlock2D,
    unet_blocks.FlaxUpBlock2D, attention_flax.FlaxBasicTransformerBlock,
    vae_flax.FlaxDownEncoderBlock2D, vae_flax.FlaxUpDecoderBlock2D, vae_flax.FlaxUNetMidBlock2D,
)
_LAYERS = (
    resnet_flax.FlaxResnetBlock2D, vae_flax.FlaxResnetBlock2D,
    attention_flax.FlaxBasicTransformerBlock, vae_flax.FlaxAttentionBlock,
)
_CLASSES = {"blocks": _BLOCKS, "layers": _LAYERS}


def checkpointed_call(context, args, kwargs):
  """Calls ``context``'s module method under ``jax.checkpoint`` as a pure function."""
  module = context.module
  method = context.orig_method.func  # the undecorated method; interceptors do not re-enter it
  arrays, merge = recompute.split_arrays((args, kwargs))

  # The run options active now (fast conv, attention, torch numerics, this remat). The backward's
  # recomputation is traced after ``models.run_options`` has exited, so it re-enters them: the
  # recomputed forward is then the same program as the forward it replaces.
  active = list(flax_module._global_interceptor_stack)[::-1]  # pylint: disable=protected-access

  def pure(variables, arrays):
    call_args, call_kwargs = merge(arrays)
    with contextlib.ExitStack() as stack:
      if not flax_module._global_interceptor_stack:  # pylint: disable=protected-access
        for interceptor in active:
          stack.enter_context(nn.intercept_methods(interceptor))
      return module.clone(parent=None).apply(variables, *call_args, method=method, **call_kwargs)

  return recompute_in_backward(pure, skip_tie=(0,))(module.variables, arrays)


def interceptor(level: str) -> Callable | None:
  """The interceptor of ``level`` (a key of LEVELS), or None for "none"."""
  if level not in LEVELS:
    raise ValueError(f"model.block_remat={level!r} is unknown; use one of {LEVELS}.")
  if level == "none":
    return None
  classes = _CLASSES[level]

  def intercept(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or type(context.module) not in classes:  # noqa
      return next_fun(*args, **kwargs)
    return checkpointed_call(context, args, kwargs)
  return intercept
