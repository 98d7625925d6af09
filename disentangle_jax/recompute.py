"""Rematerialisation that XLA:CPU keeps: a block whose backward recomputes its forward.

``recompute_in_backward(fn)`` is ``fn`` (positional arguments, pytrees of arrays) as a
``jax.custom_vjp`` that saves only its inputs and, in its backward, recomputes the forward from
inputs tied to the cotangent by an exact ``+ 0 * g[0]`` (``_tie``; XLA cannot fold it, g may be
inf or NaN), behind an optimisation barrier (for backends that keep them): the recomputation can
be neither merged with the forward (CSE) nor scheduled before the block's backward. Forward mode
(``jax.jvp``) is not available through it.

Why not plain ``jax.checkpoint`` / ``nn.remat``: on XLA:CPU they do not rematerialise outside
loops. Their recomputation is kept apart from the forward only by an optimisation barrier over
the block's inputs, and XLA:CPU expands barriers before its CSE pass, which then merges the
recomputation back into the forward (SD's VAE decoder backward with every layer under
jax.checkpoint: 5.25 GiB, 5.95 without, 2.50 under recompute_in_backward).

No diffusers import: remat.py (the diffusers UNet / VAE interceptors) and the flow transformers'
own blocks (models/dit_layers.py ``remat_call``) both use it.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp


def _tie(args, g, skip: tuple[int, ...]):
  """``args`` with 0 * (one element of ``g``) added to the inexact arrays outside ``skip``.

  Exact (x + 0 = x; a non-finite cotangent element would make the gradient non-finite
  anyway), but XLA cannot fold it away (0 * g is not 0 when g is inf or NaN): the
  recomputation reads values that exist only once the backward has started, so it can be
  neither merged with the forward (CSE) nor scheduled before its backward.
  """
  leaves = [x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  if not leaves:
    return args
  zero = 0 * leaves[0].reshape(-1)[0]

  def tie(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact):
      return x + zero.astype(x.dtype)
    return x
  return tuple(a if i in skip else jax.tree.map(tie, a) for i, a in enumerate(args))


def recompute_in_backward(fn: Callable, skip_tie: tuple[int, ...] = ()) -> Callable:
  """``fn`` (positional arguments, pytrees of arrays) that saves only its inputs and
  recomputes its forward in the backward, once that backward's cotangent exists.

  ``skip_tie``: positions of arguments not tied to the cotangent (the weights: tying the
  activations suffices to keep every recomputed activation apart from the forward's, and
  weights are large).
  """
  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    return fn(*args), args

  def bwd(args, g):
    args, g = lax.optimization_barrier((args, g))
    _, vjp = jax.vjp(fn, *_tie(args, g, skip_tie))
    return vjp(g)

  wrapped.defvjp(fwd, bwd)
  return wrapped


def split_arrays(tree):
  """(the jax.Array leaves of ``tree``, ``merge``): ``merge(arrays)`` is ``tree`` with those
  leaves replaced by ``arrays`` and every other leaf (Python values, host numpy constants) kept.
  How a module call becomes a pure function of its array arguments for recompute_in_backward:
  the other leaves are constants of the recomputation."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [isinstance(x, jax.Array) for x in leaves]
  static = [None if a else x for x, a in zip(leaves, is_array)]

  def merge(arrays):
    arrays = iter(arrays)
    return jax.tree.unflatten(treedef, [next(arrays) if a else x
                                        for x, a in zip(static, is_array)])
  return [x for x, a in zip(leaves, is_array) if a], merge
