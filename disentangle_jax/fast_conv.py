"""A 2-D convolution whose backward runs on XLA:CPU's fast path inside loops, and its Flax hook.

Why: XLA:CPU canonicalises convolution layouts only in the entry computation, never in loop
bodies. Inside the sampler's differentiated ``lax.scan``, JAX's own transpose of a convolution
(the input gradient: the cotangent convolved with the spatially reversed kernel, read with its
in/out features swapped, layout ``b01f_01oi->b01f``) is then emitted as a generic loop nest
that costs about a whole UNet forward per step. ``conv`` is the same convolution with a
``custom_vjp`` whose input gradient is an ordinary NHWC x HWIO convolution of the cotangent
with an explicitly flipped and transposed kernel: same numbers (float32 re-association only),
canonical layout, Eigen's kernel everywhere.

``intercept`` is a ``flax.linen.intercept_methods`` interceptor that routes every plain
``nn.Conv`` (2-D, shared weights, no mask, one feature group, no dilation) through ``conv``,
reading the module's own ``kernel`` / ``bias``: parameter trees are unchanged, and any other
convolution falls through to Flax. Forward mode (``jax.jvp``) is not supported through
``conv`` (it is a ``custom_vjp``); use ``model.conv = "xla"`` for that.

Hoisting the flip (``model.conv = "fast_hoisted"``): the flipped kernel is a function of the
frozen weights only, yet ``conv``'s backward recomputes it at every step of the backward scan
(XLA's loop-invariant code motion leaves reverse/transpose chains in the loop: it deems them
not worth hoisting). ``prepare(params)`` computes every conv kernel's flipped form once,
outside the loop, as an extra leaf ``kernel_bwd`` next to each 4-D ``kernel``; the sampler
calls it before its scan (``eps_fn.prepare``). The interceptor then uses ``conv_prepared``,
whose backward reads ``kernel_bwd`` instead of flipping. Same numbers as ``conv`` (the same
convolutions on the same values); the saved params trees and checkpoints are unchanged (the
extra leaves exist only inside the traced program, and are removed as dead code where nothing
is differentiated). Cost: a second copy of the conv kernels lives while the gradient runs.

Shapes: N batch, H W spatial, I input features, O output features (NHWC x HWIO -> NHWC).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], tuple[int, int]]


def _plain(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, precision=precision,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def input_grad_padding(in_size: int, kernel_size: int, stride: int, out_size: int,
                       pad: tuple[int, int]) -> tuple[int, int]:
  """Padding of the input-gradient convolution along one spatial axis (as JAX's transpose).

  The cotangent [out_size], dilated by ``stride``, convolved with the flipped kernel under this
  padding gives exactly ``in_size`` outputs, also when the forward's last window left input
  rows unused.
  """
  before = kernel_size - pad[0] - 1
  after = in_size + kernel_size - 1 - ((out_size - 1) * stride + 1) - before
  return before, after


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
         precision=None) -> jax.Array:
  """NHWC x HWIO -> NHWC convolution, equal to ``lax.conv_general_dilated``.

  Args:
    x: [N, H, W, I]; kernel: [kh, kw, I, O]; strides: (sh, sw); padding: ((top, bottom),
    (left, right)) explicit integers; precision: as lax (None = default).
  """
  return _plain(x, kernel, strides, padding, precision)


def _conv_fwd(x, kernel, strides, padding, precision):
  return _plain(x, kernel, strides, padding, precision), (x, kernel)


def _conv_bwd(strides, padding, precision, residuals, g):
  x, kernel = residuals
  # [kh, kw, O, I]: reversed in space, features swapped, materialised in HWIO order. The exact
  # "+ 0 * g[0]" (not foldable: g may be inf or NaN) ties the flip to this backward; without
  # it, depending on the weights only, flips are scheduled early and kept alive (SD UNet's
  # backward with block_remat "layers": 4.07 GiB temporaries, 3.78 GiB with the tie; XLA still
  # moves the reverse ahead of the add for some of them).
  tie = 0 * g.reshape(-1)[0].astype(kernel.dtype)
  return _grads(x, kernel, flip(kernel + tie), strides, padding, precision, g)


def _grads(x, kernel, flipped, strides, padding, precision, g):
  """(dx, dkernel) of the convolution, dx through the flipped kernel [kh, kw, O, I]."""
  pads = tuple(input_grad_padding(x.shape[1 + a], kernel.shape[a], strides[a], g.shape[1 + a],
                                  padding[a]) for a in range(2))
  dx = lax.conv_general_dilated(g, flipped, (1, 1), pads, lhs_dilation=strides,
                                precision=precision, dimension_numbers=_DIMENSION_NUMBERS)
  # The kernel gradient (unused, so removed, when only activations are differentiated).
  _, kernel_vjp = jax.vjp(lambda k: _plain(x, k, strides, padding, precision), kernel)
  (dkernel,) = kernel_vjp(g)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


BWD_KERNEL = "kernel_bwd"  # the name of prepare()'s extra leaf, next to a conv's "kernel"


def flip(kernel: jax.Array) -> jax.Array:
  """[kh, kw, I, O] -> [kh, kw, O, I]: reversed in space, features swapped (input gradient's)."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def conv_prepared(x: jax.Array, kernel: jax.Array, kernel_bwd: jax.Array,
                  strides: tuple[int, int], padding: Padding, precision=None) -> jax.Array:
  """``conv`` whose backward uses ``kernel_bwd`` (= ``flip(kernel)``, precomputed) for dx.

  The output does not depend on ``kernel_bwd``: its cotangent is zero.
  """
  del kernel_bwd
  return _plain(x, kernel, strides, padding, precision)


def _prepared_fwd(x, kernel, kernel_bwd, strides, padding, precision):
  return _plain(x, kernel, strides, padding, precision), (x, kernel, kernel_bwd)


def _prepared_bwd(strides, padding, precision, residuals, g):
  x, kernel, kernel_bwd = residuals
  dx, dkernel = _grads(x, kernel, kernel_bwd, strides, padding, precision, g)
  return dx, dkernel, jnp.zeros_like(kernel_bwd)


conv_prepared.defvjp(_prepared_fwd, _prepared_bwd)


def prepare(params):
  """``params`` with ``kernel_bwd = flip(kernel)`` beside every 4-D ``kernel`` (nested dicts).

  Other leaves and trees without conv kernels pass through unchanged (same objects).
  """
  if not hasattr(params, "items"):
    return params
  out = {key: prepare(value) for key, value in params.items()}
  kernel = out.get("kernel")
  if getattr(kernel, "ndim", 0) == 4 and BWD_KERNEL not in out:
    out[BWD_KERNEL] = flip(kernel)
  return out


def _pairs(value, n: int = 2) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _kernel_size(module) -> tuple[int, ...]:
  size = module.kernel_size
  return (size,) if isinstance(size, int) else tuple(size)


def _explicit_padding(module: nn.Conv, in_shape: Sequence[int], kernel_size, strides):
  """The module's padding as ((top, bottom), (left, right)), or None if not plain zero padding."""
  padding = nn.linear.canonicalize_padding(module.padding, 2)
  if padding in ("SAME", "VALID"):
    return tuple(lax.padtype_to_pads(in_shape, kernel_size, strides, padding))
  if isinstance(padding, str):  # CIRCULAR, REFLECT, CAUSAL: leave to Flax
    return None
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _handles(module, x) -> bool:
  return (type(module) is nn.Conv  # pylint: disable=unidiomatic-typecheck
          and module.shared_weights and module.mask is None
          and module.feature_group_count == 1 and module.conv_general_dilated is None
          and module.conv_general_dilated_cls is None
          and len(_kernel_size(module)) == 2
          and _pairs(module.input_dilation) == (1, 1)
          and _pairs(module.kernel_dilation) == (1, 1)
          and x.ndim == 4 and module.has_variable("params", "kernel"))


def intercept(next_fun, args, kwargs, context):
  """Flax method interceptor: plain 2-D ``nn.Conv.__call__`` -> ``conv`` (same parameters)."""
  module = context.module
  if context.method_name != "__call__" or kwargs or len(args) != 1 or not _handles(module, args[0]):
    return next_fun(*args, **kwargs)
  kernel_size = _kernel_size(module)
  strides = _pairs(module.strides)
  padding = _explicit_padding(module, args[0].shape[1:3], kernel_size, strides)
  if padding is None:
    return next_fun(*args, **kwargs)
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  x, kernel, bias = module.promote_dtype(args[0], kernel, bias, dtype=module.dtype)
  if module.has_variable("params", BWD_KERNEL):  # prepare()d: the flip was hoisted
    kernel_bwd = module.get_variable("params", BWD_KERNEL).astype(kernel.dtype)
    y = conv_prepared(x, kernel, kernel_bwd, strides, padding, module.precision)
  else:
    y = conv(x, kernel, strides, padding, module.precision)
  if bias is not None:
    y = y + bias
  return y
