"""Resumable optimisation state through orbax: {step, lambda, optimiser state} + JSON metadata.

Saves are atomic (orbax writes a temporary folder and renames it), so a run killed at any
point restarts from the last finished step. The metadata (loss history, the run's identity)
travels in the same checkpoint, so resumed runs export the full history and a run with other
settings is refused before any state is read.

A damaged checkpoint (deleted or truncated files, bad metadata, a flipped bit in orbax's
manifest) is reported in one line and moved aside to ``<directory>.damaged/``; the run resumes
from the newest readable one. The metadata carries a checksum of itself (``meta_checksum``): a
hand-edited loss history is a damaged checkpoint too, so the export never publishes it.

A checkpoint that cannot be written (a full disk or quota, a read-only folder) is one error
(OSError with its errno, or errors.CheckpointWriteFailed): orbax's background threads are let
finish first (closed under them they print tracebacks after the program's one line), and the
partial step folder is removed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
# orbax's background save threads (private: no public handle reaches them; see _settle).
from orbax.checkpoint._src.futures import future as ocp_future

from disentangle_jax import errors

# Checkpoints kept on disk; older ones are deleted once a newer one is complete.
MAX_TO_KEEP = 2
DAMAGED_SUFFIX = ".damaged"
CHECKSUM_KEY = "checksum"  # in the metadata: meta_checksum of the other entries
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a step folder still being written
# Seconds to let orbax's in-flight save threads end after one of them failed (the state is
# lambda and its optimiser state: kilobytes), then again after releasing those still waiting.
SETTLE_SECONDS = 10.0


class MetadataEdited(ValueError):
  """A checkpoint's metadata does not match its checksum (edited by hand, or damaged)."""


def meta_checksum(meta: dict) -> str:
  """sha256 of the metadata's canonical JSON (sorted keys), the checksum entry left out.
  orbax stores the metadata as JSON, and Python's JSON floats round-trip exactly, so the
  checksum of what is read back equals the one saved unless a byte was changed."""
  body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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
    """Starts saving (asynchronously); a failure of this or the previous save raises here or
    in ``wait`` (see _writing)."""
    meta = dict(meta, **{CHECKSUM_KEY: meta_checksum(meta)})
    with self._writing():
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)),
                         force=force)

  def read_meta(self, step: int) -> dict:
    """The metadata of ``step``, its checksum verified (MetadataEdited if it fails; a
    checkpoint saved before checksums existed has none and is read as it is)."""
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if not isinstance(meta, dict):
      raise ValueError(f"metadata is a {type(meta).__name__}, not a JSON object")
    saved = meta.get(CHECKSUM_KEY)
    if saved is not None and saved != meta_checksum(meta):
      raise MetadataEdited("its metadata (loss history, lambdas) does not match its checksum: "
                           "edited or damaged")
    return {k: v for k, v in meta.items() if k != CHECKSUM_KEY}

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
    dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    _settle()  # reads of the failed restore still in flight end before the folder moves
    try:
      os.makedirs(dst_dir, exist_ok=True)
      if os.path.exists(src):
        shutil.move(src, dst)
    except OSError as e:  # a read-only checkpoints/: nothing can be moved, nor written later
      raise errors.CheckpointUnreadable(
          f"checkpoint {step} in {self.directory} is unreadable ({_first_line(error)}) and "
          f"cannot be moved aside ({e.strerror or e}): make {self.directory} writable, or "
          f"delete it to start the run over.") from None
    log(f"checkpoint {step} in {self.directory} is unreadable ({_first_line(error)}); moved it "
        f"to {dst} and trying the next older one")
    _close(self._manager)
    self._manager = self._open()
    return dst

  def wait(self) -> None:
    """Waits for the pending save; its failure raises here (see _writing)."""
    with self._writing():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed save into one error: the full disk or quota an OSError(ENOSPC) that
    names the folder, a permission problem an OSError(EACCES), anything else
    errors.CheckpointWriteFailed. orbax's other save threads are let finish and the manager
    closed before the error leaves (no traceback printed after the program's one line), and
    the partial step folder is removed; the finished checkpoints stay."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds
      manager, self._manager = self._manager, None
      _settle()
      with contextlib.suppress(Exception):  # the same failure, raised again by close()
        _close(manager)
      _settle()
      _remove_partial(self.directory)
      raise _write_error(e, self.directory) from None

  def close(self) -> None:
    """Waits for pending saves and stops orbax's threads (idempotent); a pending save that
    fails raises as in ``wait``."""
    if self._manager is not None:
      with self._writing():
        _close(self._manager)
      self._manager = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    # Also on errors and Ctrl-C: orbax's background threads must end before the program
    # removes or reports anything, or they print tracebacks after the one-line error.
    self.close()


def _remove_partial(directory: str) -> None:
  """Removes the step folders of ``directory`` that orbax did not finish (TMP_MARK)."""
  with contextlib.suppress(OSError):
    for name in os.listdir(directory):
      if TMP_MARK in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _write_error(e: Exception, directory: str) -> Exception:
  """The one-line error of a failed save (see Checkpointer._writing)."""
  if isinstance(e, OSError):
    # launch/failures.py words ENOSPC, EACCES, EROFS with their fix; a quota is a full disk to
    # the user (the same fix); orbax's own writes raise them without a file name.
    code = errno.ENOSPC if e.errno == errno.EDQUOT else e.errno
    return e if code == e.errno and e.filename else OSError(code, e.strerror, directory)
  # tensorstore reports its status codes only as text in a ValueError ("RESOURCE_EXHAUSTED:
  # Error writing local file ..."): the code, not the wording, is matched.
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text:
    return OSError(errno.ENOSPC, "No space left on device", directory)
  if "PERMISSION_DENIED" in text:
    return OSError(errno.EACCES, "Permission denied", directory)
  return errors.CheckpointWriteFailed(
      f"a checkpoint could not be written in {directory} ({_first_line(e)}); the finished "
      "checkpoints are kept: fix the cause and run the same command again.")


def _first_line(e: Exception) -> str:
  text = str(e).splitlines()[0][:160] if str(e) else ""
  return f"{type(e).__name__}: {text}"


def _settle(timeout: float = SETTLE_SECONDS) -> None:
  """Lets orbax's background save threads that are still alive end (``timeout`` seconds per
  pass). After one of a save's threads failed, orbax raises at once while its sibling threads
  (the arrays, their metadata) are still writing: closing the manager under them makes them
  fail again and print tracebacks ("cannot schedule new futures after shutdown", "Event loop
  is closed") after the program's own error line. Threads that still wait for a signal the
  failed one never sends (a read-only folder) are then cancelled and their signals set: they
  would otherwise hold the process for orbax's 300 s barrier timeout after the error line."""
  own = threading.current_thread()
  for release in (False, True):
    end = time.monotonic() + timeout
    for thread in threading.enumerate():
      # pylint: disable-next=protected-access
      if thread is own or not isinstance(thread, ocp_future._SignalingThread):
        continue
      if release and thread.is_alive():
        thread.cancel()  # it returns at once once its signals arrive
        # pylint: disable-next=protected-access
        ocp_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
      # threading.Thread.join: orbax's own join raises the thread's error.
      threading.Thread.join(thread, max(0.0, end - time.monotonic()))


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
