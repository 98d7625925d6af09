"""``load``: a ModelConfig -> a StableDiffusion, from a folder, a single file, or built tiny."""
from __future__ import annotations

import os

from disentangle_jax import library_logs
from disentangle_jax.models import build, flow_bundle, flow_tiny, folder, single_file, tiny
from disentangle_jax.models.bundle import StableDiffusion
from disentangle_jax.models.config import ModelConfig


@library_logs.quietly
def load(config: ModelConfig, mesh=None) -> StableDiffusion:
  """Loads the model at ``config.path`` (a diffusers-layout folder or a single file), or builds
  the tiny one if None. SD 3.x / Flux.1 folders (their pipeline class in model_index.json) and
  tiny families load through flow_bundle.py into the same bundle.

  ``mesh`` with a model axis > 1: every weight goes from host memory straight onto the devices
  of its param_sharding rule (no device holds a whole model on the way); None or a model axis
  of 1: whole on the default device."""
  with build.onto(mesh):
    return _load(config)


def _load(config: ModelConfig) -> StableDiffusion:
  path = None if config.path is None else os.path.expanduser(config.path)
  if path is not None and (os.path.isfile(path) or
                           (single_file.is_single_file(path) and not os.path.isdir(path))):
    return single_file.load(config)
  if config.tokenizer_path is not None or config.config_path is not None:
    raise ValueError("model.tokenizer_path and model.config_path are only for a single-file "
                     f"model.path (.safetensors / .ckpt); model.path={config.path!r} is not one. "
                     "Unset them (a diffusers folder has its own tokenizer/ and configs).")
  if config.path is None:
    if config.tiny_family in flow_bundle.FAMILIES:
      return flow_tiny.build_tiny_flow(config)
    return tiny.build_tiny(config)
  if flow_bundle.is_flow_folder(path):  # model_index.json names an SD 3.x / Flux.1 pipeline
    return flow_bundle.load_folder(config)
  return folder.load_folder(config)
