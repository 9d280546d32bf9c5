"""A reader of ``torch.save`` files (``.pth``/``.pt``/``.bin``, the zip format
of torch >= 1.6) that needs no torch and runs no code from the file.

``load`` unpickles the archive's ``data.pkl`` with a restricted
``pickle.Unpickler``: storages map to numpy arrays read from the archive
(``persistent_load``), the tensor rebuild functions to numpy strided views
(copied, so no array aliases the file), ``collections.OrderedDict`` to itself,
and every other global to an inert placeholder. A checkpoint may carry
optimizer state or argparse namespaces next to its tensors; placeholders let
those load as opaque objects instead of failing or importing their classes.

What the file holds (a state_dict, a training checkpoint wrapping one) is the
caller's business: ``pretrained.read_torch_state_dict`` finds the state_dict.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class TorchPickleError(ValueError):
  """Not a readable torch.save archive; the message says what to do."""


def load(path: str) -> Any:
  """The object that ``torch.save`` wrote to ``path``, its tensors as
  C-contiguous numpy arrays of their own dtype (bfloat16/float8 as
  ml_dtypes'), views (transposes, slices, storage offsets) resolved.

  Raises:
    TorchPickleError: not a torch.save zip archive (a legacy pre-1.6 file, a
      TorchScript archive), an unsupported dtype, or a tensor outside its
      storage.
  """
  if not zipfile.is_zipfile(path):
    raise TorchPickleError(
        f"{path}: not a zip archive written by torch.save (torch >= 1.6); re-save it with"
        " torch.save(model.state_dict(), path) or as .safetensors."
    )
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if not pickles or any(n.endswith("constants.pkl") for n in names):
      raise TorchPickleError(
          f"{path}: a TorchScript or unknown archive, not a torch.save state_dict; save"
          " model.state_dict() with torch.save or as .safetensors."
      )
    pkl = min(pickles, key=len)
    prefix = pkl[: -len("data.pkl")]
    byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    with archive.open(pkl) as f:
      return _TorchUnpickler(f, archive, prefix, "<" if byteorder == "little" else ">", path).load()


_NUMPY_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
# torch's legacy typed-storage classes, named in the pickle (``torch.FloatStorage``).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 names the dtype
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What a storage class in the pickle (``torch.FloatStorage``) resolves to."""

  dtype: str


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  """What a dtype in the pickle (``torch.float32``) resolves to."""

  dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
  data: np.ndarray  # flat, of the storage's dtype and the file's byte order


class _Opaque:
  """Stands for any object of a class the reader does not know (optimizer
  state, argparse.Namespace, ...): takes any construction and state, runs no
  code."""

  def __new__(cls, *args, **kwargs):
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass

  def __setitem__(self, key, value):
    pass

  def append(self, value):
    pass

  def extend(self, values):
    pass


def _opaque(module: str, name: str) -> type:
  return type(f"{module}.{name}", (_Opaque,), {})


class _TorchUnpickler(pickle.Unpickler):
  """``data.pkl`` of a torch.save archive, tensors as numpy arrays."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
    self._storages: dict[str, bytes] = {}

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor_v2
    if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
      return self._rebuild_tensor_v3
    if (module, name) in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
      return lambda data, *args: data
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
      return lambda func, new_type, args, state: func(*args)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _NUMPY_DTYPES:
      return _TorchDtype(name)
    if (module, name) == ("torch", "Size"):
      return tuple
    return _opaque(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise TorchPickleError(f"{self._path}: unknown persistent id {pid!r} in data.pkl; not a torch.save file?")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise TorchPickleError(
          f"{self._path}: storage of unsupported type {getattr(storage_type, '__name__', storage_type)}"
          f"; supported dtypes: {sorted(_NUMPY_DTYPES)}. Convert the tensors (e.g. .float()) and re-save."
      )
    if key not in self._storages:
      self._storages[key] = self._archive.read(f"{self._prefix}data/{key}")
    dtype = np.dtype(_NUMPY_DTYPES[storage_type.dtype]).newbyteorder(self._byteorder)
    raw = self._storages[key]
    return _Storage(np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize))

  def _tensor(self, storage: _Storage, offset: int, size, stride) -> np.ndarray:
    flat, size, stride = storage.data, tuple(size), tuple(stride)
    if 0 in size:
      return np.zeros(size, flat.dtype.newbyteorder("="))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size or min(stride, default=0) < 0:
      raise TorchPickleError(f"{self._path}: a tensor of shape {size} lies outside its storage; the file is corrupt.")
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride])
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")  # a copy: no view of the file

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return self._tensor(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype):
      raise TorchPickleError(
          f"{self._path}: a tensor of unsupported dtype {dtype}; supported: {sorted(_NUMPY_DTYPES)}."
          " Convert it (e.g. .float()) and re-save."
      )
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype.dtype]).newbyteorder(self._byteorder)
    raw = storage.data  # untyped: bytes
    return self._tensor(_Storage(raw[: raw.size - raw.size % np_dtype.itemsize].view(np_dtype)), offset, size, stride)
