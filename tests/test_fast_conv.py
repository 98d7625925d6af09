"""fast_conv.conv equals lax.conv_general_dilated (values, VJP; float64) and keeps its backward
canonical inside loops; its Flax interceptor equals nn.Conv on the same parameters."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disentangle_jax import fast_conv

DN = ("NHWC", "HWIO", "NHWC")
# (H, W, kernel, stride, padding): the UNet's 3x3 / 1x1 / stride-2 convs, the VAE's padded
# stride-2 downsampler (pad (0, 1), VALID), and odd sizes where the last window leaves rows out.
CASES = [
    (8, 9, 3, 1, ((1, 1), (1, 1))),
    (8, 8, 3, 2, ((1, 1), (1, 1))),
    (9, 9, 3, 2, ((0, 1), (0, 1))),
    (7, 6, 3, 2, ((0, 0), (0, 0))),
    (8, 8, 1, 1, ((0, 0), (0, 0))),
    (6, 7, 3, 1, ((2, 0), (1, 1))),
]


def _lax_conv(x, k, stride, padding):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=DN)


@pytest.mark.parametrize("h,w,ks,stride,padding", CASES)
def test_conv_and_vjp_equal_lax_float64(h, w, ks, stride, padding):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, 3)))
    k = jnp.asarray(rng.standard_normal((ks, ks, 3, 5)))
    y, vjp = jax.vjp(lambda a, b: fast_conv.conv(a, b, (stride, stride), padding), x, k)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _lax_conv(a, b, stride, padding), x, k)
    ct = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
    for got, want in zip(vjp(ct), vjp_ref(ct)):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_vjp_matches_jvp_and_finite_differences_float64():
  """<u, J v> from forward mode of the plain conv (and from central differences) equals
  <J^T u, v> from fast_conv's custom VJP, for a stride-2 padded conv."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x, dx = (jnp.asarray(rng.standard_normal((1, 9, 9, 4))) for _ in range(2))
    k, dk = (jnp.asarray(rng.standard_normal((3, 3, 4, 2))) for _ in range(2))
    padding = ((1, 1), (1, 1))
    plain = lambda a, b: jnp.tanh(_lax_conv(a, b, 2, padding))  # noqa: E731
    fast = lambda a, b: jnp.tanh(fast_conv.conv(a, b, (2, 2), padding))  # noqa: E731
    _, jv = jax.jvp(plain, (x, k), (dx, dk))
    y, vjp = jax.vjp(fast, x, k)
    u = jnp.asarray(rng.standard_normal(y.shape))
    gx, gk = vjp(u)
    lhs, rhs = jnp.vdot(u, jv), jnp.vdot(gx, dx) + jnp.vdot(gk, dk)
    eps = 1e-6
    fd = jnp.vdot(u, (plain(x + eps * dx, k + eps * dk) - plain(x - eps * dx, k - eps * dk))
                  / (2 * eps))
    lhs, rhs, fd = float(lhs), float(rhs), float(fd)
  print(f"<u, Jv> = {lhs:.12g}, <J^T u, v> = {rhs:.12g}, fd = {fd:.12g}")
  assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
  assert abs(fd - rhs) <= 1e-7 * abs(rhs)


def _conv_layouts(conv_fn) -> set[str]:
  """Convolution layouts in the optimised HLO of d/dx of a 3-step scan over ``conv_fn``."""
  k = jnp.full((3, 3, 4, 4), 0.1)

  def loss(x0):
    y, _ = jax.lax.scan(lambda x, _: (jnp.tanh(conv_fn(x, k)), None), x0, None, length=3)
    return y.sum()
  text = jax.jit(jax.grad(loss)).lower(jnp.ones((2, 8, 8, 4))).compile().as_text()
  return set(re.findall(r"dim_labels=([\w>-]+)", text))


def test_backward_inside_scan_keeps_canonical_layout():
  padding = ((1, 1), (1, 1))
  plain = _conv_layouts(lambda x, k: _lax_conv(x, k, 1, padding))
  fast = _conv_layouts(lambda x, k: fast_conv.conv(x, k, (1, 1), padding))
  print(f"plain: {sorted(plain)}; fast: {sorted(fast)}")
  assert fast == {"b01f_01io->b01f"}
  # Documents the XLA:CPU behaviour fast_conv works around (may change with jaxlib).
  assert "b01f_01oi->b01f" in plain


MODULES = [
    nn.Conv(5, (3, 3), padding=((1, 1), (1, 1))),
    nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
    nn.Conv(5, (3, 3), strides=(2, 2), padding="VALID"),
    nn.Conv(5, (1, 1), padding="VALID", use_bias=False),
    nn.Conv(5, (3, 3), padding="SAME"),
    nn.Conv(5, (3, 3), strides=2, padding=1),
    nn.Conv(5, (3, 3), padding="CIRCULAR"),  # not handled: falls through to Flax
    nn.Conv(6, (3, 3), feature_group_count=3),  # not handled: falls through to Flax
]


@pytest.mark.parametrize("module", MODULES, ids=range(len(MODULES)))
def test_flax_interceptor_equals_nn_conv(module):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3 if module.feature_group_count == 1 else 6))
  params = module.init(jax.random.key(1), x)

  def loss(params, x):
    y = module.apply(params, x)
    return jnp.sum(jnp.sin(y)), y

  (_, y_ref), g_ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  with nn.intercept_methods(fast_conv.intercept):
    (_, y), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Hoisted flips (model.conv = "fast_hoisted"): prepare() + conv_prepared.


def test_prepare_adds_flipped_kernels_beside_conv_kernels_only():
  k = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  params = {"conv": {"kernel": k, "bias": jnp.ones(5)}, "dense": {"kernel": jnp.ones((4, 5))},
            "scale": jnp.ones(3)}
  prepared = fast_conv.prepare(params)
  assert set(prepared["conv"]) == {"kernel", "bias", fast_conv.BWD_KERNEL}
  assert set(prepared["dense"]) == {"kernel"} and prepared["scale"] is params["scale"]
  np.testing.assert_array_equal(prepared["conv"][fast_conv.BWD_KERNEL],
                                np.transpose(np.asarray(k)[::-1, ::-1], (0, 1, 3, 2)))
  assert "kernel_bwd" not in params["conv"]  # the input tree is not modified


@pytest.mark.parametrize("h,w,ks,stride,padding", CASES[:3])
def test_prepared_conv_equals_conv_float64(h, w, ks, stride, padding):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, h, w, 3)))
    k = jnp.asarray(rng.standard_normal((ks, ks, 3, 5)))
    y, vjp = jax.vjp(lambda a, b, c: fast_conv.conv_prepared(a, b, c, (stride, stride), padding),
                     x, k, fast_conv.flip(k))
    y_ref, vjp_ref = jax.vjp(lambda a, b: _lax_conv(a, b, stride, padding), x, k)
    ct = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
    dx, dk, dk_bwd = vjp(ct)
    for got, want in zip((dx, dk), vjp_ref(ct)):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert not np.any(dk_bwd)  # the output does not depend on the precomputed flip


def test_hoisted_flip_leaves_the_loop():
  """With prepare() outside the scan, the backward loop body has no kernel reverse."""
  k = jnp.full((3, 3, 4, 4), 0.1)
  padding = ((1, 1), (1, 1))

  def loss(x0, prepared):
    module = nn.Conv(4, (3, 3), padding=padding)

    def body(x, _):
      with nn.intercept_methods(fast_conv.intercept):
        return jnp.tanh(module.apply({"params": prepared}, x)), None
    y, _ = jax.lax.scan(body, x0, None, length=3)
    return y.sum()

  def reverses(hoisted: bool) -> int:
    params = {"kernel": k, "bias": jnp.zeros(4)}
    fn = lambda x0, p: loss(x0, fast_conv.prepare(p) if hoisted else p)  # noqa: E731
    text = jax.jit(jax.grad(fn)).lower(jnp.ones((2, 8, 8, 4)), params).compile().as_text()
    bodies = re.findall(r"body=%?([\w.\-]+)", text)
    return sum(len(re.findall(r"reverse\(", _computation(text, b))) for b in bodies)
  assert reverses(hoisted=False) >= 1  # what the hoisting removes (may change with jaxlib)
  assert reverses(hoisted=True) == 0


def _computation(text: str, name: str) -> str:
  """The HLO text of computation ``name`` and of the fusions it calls."""
  blocks = re.split(r"\n(?=\S)", text)
  found = {}
  for block in blocks:
    head = block.split("(", 1)[0].split()
    if head:
      found[head[-1].lstrip("%")] = block
  out, todo = [], [name]
  while todo:
    block = found.pop(todo.pop(), None)
    if block is not None:
      out.append(block)
      todo += re.findall(r"calls=%?([\w.\-]+)", block)
  return "\n".join(out)
