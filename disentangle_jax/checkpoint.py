"""Resumable optimisation state through orbax: {step, lambda, optimiser state} + JSON metadata.

Saves are atomic (orbax writes a temporary folder and renames it), so a run killed at any
point restarts from the last finished step. The metadata (loss history, the run's identity)
travels in the same checkpoint, so resumed runs export the full history and a run with other
settings is refused before any state is read.

A damaged checkpoint (deleted or truncated files, bad metadata) is reported in one line and
moved aside to ``<directory>.damaged/``; the run resumes from the newest readable one.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from disentangle_jax import errors

# Checkpoints kept on disk; older ones are deleted once a newer one is complete.
MAX_TO_KEEP = 2
DAMAGED_SUFFIX = ".damaged"


def check_save_every(save_every) -> None:
  errors.check_number("checkpoint_every", save_every, low=1, integer=True,
                      hint="1 = a checkpoint after every iteration.")


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager for (state pytree, JSON metadata) pairs."""

  def __init__(self, directory: str, save_every: int = 1, async_save: bool = True):
    check_save_every(save_every)
    self.directory = os.path.abspath(directory)
    self._save_every, self._async = save_every, async_save
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP,
                                             save_interval_steps=self._save_every,
                                             enable_async_checkpointing=self._async,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if not isinstance(meta, dict):
      raise ValueError(f"metadata is a {type(meta).__name__}, not a JSON object")
    return dict(meta)

  def restore(self, abstract_state: Any, step: int | None = None,
              check_meta: Callable[[dict], None] | None = None,
              log: Callable[[str], None] = print) -> tuple[Any, dict] | None:
    """Restores (state, meta) of ``step`` (default: the newest readable) into the structure
    of ``abstract_state`` (optax namedtuples come back as namedtuples); None if there is none.

    ``check_meta(meta)`` runs before any state is read (e.g. refusing a run with other
    settings); its errors propagate. A checkpoint that cannot be read is reported through
    ``log``, moved aside, and the next older one is tried; if none is readable the error
    names the folder and the fix.
    """
    steps = [step] if step is not None else self.steps()[::-1]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    damaged = []
    for s in steps:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # noqa: BLE001 -- any failure to read is a damaged checkpoint
        damaged.append(self._set_aside(s, e, log))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # noqa: BLE001
        damaged.append(self._set_aside(s, e, log))
        continue
      return out["state"], meta
    if damaged:
      raise errors.CheckpointUnreadable(
          f"no checkpoint in {self.directory} can be read (moved aside to "
          f"{self.directory + DAMAGED_SUFFIX}): delete {self.directory} to start the run over.")
    return None

  def _set_aside(self, step: int, error: Exception, log: Callable[[str], None]) -> str:
    """Moves an unreadable step folder out of the manager's directory, so a new save of the
    same step can succeed; reopens the manager (it caches the step list)."""
    src = os.path.join(self.directory, str(step))
    dst_dir = self.directory + DAMAGED_SUFFIX
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if os.path.exists(src):
      shutil.move(src, dst)
    log(f"checkpoint {step} in {self.directory} is unreadable ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:160] if str(error) else ''}); moved it to {dst} and "
        "trying the next older one")
    _close(self._manager)
    self._manager = self._open()
    return dst

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and stops orbax's threads (idempotent)."""
    if self._manager is not None:
      _close(self._manager)
      self._manager = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    # Also on errors and Ctrl-C: orbax's background threads must end before the program
    # removes or reports anything, or they print tracebacks after the one-line error.
    self.close()


def _close(manager: ocp.CheckpointManager) -> None:
  """``manager.close()`` after the temporary-folder cleanup its constructor started.

  orbax 0.12's close() does not wait for that cleanup (``cleanup_tmp_directories``): a
  program that exits right after (a refusal) had its thread scheduling work on an executor
  already shut down, printing a traceback after the one-line error.
  """
  await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
  if await_cleanup is not None:
    await_cleanup()  # pylint: disable=not-callable
  manager.close()
