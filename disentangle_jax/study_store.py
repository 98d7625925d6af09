"""The transfer study's resumable chunk store: exactly once, whatever kills the run.

Units are processed in fixed chunks of ``batch_size`` units, one compiled call each (padded to
the device count and masked). A finished chunk's rows are written atomically
(workdir.write_atomic) as rows/chunk_NNNNN.jsonl, the chunk's commit marker; its sample images
are written before it. A restart skips every chunk whose file holds the rows it should;
``merge_rows`` gathers the final table in a fixed order, so a killed-and-restarted study ends
with the same rows, each exactly once, as an uninterrupted one. The manifest
(rows/study.json) keeps rows of different studies apart.

Every chunk proves what it is: its first line records the run identity it was computed under
(``study_identity``: the spec, the model and loss models with their files' fingerprints, image
size, dtype) and the SHA-256 of its rows' text. On resume and at the merge, a chunk whose
identity differs from this run's (a manifest deleted, then another model) or whose checksum
fails (a number edited by hand, +0.5 or NaN) is computed again, one log line each, so rows of
two runs or edited numbers are never merged. The checksum catches accidents and hand edits,
not someone who rewrites it too. A chunk whose sample images (derived files) are missing or
unreadable is computed again as well (bit-identical rows on the same device layout).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from disentangle_jax import errors, images, noise, parallel, run_identity, study, workdir

ROWS_DIR = "rows"
SAMPLES_DIR = "samples"
MANIFEST = "study.json"
CHUNK_FORMAT = "disentangle_jax.study_chunk"  # the header line's "format"


def chunk_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, ROWS_DIR, f"chunk_{index:05d}.jsonl")


def sample_path(out_dir: str, attribute: str, seed: int, label: str) -> str:
  return os.path.join(out_dir, SAMPLES_DIR, attribute,
                      f"seed{seed}_{study.file_label(label)}.png")


def study_identity(spec: study.StudySpec, identity: dict | None = None) -> dict:
  """What the manifest and every chunk record: the spec's fields plus ``identity``
  (run_identity.of_config: the model and loss models, their files' fingerprints, image size,
  dtype)."""
  return run_identity.flatten({"spec": spec.record()}) | dict(identity or {})


def check_manifest(out_dir: str, spec: study.StudySpec, identity: dict | None = None) -> None:
  """Refuses a workdir holding rows of a different study; records this study's identity
  (``study_identity``)."""
  path = os.path.join(out_dir, ROWS_DIR, MANIFEST)
  current = study_identity(spec, identity)
  fix = (f"use a new --workdir (or delete {os.path.join(out_dir, ROWS_DIR)!r} to start the "
         "study over)")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        saved = json.load(f)
      saved["fingerprint"]  # noqa: B018 -- a manifest without it is damaged
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.UserError(f"the study manifest {path!r} is damaged ({e}): {fix}.") from None
    if "identity" in saved:
      run_identity.check(saved["identity"], current,
                         f"workdir {out_dir!r} holds rows of a different study; its manifest", fix)
    elif saved["fingerprint"] != spec.fingerprint():
      raise errors.RunMismatch(f"workdir {out_dir!r} holds rows of a different study: {fix}.")
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  workdir.write_atomic(path, json.dumps({"fingerprint": spec.fingerprint(),
                                         "spec": spec.record(),
                                         "identity": current}, indent=2))


def chunk_text(rows: Sequence[dict[str, Any]], identity: dict, index: int) -> str:
  """A chunk file: a header line (format, chunk index, identity, SHA-256 of the rows' text),
  then one JSON row per line."""
  body = "".join(json.dumps(r) + "\n" for r in rows)
  header = {"format": CHUNK_FORMAT, "chunk": index, "identity": identity,
            "rows_sha256": hashlib.sha256(body.encode()).hexdigest()}
  return json.dumps(header) + "\n" + body


def read_chunk(path: str, spec: study.StudySpec, index: int,
               identity: dict | None = None) -> tuple[list[dict[str, Any]] | None, str]:
  """(rows of a finished chunk, "") or (None, why it is computed again): its file is missing,
  damaged (truncated, rows of other units, not numbers), fails its checksum (edited), was
  computed under another identity than ``study_identity(spec, identity)``, or predates the
  header (chunks written before they recorded identity and checksum cannot be verified, so
  they are computed again rather than trusted)."""
  if not os.path.isfile(path):
    return None, "is missing"
  damaged = "is damaged (not the rows this study writes)"
  try:
    with open(path) as f:
      header_line, body = f.readline(), f.read()
    header = json.loads(header_line)
    if not isinstance(header, dict):
      return None, damaged
    if header.get("format") != CHUNK_FORMAT:
      return None, ("is damaged or was written before chunks recorded their identity and "
                    "checksum (it cannot be verified)")
    if header.get("chunk") != index:
      return None, f"holds the rows of chunk {header.get('chunk')!r}"
    if header.get("rows_sha256") != hashlib.sha256(body.encode()).hexdigest():
      return None, "fails its checksum (its rows were edited or cut)"
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    keys = [(r["source"], r["attribute"], r["seed"]) for r in rows]
    values_ok = all(isinstance(r[m], float) for r in rows for m in spec.metric_names)
    diff = run_identity.differences(header["identity"], study_identity(spec, identity))
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None, damaged
  if diff:
    shown = "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "")
    return None, f"was computed under other settings ({shown})"
  expected = [(src.label, spec.attributes[a].name, seed) for a, seed in spec.chunk(index)
              for src in spec.sources]
  return (rows, "") if keys == expected and values_ok else (None, damaged)


def _unreadable_sample(out_dir: str, spec: study.StudySpec, index: int) -> str | None:
  """The first sample image of chunk ``index`` (grid seeds only) that is missing or cannot be
  decoded, or None."""
  grid_seeds = set(spec.seeds[:spec.grid_seeds])
  for a, seed in spec.chunk(index):
    if seed not in grid_seeds:
      continue
    for label in ["c0"] + [s.label for s in spec.sources]:
      path = sample_path(out_dir, spec.attributes[a].name, seed, label)
      try:
        images.load_png(path)
      except (OSError, ValueError, SyntaxError):  # missing, truncated, not a PNG
        return path
  return None


def chunk_rows(spec: study.StudySpec, units: Sequence[tuple[int, int]],
               values: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """The rows of one chunk's real units; ``values`` are [U_padded, K]: padding is masked out."""
  rows = []
  for j, (a, seed) in enumerate(units):
    for k, src in enumerate(spec.sources):
      row = {"source": src.label, "attribute": spec.attributes[a].name, "seed": seed}
      if spec.images:
        row["image"] = os.path.basename(spec.images[seed])
      row.update({name: float(values[name][j, k]) for name in spec.metric_names})
      rows.append(row)
  return rows


def run(evaluate: Callable, inputs: study.StudyInputs, spec: study.StudySpec, latent_shape, mesh,
        out_dir: str, log: Callable[[str], None] = print, write: bool = True,
        unit_inputs: Callable | None = None, score_fn: Callable | None = None,
        identity: dict | None = None) -> int:
  """Processes every chunk without a valid rows file (``read_chunk``: present, unedited, of
  this identity, its sample images readable); returns the number of chunks computed.

  ``write``: whether this process writes files (process 0 of a multi-host run); every process
  must still call ``evaluate`` on every chunk, since the computation is global.
  ``unit_inputs(units) -> RunNoise``: x_T and noise of (attribute, seed) units; default: drawn
  from the seeds (noise.draw); real images: ``image_inputs``.
  ``score_fn(images [U, 1 + K, h, w, 3] in [0, 1], attr [U]) -> {name: [U, K]}``: the host-side
  ``spec.scores`` of a chunk's real units (column 0 of images is the original).
  ``identity``: what check_manifest was given (run_identity.of_config); every chunk records it.
  """
  if tuple(spec.scores) and score_fn is None:
    raise ValueError(f"the study has scores {spec.scores} but no score_fn computes them.")
  size = parallel.padded_size(spec.batch_size, mesh)
  labels = ["c0"] + [s.label for s in spec.sources]
  sigma = parallel.to_host(inputs.tables.sigma)
  grid_seeds = set(spec.seeds[:spec.grid_seeds])
  current = study_identity(spec, identity)
  # Process 0's files decide (hosts of a pod need not share a filesystem).
  valid = []
  for i in range(spec.num_chunks):
    rows, why = read_chunk(chunk_path(out_dir, i), spec, i, identity)
    bad_sample = _unreadable_sample(out_dir, spec, i) if rows is not None else None
    if write and rows is None and why != "is missing":
      log(f"{chunk_path(out_dir, i)} {why}: computing that chunk again")
    elif write and bad_sample is not None:
      log(f"{bad_sample} (a sample image of {chunk_path(out_dir, i)}) is missing or unreadable: "
          "computing that chunk again")
    valid.append(rows is not None and bad_sample is None)
  finished = parallel.agree(np.asarray(valid))
  todo = [i for i in range(spec.num_chunks) if not finished[i]]
  if write:
    os.makedirs(os.path.join(out_dir, ROWS_DIR), exist_ok=True)
  done_items = len(spec.sources) * sum(
      len(spec.chunk(i)) for i in range(spec.num_chunks) if i not in todo)
  log(f"{spec.num_items} items ({len(spec.sources)} sources x {len(spec.attributes)} attributes "
      f"x {len(spec.seeds)} seeds) in {spec.num_chunks} chunks; {len(todo)} to do, "
      f"{mesh.size} device(s), batch {spec.batch_size} padded to {size}")
  if todo:
    log("compiling the study's program (the first chunk includes it) ...")
  # The rate counts from the end of the first computed chunk, so it excludes compilation.
  start, computed, first_done = time.perf_counter(), 0, done_items
  for index in todo:
    units = spec.chunk(index)
    padded = units + [units[-1]] * (size - len(units))
    if unit_inputs is None:
      drawn = noise.draw(jax.random.key(spec.sampling.rng_seed),
                         np.asarray([s for _, s in padded]),
                         latent_shape, sigma)
    else:
      drawn = unit_inputs(padded)
    values, rendered = evaluate(inputs, parallel.shard(np.asarray([a for a, _ in padded]), mesh),
                                parallel.shard(np.asarray(drawn.x_T), mesh),
                                parallel.shard(np.asarray(drawn.noise), mesh, axis=1))
    keep = parallel.mask(len(units), size) > 0  # padding is computed, never reported
    values = {k: parallel.to_host(v)[keep] for k, v in values.items()}
    samples = [j for j, (_, seed) in enumerate(units) if seed in grid_seeds]
    host = parallel.to_host(rendered) if samples or spec.scores else None
    if spec.scores:
      values.update(score_fn(host[keep], np.asarray([a for a, _ in units])))
    pixels = images.to_uint8(host) if samples else None
    if write:
      for j in samples:
        a, seed = units[j]
        for c, label in enumerate(labels):
          path = sample_path(out_dir, spec.attributes[a].name, seed, label)
          os.makedirs(os.path.dirname(path), exist_ok=True)
          workdir.write_atomic(path, images.png_bytes(pixels[j, c]))
      rows = chunk_rows(spec, units, values)
      workdir.write_atomic(chunk_path(out_dir, index), chunk_text(rows, current, index).encode())
    computed += 1
    done_items += len(units) * len(spec.sources)
    now = time.perf_counter()
    if computed == 1:  # includes compilation; later chunks are timed from here
      rate = (done_items - first_done) / (now - start)
      start, first_done = now, done_items
    else:
      rate = (done_items - first_done) / (now - start)
    # The first chunk's time is mostly compilation: no ETA from it (it would be far too long).
    eta = (f"{rate:.2f} items/s, ETA {(spec.num_items - done_items) / rate:.1f}s"
           if computed > 1 else "compiled; the rate and ETA follow from the next chunk")
    log(f"chunk {index + 1}/{spec.num_chunks} done: {done_items}/{spec.num_items} items, {eta}")
  return computed


def merge_rows(out_dir: str, spec: study.StudySpec,
               identity: dict | None = None) -> list[dict[str, Any]]:
  """Every row in the fixed order (chunk by chunk); checks that each item is there once and
  that every chunk is still valid (``read_chunk``: a chunk changed since ``run`` is an error;
  the rerun computes it again)."""
  rows = []
  for i in range(spec.num_chunks):
    chunk, why = read_chunk(chunk_path(out_dir, i), spec, i, identity)
    if chunk is None:
      raise errors.UserError(
          f"{chunk_path(out_dir, i)} {why}: rerun the same command to compute it again.")
    rows += chunk
  return rows
