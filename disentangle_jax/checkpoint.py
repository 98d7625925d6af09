"""Resumable optimisation state through orbax: {step, lambda, optimiser state} + JSON metadata.

Saves are atomic (orbax writes a temporary folder and renames it), so a run killed at any
point restarts from the last finished step. The metadata (loss history, a fingerprint of the
run's settings) travels in the same checkpoint, so resumed runs export the full history.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

# Checkpoints kept on disk; older ones are deleted once a newer one is complete.
MAX_TO_KEEP = 2


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager for (state pytree, JSON metadata) pairs."""

  def __init__(self, directory: str, save_every: int = 1, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"checkpoint save_every={save_every} must be >= 1.")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP,
                                             save_interval_steps=save_every,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
    """Restores (state, meta) of ``step`` (default latest) into the structure of
    ``abstract_state`` (optax namedtuples come back as namedtuples); None if there is none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
