"""Safe outputs: one writer per workdir, staged files published by rename, atomic writes.

A run claims its workdir (an exclusive advisory lock on the workdir folder itself, which the
kernel releases when the process dies, so a killed run never blocks its restart, and which no
deleted file can undo), validates everything, computes everything,
then writes into a staging folder inside the workdir and renames each finished file into
place, so a failure never leaves half-written outputs behind (a crash during the final renames
leaves only complete files). Staging folders and temporary files of an earlier killed run are
removed when the next run claims the workdir. A workdir the run created is removed again when
the run is refused before writing anything.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from disentangle_jax import errors

STAGING_PREFIX = ".staging-"
TMP_MARKER = ".tmp-"  # write_atomic's temporary names: <name>.tmp-<pid>
LOCK_FILE = ".lock"


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes a whole file under a temporary name in its folder, then renames it into place."""
  tmp = f"{path}{TMP_MARKER}{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def remove_stale(workdir: str, log: Callable[[str], None] = print) -> int:
  """Removes staging folders and temporary files that a killed run left in ``workdir``
  (call only while holding its lock). Returns how many were removed."""
  removed = 0
  for dirpath, dirnames, filenames in os.walk(workdir):
    for name in list(dirnames):
      if dirpath == workdir and name.startswith(STAGING_PREFIX):
        shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
        dirnames.remove(name)
        removed += 1
    for name in filenames:
      if TMP_MARKER in name or (dirpath == workdir and name.startswith(STAGING_PREFIX)):
        with contextlib.suppress(OSError):
          os.remove(os.path.join(dirpath, name))
          removed += 1
  if removed:
    log(f"removed {removed} unfinished file(s) of an earlier interrupted run in {workdir}")
  return removed


class Lock:
  """An exclusive, non-blocking advisory lock (flock: released by the kernel when the holder
  exits or is killed) on the workdir folder itself and on ``<workdir>/.lock``.

  The folder's lock is the guarantee: a user can delete ``.lock`` from under a running process
  (and a second run would then lock a new file of the same name), but not the folder it runs
  in. ``.lock`` records the holder's pid for the message, and still excludes a second run where
  a filesystem refuses locks on folders (some network filesystems; then deleting ``.lock``
  defeats it, as before).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fds: list[int] = []
    try:
      self._fds.append(os.open(workdir, os.O_RDONLY | os.O_DIRECTORY))
      try:
        fcntl.flock(self._fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._busy(workdir) from None
      except OSError:  # no locks on folders here: the file's lock alone
        os.close(self._fds.pop())
      self._fds.append(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
      try:
        fcntl.flock(self._fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise self._busy(workdir) from None
    except BaseException:
      for fd in self._fds:
        os.close(fd)
      self._fds = []
      raise
    os.ftruncate(self._fds[-1], 0)
    os.pwrite(self._fds[-1], f"{os.getpid()}\n".encode(), 0)

  def _busy(self, workdir: str) -> errors.WorkdirBusy:
    try:
      with open(self.path, "rb") as f:  # the holder's pid, unless its .lock was deleted
        holder = f.read(64).decode(errors="replace").strip() or "unknown"
    except OSError:
      holder = "unknown"
    return errors.WorkdirBusy(
        f"workdir {workdir!r} is in use by another run (pid {holder}): wait for it to "
        "finish, or use another --workdir.")

  def release(self) -> None:
    for fd in reversed(self._fds):
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
    self._fds = []


@contextlib.contextmanager
def claim(workdir: str, lock: bool = True,
          log: Callable[[str], None] = print) -> Iterator[str]:
  """Creates ``workdir`` if needed, takes its lock, removes an earlier run's leftovers, and
  yields its absolute path. If the run ends with an error and the workdir did not exist
  before, it is removed again when nothing but the lock was written.

  ``lock=False`` (processes other than 0 of a multi-process run): only checks the path.
  """
  existed = os.path.isdir(os.path.abspath(workdir)) if workdir else False
  path = ensure_writable(workdir)
  held = Lock(path) if lock else None
  try:
    if held is not None:
      remove_stale(path, log)
    yield path
  except BaseException:
    if held is not None and not existed:
      _remove_if_empty(path)
    raise
  finally:
    if held is not None:
      held.release()


def _remove_if_empty(path: str) -> None:
  """Removes a workdir that holds no file but the lock (empty folders do not count)."""
  for dirpath, _, filenames in os.walk(path):
    if any(not (dirpath == path and n == LOCK_FILE) for n in filenames):
      return
  shutil.rmtree(path, ignore_errors=True)


def ensure_writable(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that files can be written there."""
  if not workdir:
    raise errors.UserError("workdir is empty: pass --workdir=DIR (it is created if missing).")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f"workdir {workdir!r} exists and is not a directory: choose another path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=STAGING_PREFIX)
    os.close(fd)
    # The probe may already be gone: process 0 of a multi-process run removes leftovers with
    # this prefix (remove_stale) while the other processes check the same workdir.
    with contextlib.suppress(FileNotFoundError):
      os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"workdir {workdir!r} is not writable ({e.strerror}): choose a directory "
                     "you can write to.") from None
  return workdir


class Staging:
  """Collects files in a hidden folder of the workdir; ``publish`` renames them into place."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = tempfile.mkdtemp(dir=workdir, prefix=STAGING_PREFIX)
    self._names: list[str] = []

  def _target(self, name: str) -> str:
    path = os.path.join(self.path, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._names.append(name)
    return path

  def write_bytes(self, name: str, data: bytes) -> None:
    if name in self._names:
      raise ValueError(f"two outputs are both named {name!r}: output names must be unique.")
    with open(self._target(name), "wb") as f:
      f.write(data)

  def write_text(self, name: str, text: str) -> None:
    self.write_bytes(name, text.encode())

  def write_json(self, name: str, obj: Any) -> None:
    self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

  def write_image(self, name: str, image) -> None:
    """Writes a PIL image (format from the extension)."""
    buf = io.BytesIO()
    image.save(buf, format=os.path.splitext(name)[1][1:].upper().replace("JPG", "JPEG"))
    self.write_bytes(name, buf.getvalue())

  def publish(self) -> list[str]:
    """Moves every staged file to its place in the workdir (atomic per file)."""
    published = []
    for name in self._names:
      dst = os.path.join(self.workdir, name)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.replace(os.path.join(self.path, name), dst)
      published.append(dst)
    self.discard()
    return published

  def discard(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def staged(workdir: str) -> Iterator[Staging]:
  """``with staged(wd) as out: out.write_...`` publishes on success, discards on error."""
  stage = Staging(workdir)
  try:
    yield stage
  except BaseException:
    stage.discard()
    raise
  stage.publish()
