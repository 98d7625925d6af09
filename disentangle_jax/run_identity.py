"""What a run IS: every setting and input file that changes its results, as a flat dict.

A resumable program stores its identity beside its saved state (checkpoint metadata, the
study's manifest) and refuses to resume when the identity differs, listing the differing
fields. Settings are the flattened config (``model.path``, ``loss.beta``, ...); every setting
that names a file or folder also gets a content fingerprint (``model.path#content``) and the
modification times of its files (``model.path#modified``), so a model folder replaced in place,
or a file edited anywhere (also in its middle, at the same size), is noticed too. Settings that
cannot change results (``checkpoint_every``, the preset table) are left out.

Fingerprints are cheap on multi-GiB weights: per file its relative path, size and the SHA-256
of its first and last MiB (the whole file when smaller), and its modification time in
nanoseconds. Not a full hash: SHA-256 of a 4 GB UNet costs about 81 s at this project's
2-core VM's measured speed under load (49 MB/s; 200 MB in 4.1 s) and a few seconds even on an
idle core with SHA extensions, on every start of every program; size + mtime + edges costs
microseconds. The price: a model folder copied or touched without changing a byte (new
modification times) counts as changed, and a resume is refused until the saved settings or a
new workdir are given; an edit that restores the old modification time by hand is not noticed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

from disentangle_jax import errors

# Config leaves that never change results (only how often state is saved, lookup tables
# whose chosen entries already appear as their own fields, or the device layout: like the
# device count, the mesh changes float reduction order only, so a run may resume on another).
NEUTRAL_FIELDS = ("checkpoint_every", "presets", "grid_seeds", "mesh")
# Settings added after runs were saved, with the value that reproduces those runs: a saved
# identity without the setting equals a current one at this value.
ADDED_DEFAULTS = {"lambda_shape": "per_step"}
# Config leaves that name files or folders whose contents matter.
FILE_FIELDS = ("path", "clip_path", "vgg_path", "tokenizer_path", "config_path", "image",
               "images_dir", "weights", "weights_files")
_EDGE_BYTES = 1 << 20
# Identity fields added since runs were saved that such runs lack: a saved identity without
# the field resumes (with the weaker check it was saved under). By suffix.
_ADDED_SUFFIXES = ("#modified",)
_EMPTY = (None, "", [], {}, False)
_MAX_LISTED = 12


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}, "c": [{"d": 2}]} -> {"a.b": 1, "c.0.d": 2}; leaves become JSON-stable
  values (tuples -> lists)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    elif (isinstance(value, (list, tuple)) and value
          and all(isinstance(v, Mapping) for v in value)):  # e.g. the edits of a set
      out.update(flatten({str(i): v for i, v in enumerate(value)}, name + "."))
    else:
      out[name] = json.loads(json.dumps(value, default=str))
  return out


def _files(path: str) -> list[tuple[str, str]] | None:
  """(relative path, path) of a file or of every file below a folder; None if neither."""
  if os.path.isfile(path):
    return [(os.path.basename(path), path)]
  if os.path.isdir(path):
    return sorted((os.path.relpath(os.path.join(d, n), path), os.path.join(d, n))
                  for d, _, names in os.walk(path) for n in names)
  return None


def file_fingerprint(path: str) -> str:
  """A content fingerprint of a file or of every file below a folder ("missing" if neither)."""
  files = _files(path)
  if files is None:
    return "missing"
  h = hashlib.sha256()
  for rel, full in files:
    size = os.path.getsize(full)
    h.update(f"{rel}\0{size}\0".encode())
    with open(full, "rb") as f:
      h.update(f.read(_EDGE_BYTES))
      if size > 2 * _EDGE_BYTES:
        f.seek(-_EDGE_BYTES, os.SEEK_END)
        h.update(f.read())
      elif size > _EDGE_BYTES:
        h.update(f.read())
  return h.hexdigest()[:16]


def modified_fingerprint(path: str) -> str:
  """A hash of the modification times (ns) of a file or of every file below a folder: an edit
  in a file's middle that the edges and the size miss still moves its mtime."""
  files = _files(path)
  if files is None:
    return "missing"
  h = hashlib.sha256()
  for rel, full in files:
    h.update(f"{rel}\0{os.stat(full).st_mtime_ns}\0".encode())
  return h.hexdigest()[:16]


def _paths(value) -> Iterable[str]:
  if isinstance(value, str):
    return [p.strip() for p in value.split(",") if p.strip()]
  if isinstance(value, (list, tuple)):
    return [p for v in value for p in _paths(v)]
  return []


def of_config(config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
  """The identity of a run configured by ``config`` (a ConfigDict's ``to_dict()`` or any
  nested mapping) plus ``extra`` settings the program derives itself."""
  flat = {k: v for k, v in flatten(config).items()
          if k.split(".")[0] not in NEUTRAL_FIELDS and k.split(".")[-1] not in NEUTRAL_FIELDS}
  for key in sorted(flat):
    if key.split(".")[-1] in FILE_FIELDS:
      paths = list(_paths(flat[key]))
      if paths:
        flat[key + "#content"] = [file_fingerprint(p) for p in paths]
        flat[key + "#modified"] = [modified_fingerprint(p) for p in paths]
  flat.update(flatten(dict(extra or {})))
  return flat


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'field: saved X, now Y' for every field whose value differs (or exists on one side)."""
  out = []
  for key in sorted(set(stored) | set(current)):
    old, new = stored.get(key, "<unset>"), current.get(key, "<unset>")
    if "<unset>" in (old, new) and (old in _EMPTY or new in _EMPTY):
      continue  # a setting added since (or dropped), left at its empty default: no change
    if old == "<unset>" and ADDED_DEFAULTS.get(key.split(".")[-1], "<none>") == new:
      continue  # a setting added since, at the value the saved run had
    if old == "<unset>" and key.endswith(_ADDED_SUFFIXES):
      continue  # a check added since: the saved run resumes under the check it had
    if old != new:
      out.append(f"{key}: saved {_short(old)}, now {_short(new)}")
  return out


def check(stored: Mapping[str, Any], current: Mapping[str, Any], what: str, fix: str) -> None:
  """Raises RunMismatch listing the differences between two identities (none: returns)."""
  diff = differences(stored, current)
  if not diff:
    return
  shown = "; ".join(diff[:_MAX_LISTED]) + (f"; ... {len(diff) - _MAX_LISTED} more"
                                           if len(diff) > _MAX_LISTED else "")
  raise errors.RunMismatch(
      f"{what} was saved by a run with other settings ({shown}). Either rerun with the saved "
      f"settings to resume it, or {fix}.")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def content_key(data: bytes, *settings) -> str:
  """A hex key of some input's bytes and the settings applied to it (their repr): e.g. one
  checkpoint folder per (image, inversion) of launch.edit, so a changed image never resumes
  another image's run."""
  return hashlib.sha256(data + repr(settings).encode()).hexdigest()
