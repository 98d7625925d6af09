"""PyTorch ``torch.save`` files (.ckpt) -> numpy arrays, without torch and without running code.

A ``.ckpt`` of the original training code is a zip archive (``<name>/data.pkl`` plus one file
per tensor storage under ``<name>/data/``) whose pickle holds, besides the weights, whatever
the trainer saved: PyTorch Lightning callback objects, optimizer states, numpy scalars, hyper-
parameters. Unpickling it normally imports and calls every class and function the pickle
names, which is how a pickle runs arbitrary code.

``load`` reads it with a restricted unpickler that calls nothing it does not know:

  - the tensor rebuild functions of ``torch._utils`` and the storage types (``torch.FloatStorage``
    ...) are answered by this module's own numpy code (``_Tensor``: a view of a storage, read
    from the archive only when the caller asks for its array);
  - ``collections.OrderedDict`` is a plain dict;
  - every other global (Lightning callbacks, numpy scalars, ``builtins.eval``, ...) becomes an
    inert ``Opaque`` stand-in that records the name and whose construction does nothing; the
    real object is never imported, created or called.

The result is the pickle's structure with tensors as ``_Tensor`` views and unknown objects as
stand-ins; ``arrays`` keeps the tensors of one dict (e.g. its "state_dict").
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

# torch storage type name -> numpy dtype (bfloat16 is read as uint16 and widened to float32).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_REBUILD = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
            "_rebuild_parameter_with_state")


class NotATorchZip(ValueError):
  """The file is not a torch.save zip archive (e.g. the legacy pre-1.6 format)."""


class Opaque:
  """A stand-in for an object of a class this reader does not know: it records the class's
  dotted name and ignores every argument and state (the real class is never imported)."""

  name = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):  # a pickled dict subclass fills itself item by item
    del key, value

  def append(self, value):  # ... and a list subclass
    del value

  def extend(self, values):
    del values

  def __repr__(self):
    return f"<{self.name}, not loaded>"


def _opaque(name: str) -> type:
  return type(name.rsplit(".", 1)[-1], (Opaque,), {"name": name})


class _StorageType:
  """A storage type of the pickle (``torch.FloatStorage`` ...): only its dtype; not callable."""

  def __init__(self, dtype):
    self.dtype = dtype


class _Storage:
  """One tensor storage in the archive (read when a tensor of it is materialised)."""

  def __init__(self, archive: zipfile.ZipFile, member: str, dtype):
    self.archive, self.member, self.dtype = archive, member, dtype

  def read(self) -> np.ndarray:
    raw = self.archive.read(self.member)
    if self.dtype == "bfloat16":  # the high 16 bits of a float32
      return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, np.dtype(self.dtype).newbyteorder("<"))


class _Tensor:
  """A tensor of the pickle: a strided view of a storage, read by ``array``."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def array(self) -> np.ndarray:
    flat = self.storage.read()
    # The view must lie inside its storage: as_strided reads whatever memory it is told to.
    if len(self.shape) != len(self.stride) or min(self.shape + self.stride + (self.offset,),
                                                 default=0) < 0:
      raise ValueError(f"a tensor of {self.storage.member} has size {self.shape} and stride "
                       f"{self.stride}")
    if 0 in self.shape:
      return np.zeros(self.shape, flat.dtype)
    end = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
    if end > flat.size:
      raise ValueError(f"a tensor of {self.storage.member} reaches element {end} of a storage "
                       f"of {flat.size}")
    if not self.shape:
      return np.array(flat[self.offset])
    item = flat.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[self.offset:], self.shape, tuple(s * item for s in self.stride)).copy()


def _rebuild(name: str):
  def rebuild(*args, **kwargs):
    del kwargs
    if name.startswith("_rebuild_parameter"):
      return args[0]  # (data, requires_grad, backward_hooks[, state])
    storage, offset, size, stride = args[:4]
    return _Tensor(storage, offset, size, stride)
  return rebuild


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of tensors and plain containers; everything else is Opaque."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix = archive, prefix
    self.unknown: list[str] = []

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in _REBUILD:
      return _rebuild(name)
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    self.unknown.append(f"{module}.{name}")
    return _opaque(f"{module}.{name}")

  def persistent_load(self, pid):
    # ("storage", storage type, key, location, numel): the storage is <prefix>data/<key>.
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unknown storage type {getattr(storage_type, 'name', '?')}")
    return _Storage(self.archive, f"{self.prefix}data/{key}", storage_type.dtype)


def load(path) -> tuple[Any, list[str]]:
  """(the pickle's object with tensors as lazy views and unknown objects as Opaque stand-ins,
  the dotted names of the unknown globals it named). Never imports or calls them.

  Raises:
    NotATorchZip: not a zip archive with a data.pkl. pickle.UnpicklingError / other errors of
    a damaged file propagate.
  """
  if not zipfile.is_zipfile(path):
    raise NotATorchZip(f"{path} is not a zip archive")
  archive = zipfile.ZipFile(path)
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
  if not pickles:
    raise NotATorchZip(f"{path} has no data.pkl")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = f"{prefix}byteorder"
  if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
    raise NotATorchZip(f"{path} was saved on a big-endian machine")
  unpickler = _Unpickler(archive.read(pickles[0]), archive, prefix)
  return unpickler.load(), unpickler.unknown


def arrays(obj) -> dict[str, np.ndarray]:
  """{name: array} of the tensor entries of a dict from ``load`` (other entries dropped)."""
  if not isinstance(obj, dict):
    return {}
  return {str(k): v.array() for k, v in obj.items() if isinstance(v, _Tensor)}
