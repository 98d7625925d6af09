"""PyTorch state dicts -> Flax parameter trees, in numpy, without torch or diffusers.

A PyTorch checkpoint is a flat ``{"a.b.0.weight": array}`` dict (read from .safetensors with
``safetensors.numpy``); the Flax models of diffusers and transformers want a nested dict keyed
by module names. The rules are few:

  naming="diffusers" (UNet, VAE): ``name.0`` becomes ``name_0``; where the Flax module uses
    them (the VAE's attention), ``to_q/to_k/to_v/to_out_0`` become ``query/key/value/proj_attn``.
  naming="transformers" (CLIP text encoder): list indices stay separate path parts
    (``layers/0``); buffers such as ``position_ids`` are dropped.
  both: a norm's ``weight`` becomes ``scale``, an embedding's ``weight`` becomes
    ``embedding``, any other ``weight`` becomes ``kernel``: [O, I] -> [I, O] for linear layers,
    [O, I, kh, kw] -> [kh, kw, I, O] for convolutions.

Which rule applies is decided by the target tree (``jax.eval_shape`` of the model's init, so no
weights are allocated), and every converted array is checked against its target shape.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from disentangle_jax import errors

NAMINGS = ("diffusers", "transformers")

# diffusers' attention projections: PyTorch name -> Flax name.
_ATTENTION_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# PyTorch buffers that are not parameters of the Flax models.
_IGNORED_SUFFIXES = ("position_ids", "num_batches_tracked")
# At most this many key names are listed in an error message.
_MAX_LISTED = 8

Shape = tuple[int, ...]

logger = logging.getLogger(__name__)


def _flat_shapes(tree) -> dict[tuple[str, ...], Shape]:
  """{path tuple: shape} of a nested dict of arrays or jax.ShapeDtypeStructs."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _split_key(pt_key: str, naming: str) -> tuple[str, ...]:
  if naming == "diffusers":
    # "down_blocks.0.attentions.1.to_out.0.weight" -> "down_blocks_0.attentions_1.to_out_0.weight"
    pt_key = re.sub(r"(\w+)\.(\d+)", r"\1_\2", pt_key)
  return tuple(pt_key.split("."))


def _map_one(path: tuple[str, ...], array: np.ndarray,
             target: Mapping[tuple[str, ...], Shape]) -> tuple[tuple[str, ...], np.ndarray]:
  """Maps one PyTorch (path, array) to its Flax (path, array); path unchanged if no rule fits."""
  if path in target:
    return path, array
  *prefix, module, leaf = path if len(path) >= 2 else ("", *path)
  leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # very old LayerNorm names
  # Attention projections are query/key/value/proj_attn in the Flax VAE, to_q/... in the UNet.
  modules = (module, _ATTENTION_RENAMES[module]) if module in _ATTENTION_RENAMES else (module,)
  for module in modules:
    base = tuple(prefix) + ((module,) if module else ())
    if leaf == "bias" and base + ("bias",) in target:
      return base + ("bias",), array
    if leaf != "weight":
      continue
    if base + ("scale",) in target:  # GroupNorm / LayerNorm
      return base + ("scale",), array
    if base + ("embedding",) in target:
      return base + ("embedding",), array
    kernel = base + ("kernel",)
    if kernel in target:
      if array.ndim == 4 and len(target[kernel]) == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return kernel, np.transpose(array, (2, 3, 1, 0))
      if array.ndim == 4 and array.shape[2:] == (1, 1):  # old 1x1-conv attention projections
        array = array[:, :, 0, 0]
      return kernel, array.T if array.ndim == 2 else array  # linear [O, I] -> [I, O]
  return path, array


def torch_to_flax(state_dict: Mapping[str, np.ndarray], shape_tree, naming: str,
                  source: str = "checkpoint", names: Mapping[str, str] | None = None,
                  fix: str | None = None) -> dict:
  """Converts a PyTorch state dict to the nested Flax parameter dict described by ``shape_tree``.

  Args:
    state_dict: {PyTorch parameter name: numpy array}, e.g. ``safetensors.numpy.load_file``.
    shape_tree: the target tree (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
      ``jax.eval_shape(module.init_weights, key)``).
    naming: "diffusers" (UNet, VAE) or "transformers" (CLIP text encoder).
    source: the file name, used in error messages.
    names: how messages name a ``state_dict`` key (its name in the file, when the caller renamed
      the keys; default: the key itself).
    fix: the last sentence of a shape error (default: for weights beside a config.json).

  Returns:
    A nested dict of numpy arrays with exactly the paths and shapes of ``shape_tree`` (dtypes as
    stored in the checkpoint).

  Raises:
    ValueError: a target parameter is missing from the checkpoint or has another shape.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming={naming!r} is unknown; use one of {NAMINGS}.")
  target = _flat_shapes(shape_tree)
  # A text-encoder checkpoint saved without its "text_model." prefix still loads.
  roots = {k[0] for k in target}
  flat = {}
  for pt_key, array in state_dict.items():
    if pt_key.endswith(_IGNORED_SUFFIXES):
      continue
    path, value = _map_one(_split_key(pt_key, naming), np.asarray(array), target)
    if path not in target and len(roots) == 1:
      root = next(iter(roots))
      path, value = _map_one((root,) + _split_key(pt_key, naming), np.asarray(array), target)
    flat[path] = (pt_key, value)
  unused = sorted(pt_key for path, (pt_key, _) in flat.items() if path not in target)
  if unused:
    logger.warning("%s: %d weight(s) have no place in the model and are ignored, e.g. %s",
                   source, len(unused), unused[:_MAX_LISTED])
  params = {}
  for path, (pt_key, value) in flat.items():
    if path in target and tuple(value.shape) != target[path]:
      shown = (names or {}).get(pt_key, pt_key)
      raise ValueError(
          f"{source}: weight {shown!r} has shape {tuple(value.shape)} but the model built from "
          f"its config expects {target[path]} for {'/'.join(path)}: " + (
              fix or "the weights and the config.json beside them do not belong together."))
    params[path] = value
  return check_tree(traverse_util.unflatten_dict(params), shape_tree, source)


def mismatches(flat: Mapping, target: Mapping) -> tuple[list, list]:
  """(missing keys, [(key, found shape, expected shape)]) of flat params against flat shapes.

  ``target`` maps keys to shapes (or anything with ``.shape``); keys only in ``flat`` are not
  reported (callers drop them). Both lists are sorted by key.
  """
  expected = {k: tuple(getattr(v, "shape", v)) for k, v in target.items()}
  missing = sorted(k for k in expected if k not in flat)
  bad = sorted((k, tuple(np.shape(flat[k])), s) for k, s in expected.items()
               if k in flat and tuple(np.shape(flat[k])) != s)
  return missing, bad


def check_tree(params, shape_tree, source: str = "checkpoint") -> dict:
  """Checks a nested params dict against ``shape_tree``; returns it as a plain nested dict.

  Extra entries are dropped; a single-root target (e.g. {"text_model": ...}) also accepts the
  params saved without that root.

  Raises:
    ValueError: naming the missing (or misshapen) entries and ``source``.
  """
  target = _flat_shapes(shape_tree)
  flat = traverse_util.flatten_dict(dict(params))
  roots = {k[0] for k in target}
  if len(roots) == 1 and not any(k[0] in roots for k in flat):
    root = next(iter(roots))
    flat = {(root,) + k: v for k, v in flat.items()}
  missing, bad = mismatches(flat, target)
  missing = ["/".join(k) for k in missing]
  if missing:
    unexpected = sorted("/".join(k) for k in flat if k not in target)
    raise ValueError(
        f"{source}: {len(missing)} of the model's {len(target)} parameters are missing, e.g. "
        f"{missing[:_MAX_LISTED]}; entries without a place in the model: "
        f"{unexpected[:_MAX_LISTED]}. Is this the checkpoint of a Stable Diffusion v1.x "
        "component, saved with the config.json beside it?")
  bad = [("/".join(k), found, expected) for k, found, expected in bad]
  if bad:
    raise ValueError(
        f"{source}: parameters with the wrong shape (name, found, expected): {bad[:_MAX_LISTED]}; "
        "the weights and the config.json beside them do not belong together.")
  return traverse_util.unflatten_dict({k: flat[k] for k in target})


def cast_floating(params, dtype) -> Any:
  """Casts every floating-point leaf of a nested dict to ``dtype`` (numpy; ints untouched)."""
  def cast(x):
    x = np.asarray(x)
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"
    return x.astype(dtype, copy=False) if floating else x
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: cast(v) for k, v in flat.items()})


def import_torch(what: str, fix: str):
  """torch, imported only to read a pickled PyTorch file (the library never needs it
  otherwise). Without torch: errors.UserError "<what> needs torch (pip install ...); <fix>"."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional: pickled files only
  except ImportError:
    raise errors.UserError(f"{what} needs torch (pip install torch==2.13.0); {fix}") from None
  return torch
