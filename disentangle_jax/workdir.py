"""Safe outputs: check a workdir is writable up front, stage files, publish them by rename.

A run validates everything, computes everything, then writes into a staging folder inside the
workdir and renames each finished file into place, so a failure never leaves half-written
outputs behind (a crash during the final renames leaves only complete files).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

STAGING_PREFIX = ".staging-"


def ensure_writable(workdir: str) -> str:
  """Creates ``workdir`` if needed and checks that files can be written there."""
  if not workdir:
    raise ValueError("workdir is empty: pass --workdir=DIR (it is created if missing).")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory: choose another path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=STAGING_PREFIX):
      pass
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable ({e.strerror}): choose a directory "
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
