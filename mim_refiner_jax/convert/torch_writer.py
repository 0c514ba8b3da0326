"""Writes PyTorch `torch.save` files without torch.

The run-time install has no torch (hosts such as TPU VMs do not need its wheels), yet users want
`.th` / `.pth` files that `torch.load(f, weights_only=True)` reads. This module writes torch's zip
format (the default since torch 1.6) directly:

  archive/data.pkl                 the object, pickled with protocol 2 as torch does; every tensor
                                   is `torch._utils._rebuild_tensor_v2(storage, offset, size,
                                   stride, requires_grad=False, OrderedDict())` and every storage a
                                   persistent id ("storage", torch.<Dtype>Storage, key, "cpu", numel)
  archive/.format_version, archive/.storage_alignment, archive/byteorder ("little")
  archive/data/<key>               raw little-endian bytes of one tensor, aligned to 64 bytes in the
                                   file (as torch aligns them, so `torch.load(mmap=True)` works)
  archive/version                  "3"
  archive/.data/serialization_id
  archive/<name>                   optional extra records (`extra_records`); torch ignores them,
                                   our reader finds them (`torch_files.zip_record`): a timm state
                                   dict cannot hold the head count, this record can.

Only the globals above appear in the pickle (exactly what torch's weights-only unpickler and our
reader in torch_files.py accept). Values: numpy arrays (float32/16, bfloat16 via ml_dtypes,
float64, int8-64, uint8, bool) become tensors; dict, list, tuple, str, int, float, bool and None
stay as they are.
"""

import collections
import io
import os
import pickle
import secrets
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np

ARCHIVE = "archive"
ALIGNMENT = 64  # torch's storage alignment inside the zip file
_CHUNK = 64 << 20

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class _Global:
  """A module-level name written as a GLOBAL opcode, without importing its module (torch)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *unused):  # pickle requires reduce functions to be callable; never called
    raise TypeError(f"{self.module}.{self.name} is a pickle marker")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_TYPES = {dt: _Global("torch", name) for dt, name in _STORAGE_NAMES.items()}


class _StorageRef:
  """One tensor's storage: becomes the persistent id torch uses for it."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _Tensor:
  """A contiguous little-endian array to be written as one tensor with its own storage."""

  def __init__(self, storage: _StorageRef):
    self.storage = storage

  def __reduce__(self):
    shape = tuple(int(s) for s in self.storage.array.shape)
    strides, acc = [], 1
    for s in reversed(shape):
      strides.insert(0, acc)
      acc *= max(s, 1)
    return _REBUILD_TENSOR, (self.storage, 0, shape, tuple(strides), False,
                             collections.OrderedDict())


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler (its dispatch table can be extended) writing torch's records."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_marker(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[_Global] = _save_marker

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      array = obj.array
      return ("storage", _STORAGE_TYPES[array.dtype], obj.key, "cpu", int(array.size))
    return None


def _as_tensors(obj, storages: list):
  """Replaces numpy arrays by `_Tensor` records (collecting their storages) in a nested value."""
  if isinstance(obj, np.ndarray):
    array = obj
    if array.dtype not in _STORAGE_NAMES:
      raise TypeError(f"cannot write a {array.dtype} array as a torch tensor; "
                      f"supported: {sorted(d.name for d in _STORAGE_NAMES)}")
    if sys.byteorder != "little" and array.dtype.itemsize > 1:
      array = array.astype(array.dtype.newbyteorder("<"))
    storage = _StorageRef(str(len(storages)), np.require(array, requirements="C"))  # keeps 0-d arrays 0-d
    storages.append(storage)
    return _Tensor(storage)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _as_tensors(v, storages)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _as_tensors(v, storages) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_as_tensors(v, storages) for v in obj)
  if obj is None or isinstance(obj, (str, bytes, bool, int, float)):
    return obj
  raise TypeError(f"cannot write a {type(obj).__name__} into a torch file (only numpy arrays, "
                  f"dicts, lists, tuples, str, int, float, bool and None)")


def _write_record(zf: zipfile.ZipFile, name: str, data, nbytes: int) -> None:
  """Writes one stored (uncompressed) member whose data starts on an ALIGNMENT boundary."""
  info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = nbytes
  zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; it then adds 20 extra bytes
  header = 30 + len(info.filename.encode("utf-8")) + (20 if zip64 else 0) + 4
  pad = -(zf.fp.tell() + header) % ALIGNMENT
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad  # padding field, as torch writes it
  view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
  with zf.open(info, "w", force_zip64=zip64) as out:
    for start in range(0, nbytes, _CHUNK):
      out.write(view[start:start + _CHUNK])


def save(obj, path, extra_records: dict[str, bytes] | None = None) -> None:
  """Writes `obj` as `torch.save(obj, path)` would (numpy arrays become CPU tensors).

  extra_records: {name: bytes} written as archive/<name> next to the pickle.

  Written to `path + ".tmp"` first and renamed, so an interrupted write leaves no partial file.
  """
  path = os.fspath(path)
  storages = []
  record = _as_tensors(obj, storages)
  pkl = _pickle(record)
  tmp = path + ".tmp"
  try:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      _write_record(zf, "data.pkl", pkl, len(pkl))
      for name, text in ((".format_version", b"1"), (".storage_alignment", b"64"),
                         ("byteorder", b"little")):
        _write_record(zf, name, text, len(text))
      for storage in storages:
        raw = storage.array.reshape(-1).view(np.uint8)
        _write_record(zf, f"data/{storage.key}", raw, raw.nbytes)
      for name, data in (extra_records or {}).items():
        if name in ("data.pkl", "version", "byteorder") or name.startswith(("data/", ".")):
          raise ValueError(f"extra record name {name!r} is one of torch's own")
        _write_record(zf, name, data, len(data))
      serialization_id = "".join(str(secrets.randbelow(10)) for _ in range(40)).encode()
      for name, text in (("version", b"3\n"), (".data/serialization_id", serialization_id)):
        _write_record(zf, name, text, len(text))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _pickle(record) -> bytes:
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(record)
  return buf.getvalue()
