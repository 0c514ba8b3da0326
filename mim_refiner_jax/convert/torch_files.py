"""Safe, torch-free reading of PyTorch checkpoints (.pth/.pt/.th) and safetensors files.

`torch.load` unpickles, and unpickling can run any code a file asks for. Checkpoints from the web
(MAE, MAWS, data2vec 2.0, the refined releases; refiner_facts.md section 3) are read here instead,
without importing torch, so that hosts without torch (TPU VMs) can convert them too.

How it stays safe: a `pickle.Unpickler` whose `find_class` hands out only
  * our own re-implementations of torch's tensor rebuild functions (`_rebuild_tensor_v2`,
    `_rebuild_parameter`, ...): they build a lazy `TensorRef` and nothing else;
  * inert markers for storage classes (`torch.FloatStorage`, ...), `torch.Tensor`,
    `torch.nn.Parameter` and dtypes;
  * a few harmless builtins: `collections.OrderedDict`, `set`, `frozenset`, `slice`, `complex`,
    `bytearray`, and `_codecs.encode` restricted to latin-1 (how protocol 2 pickles `bytes`);
  * `collections.defaultdict` only with a plain container/number type (or no) factory, as
    omegaconf's resolver caches hold `defaultdict(dict)`; any other factory is refused;
  * `builtins.getattr` only on a stub (how protocol 2 pickles enum members, `Class.member`); it
    gives another stub;
  * `ConfigStub` classes for known configuration objects in fairseq checkpoints
    (`argparse.Namespace`, `omegaconf.*` nodes and metadata, `fairseq.*` dataclasses and enums,
    `enum.*`, `typing.*`, numpy scalars and arrays): a stub records the arguments and state it is
    given and never calls anything, so such entries load as inert records (calling a marker such
    as `torch.device("cpu")` also gives a stub). `config_to_python` turns the recorded state of
    an omegaconf `DictConfig` / `argparse.Namespace` back into plain dicts (fairseq's `cfg.model`).
  * the plain builtin types int, float, str, bool, dict, list, tuple (omegaconf records name
    them as key/element types; calling them only builds plain values).
Every other global is refused with `UnsafePickleError` before anything runs, e.g.
"refusing to unpickle global os.system from X: not a weights-only checkpoint".

Formats: torch's zip format (the default since torch 1.6: `data.pkl` + `data/<key>` storages),
torch's legacy format (`_use_new_zipfile_serialization=False`: consecutive pickles followed by raw
storages), and safetensors. The very old tar format and TorchScript archives are refused with a fix.

Tensors come back as `TensorRef`s: shape and dtype are known without reading any data, and
`np.asarray(ref)` reads the storage from disk once (one copy, straight into the numpy buffer; no
pickle-sized intermediate), so unused entries (optimizer state, EMA copies) never cost memory.
"""

import collections
import json
import os
import pickle
import struct
import weakref
import zipfile
import zlib

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The file asks for a global that a weights-only checkpoint does not need."""


class CheckpointFormatError(ValueError):
  """The file is not a checkpoint format this reader understands."""


# ----------------------------------------------------------------------------- lazy tensors
class _Source:
  """A file region holding one storage: `nbytes` bytes at absolute `offset` (or a zip member)."""

  def __init__(self, path: str, offset: int, nbytes: int, zip_member: str | None = None):
    self.path, self.offset, self.nbytes, self.zip_member = path, offset, nbytes, zip_member

  def read(self) -> np.ndarray:
    """Returns the bytes as a fresh, writable uint8 array (read once, no intermediate copy)."""
    if self.zip_member is not None:  # compressed zip member: torch never writes these
      with zipfile.ZipFile(self.path) as zf:
        return np.array(np.frombuffer(zf.read(self.zip_member), np.uint8))
    out = np.empty(self.nbytes, np.uint8)
    with open(self.path, "rb") as f:
      f.seek(self.offset)
      if f.readinto(memoryview(out)) != self.nbytes:
        raise CheckpointFormatError(f"{self.path}: truncated file (storage at byte {self.offset} "
                                    f"needs {self.nbytes} bytes)")
    return out


class _Storage:
  """A typed storage of `numel` elements; its data is read on first use and shared by its views."""

  def __init__(self, source: _Source, dtype: np.dtype, numel: int, key: str = ""):
    self.source, self.dtype, self.numel, self.key = source, np.dtype(dtype), numel, key
    # Weak reference to the bytes (the owner that numpy views point to): tensors sharing this
    # storage share one read, and the memory goes once the last of them is dropped.
    self._cache = lambda: None

  def data(self) -> np.ndarray:
    raw = self._cache()
    if raw is None:
      raw = self.source.read()
      if raw.size < self.numel * self.dtype.itemsize:
        raise CheckpointFormatError(f"{self.source.path}: storage {self.key!r} holds {raw.size} "
                                    f"bytes, expected {self.numel} x {self.dtype.itemsize}")
      self._cache = weakref.ref(raw)
    return raw[:self.numel * self.dtype.itemsize].view(self.dtype)


class TensorRef:
  """A tensor in a file: `shape`, `dtype` (numpy; bfloat16 via ml_dtypes) and `np.asarray(ref)`."""

  def __init__(self, storage: _Storage, offset: int, shape, strides=None):
    self.storage, self.offset = storage, int(offset)
    self.shape = tuple(int(s) for s in shape)
    if strides is None:  # C-contiguous
      strides, acc = [], 1
      for s in reversed(self.shape):
        strides.insert(0, acc)
        acc *= s
    self.strides = tuple(int(s) for s in strides)
    self.dtype = storage.dtype
    if any(s < 0 for s in self.shape + self.strides):
      raise CheckpointFormatError(f"negative size or stride in tensor {self.shape}/{self.strides}")
    last = self.offset + sum((n - 1) * st for n, st in zip(self.shape, self.strides) if n > 0)
    if self.shape and 0 in self.shape:
      last = self.offset - 1
    if last >= storage.numel or self.offset < 0:
      raise CheckpointFormatError(f"tensor of shape {self.shape} at offset {self.offset} runs past "
                                  f"its storage of {storage.numel} elements (corrupt file?)")

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def numpy(self) -> np.ndarray:
    """The tensor as a numpy array (a view of its storage when the layout allows)."""
    data = self.storage.data()
    if 0 in self.shape:
      return np.zeros(self.shape, self.dtype)
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[self.offset:], self.shape,
                                           [s * item for s in self.strides], writeable=False)
    if view.flags.c_contiguous or view.flags.f_contiguous:
      # A plain view of the storage array: writable, no copy (storage and tensor usually coincide).
      start = self.offset
      stop = start + self.size
      if view.flags.c_contiguous:
        return data[start:stop].reshape(self.shape)
      return data[start:stop].reshape(self.shape[::-1]).T
    return np.array(view)  # overlapping or gapped strides: copy

  def __array__(self, dtype=None, copy=None):
    arr = self.numpy()
    return arr if dtype is None else arr.astype(dtype)

  def __repr__(self):
    return f"TensorRef(shape={self.shape}, dtype={self.dtype.name})"


# ------------------------------------------------------------------------ the restricted unpickler
class ConfigStub:
  """An inert record of a configuration object (fairseq cfg/args); nothing is ever called.

  `global_name` is the pickled global ("argparse.Namespace"); `args`, `kwargs`, `state` and `items`
  hold what the pickle passed. Weights found inside a stub are not used.
  """
  global_name = "?"
  # Class-level defaults: protocol 2 creates objects with cls.__new__ (NEWOBJ), skipping __init__.
  args, kwargs, state = (), {}, None

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  @property
  def items(self) -> list:
    if "_items" not in self.__dict__:
      self.__dict__["_items"] = []
    return self.__dict__["_items"]

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"ConfigStub({self.global_name})"


def _stub_class(name: str) -> type:
  return type("ConfigStub", (ConfigStub,), {"global_name": name, "__module__": __name__})


def config_to_python(obj, _depth=0):
  """Plain dicts/lists/values from recorded configuration stubs (nothing is called).

  omegaconf `DictConfig` / `ListConfig` keep their children in state["_content"], value nodes
  (AnyNode, IntegerNode, EnumNode, ...) their value in state["_val"]; `argparse.Namespace` its
  attributes as state; an enum member recorded as `Enum(value)` gives its value, one recorded as
  `getattr(Enum, name)` its name. Other stubs (numpy scalars, ...) are returned as they are.
  """
  if _depth > 100:
    raise CheckpointFormatError("configuration nested deeper than 100 levels")
  recurse = lambda v: config_to_python(v, _depth + 1)  # pylint: disable=unnecessary-lambda-assignment
  if isinstance(obj, type) and issubclass(obj, ConfigStub):  # getattr(Enum, "member")
    return obj.global_name.rsplit(".", 1)[-1]
  if isinstance(obj, ConfigStub):
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
      state = {**(state[0] or {}), **state[1]}  # (__dict__, __slots__) state
    if isinstance(state, dict) and "_content" in state:
      return recurse(state["_content"])
    if isinstance(state, dict) and "_val" in state:
      return recurse(state["_val"])
    if obj.global_name == "argparse.Namespace" and isinstance(state, dict):
      return recurse(state)
    if not obj.global_name.startswith(("omegaconf.", "numpy.", "typing.")) and obj.state is None \
        and len(obj.args) == 1 and not obj.kwargs:
      return recurse(obj.args[0])  # an enum member pickled as Enum(value)
    return obj
  if isinstance(obj, dict):
    return {k: recurse(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(recurse(v) for v in obj)
  return obj


# Globals recorded as inert stubs: configuration objects of fairseq / hydra checkpoints (real
# data2vec 2.0 files: argparse args, omegaconf cfg with Metadata/ContainerMetadata/nodes, enum
# members, typing.Any/Dict/List as omegaconf key/element types, numpy values in extra_state).
_STUB_PREFIXES = ("argparse.Namespace", "omegaconf.", "fairseq.", "typing.", "enum.",
                  "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
                  "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                  "numpy.ndarray")

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
  """Marker for `torch.FloatStorage` etc.: only its dtype is used."""

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _TorchMarker:
  """Marker for `torch.Tensor`, `torch.nn.Parameter`, `torch.device`, `torch.float32`, ..."""

  def __init__(self, name):
    self.name = name

  def __call__(self, *args, **kwargs):  # e.g. torch.device("cpu") in a config: an inert record
    return _stub_class(self.name)(*args, **kwargs)

  def __repr__(self):
    return self.name


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f"tensor rebuild got {type(storage).__name__}, not a storage")
  return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TorchMarker):
    raise UnsafePickleError(f"_rebuild_from_type_v2 with {func!r}/{new_type!r} is not a tensor")
  return func(*args)


# Factories a defaultdict may carry: plain constructors that run no code of the file's choosing.
_SAFE_FACTORIES = (None, dict, list, set, tuple, int, float, str, collections.OrderedDict)


def _defaultdict(factory=None, *unused):
  if not any(factory is f for f in _SAFE_FACTORIES):
    raise UnsafePickleError(f"collections.defaultdict with factory {factory!r} is not a plain "
                            f"container default")
  return collections.defaultdict(factory)


def _stub_getattr(owner, name):
  """Protocol 2 pickles `Enum.member` (a nested name) as getattr(Enum, "member")."""
  if not (isinstance(owner, type) and issubclass(owner, ConfigStub)) or not isinstance(name, str):
    raise UnsafePickleError(f"builtins.getattr on {owner!r} is only read for configuration "
                            f"records (enum members)")
  return _stub_class(f"{owner.global_name}.{name}")


def _codecs_encode(text, encoding="utf-8"):
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not used for bytes")
  return text.encode("latin-1")


_ALLOWED = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "builtins.int": int, "builtins.float": float, "builtins.str": str, "builtins.bool": bool,
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple,
    "_codecs.encode": _codecs_encode,
    "torch.Size": tuple,
    "collections.defaultdict": _defaultdict,
    "builtins.getattr": _stub_getattr,
}
for _name in _STORAGE_DTYPES:
  _ALLOWED[f"torch.{_name}"] = _StorageType(_name)
_ALLOWED["torch.storage.UntypedStorage"] = _StorageType("UntypedStorage")
for _name in ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.device", "torch.float32",
              "torch.float16", "torch.bfloat16", "torch.float64", "torch.int64", "torch.int32",
              "torch.uint8", "torch.bool"):
  _ALLOWED.setdefault(_name, _TorchMarker(_name))

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_PY2_NAMES = {"builtins.long": "builtins.int", "builtins.unicode": "builtins.str"}  # protocol 2


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED` globals and stubs; storages come from `storages`."""

  def __init__(self, file, path: str, storage_factory):
    super().__init__(file)
    self._path, self._storage_factory = path, storage_factory

  def find_class(self, module, name):
    full = f"{_PY2_MODULES.get(module, module)}.{name}"
    full = _PY2_NAMES.get(full, full)
    if full in _ALLOWED:
      return _ALLOWED[full]
    if full.startswith(_STUB_PREFIXES):
      return _stub_class(full)
    raise UnsafePickleError(
        f"refusing to unpickle global {full} from {self._path}: not a weights-only checkpoint. "
        f"Only tensors, plain containers and known configuration records are read; if you trust "
        f"this file, re-save its state dict with torch.save(torch.load(f, weights_only=False)"
        f"['model'], ...) or as safetensors.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"{self._path}: storage of unknown type {storage_type!r}")
    view = pid[5] if len(pid) > 5 else None
    return self._storage_factory(str(key), storage_type.dtype, int(numel), view)


# ----------------------------------------------------------------------------- torch zip format
def _zip_member_offset(f, info: zipfile.ZipInfo) -> int:
  """Absolute offset of a stored member's data (local and central headers may differ)."""
  f.seek(info.header_offset)
  header = f.read(30)
  if header[:4] != b"PK\x03\x04":
    raise CheckpointFormatError(f"bad zip local header for {info.filename}")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def zip_record(path: str, name: str) -> bytes | None:
  """The bytes of record `<archive>/<name>` of a torch zip file, None when it has none."""
  try:
    with zipfile.ZipFile(path) as zf:
      for member in zf.namelist():
        if member.count("/") == name.count("/") + 1 and member.endswith("/" + name):
          return zf.read(member)
  except (zipfile.BadZipFile, zlib.error, OSError) as e:
    raise _damaged(path, e) from None
  return None


def _damaged(path: str, err: Exception) -> CheckpointFormatError:
  return CheckpointFormatError(
      f"{path} is damaged or truncated ({type(err).__name__}: {err}); copy or download it again")


def _load_zip(path: str):
  try:
    return _load_zip_unchecked(path)
  except (UnsafePickleError, CheckpointFormatError):
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, struct.error) as e:
    raise _damaged(path, e) from None


def _load_zip_unchecked(path: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if any(n.endswith("/constants.pkl") for n in names):
      raise CheckpointFormatError(f"{path} is a TorchScript archive (torch.jit.save), not a state "
                                  f"dict: save model.state_dict() with torch.save instead")
    if not pkls:
      raise CheckpointFormatError(f"{path} is a zip file without data.pkl: not a torch.save file")
    prefix = pkls[0][:-len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    infos = {n: zf.getinfo(n) for n in names}
    with open(path, "rb") as f:
      storages = {}

      def factory(key, dtype, numel, view):
        if view is not None:
          raise CheckpointFormatError(f"{path}: storage views are not used by the zip format")
        if key not in storages:
          member = f"{prefix}data/{key}"
          if member not in infos:
            raise CheckpointFormatError(f"{path}: storage {member} is missing")
          info = infos[member]
          if info.compress_type == zipfile.ZIP_STORED:
            source = _Source(path, _zip_member_offset(f, info), info.file_size)
          else:
            source = _Source(path, 0, info.file_size, zip_member=member)
          dt = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
          storages[key] = _Storage(source, dt, numel, key)
        return storages[key]

      with zf.open(pkls[0]) as pkl:
        obj = _RestrictedUnpickler(pkl, path, factory).load()
  if big_endian:
    obj = _map_tree(obj, lambda r: _NativeOrder(r))
  return obj


class _NativeOrder:
  """Big-endian files (rare): converts to native byte order when read."""

  def __init__(self, ref):
    self.ref, self.shape, self.dtype = ref, ref.shape, ref.dtype.newbyteorder("=")

  def __array__(self, dtype=None, copy=None):
    arr = np.asarray(self.ref).astype(self.dtype)
    return arr if dtype is None else arr.astype(dtype)


def _map_tree(obj, fn):
  if isinstance(obj, TensorRef):
    return fn(obj)
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _map_tree(v, fn)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_map_tree(v, fn) for v in obj)
  return obj


# ----------------------------------------------------------------------------- torch legacy format
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _load_legacy(path: str):
  try:
    return _load_legacy_unchecked(path)
  except (UnsafePickleError, CheckpointFormatError):
    raise
  except (EOFError, pickle.UnpicklingError, struct.error) as e:
    raise _damaged(path, e) from None


def _load_legacy_unchecked(path: str):
  """torch's pre-1.6 format: magic, protocol, sys_info, the object, storage keys, raw storages."""
  with open(path, "rb") as f:

    def plain(what):
      return _RestrictedUnpickler(f, path, _no_storages(path, what)).load()

    if plain("magic number") != _LEGACY_MAGIC:
      raise CheckpointFormatError(f"{path}: not a torch checkpoint (bad magic number)")
    if plain("protocol version") != 1001:
      raise CheckpointFormatError(f"{path}: unsupported legacy torch protocol")
    sys_info = plain("sys_info")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise CheckpointFormatError(f"{path}: big-endian legacy checkpoints are not supported; "
                                  f"re-save with torch>=1.6 (zip format)")
    storages = {}

    def factory(key, dtype, numel, view):
      if key not in storages:
        storages[key] = _Storage(None, dtype, numel, key)  # source set after the scan below
      if view is None:
        return storages[key]
      _, offset, size = view
      return _ViewStorage(storages[key], int(offset), int(size))

    obj = _RestrictedUnpickler(f, path, factory).load()
    keys = plain("storage keys")
    offset = f.tell()
    size = os.fstat(f.fileno()).st_size
    for key in keys:
      storage = storages[str(key)]
      f.seek(offset)
      (numel,) = struct.unpack("<q", f.read(8))
      nbytes = numel * storage.dtype.itemsize
      storage.source = _Source(path, offset + 8, nbytes)
      offset += 8 + nbytes
      if offset > size:
        raise CheckpointFormatError(f"{path}: truncated legacy checkpoint")
  return obj


class _ViewStorage(_Storage):
  """A legacy storage view: elements [offset, offset + numel) of a root storage."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    super().__init__(None, root.dtype, numel)
    self.root, self.view_offset = root, offset

  def data(self):
    return self.root.data()[self.view_offset:self.view_offset + self.numel]


def _no_storages(path, what):
  def factory(*unused):
    raise CheckpointFormatError(f"{path}: unexpected storage in the {what} record")
  return factory


# ----------------------------------------------------------------------------- safetensors
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_header(path: str):
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      return None
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > 100_000_000 or n + 8 > os.path.getsize(path):
      return None
    text = f.read(n)
  if not text.startswith(b"{"):
    return None
  try:
    return json.loads(text), 8 + n
  except ValueError:
    return None


def load_safetensors(path: str) -> tuple[dict, dict]:
  """Returns ({name: TensorRef}, metadata) of a safetensors file (bfloat16 included)."""
  parsed = _safetensors_header(path)
  if parsed is None:
    raise CheckpointFormatError(f"{path} is not a safetensors file")
  header, start = parsed
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, entry in header.items():
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    numel = int(np.prod(shape, dtype=np.int64))
    if end - begin != numel * dtype.itemsize:
      raise CheckpointFormatError(f"{path}: tensor {name} has {end - begin} bytes for shape "
                                  f"{shape}")
    storage = _Storage(_Source(path, start + begin, end - begin), dtype, numel, name)
    tensors[name] = TensorRef(storage, 0, shape)
  return tensors, metadata


# ----------------------------------------------------------------------------- entry points
def sniff(path: str) -> str:
  """'torch-zip', 'torch-legacy', 'safetensors' or 'directory' from the content (not the name)."""
  if os.path.isdir(path):
    return "directory"
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(512)
  if head[:4] == b"PK\x03\x04":
    return "torch-zip"
  if len(head) > 262 and head[257:262] == b"ustar":
    raise CheckpointFormatError(f"{path} is a tar archive (torch < 0.4 format): load it with an "
                                f"old torch and re-save it with torch>=1.6 (zip format)")
  if _safetensors_header(path) is not None:  # before the pickle check: its length may start 0x80
    return "safetensors"
  if head[:1] == b"\x80":
    return "torch-legacy"
  raise CheckpointFormatError(f"{path}: unknown file format (expected a torch.save zip, a legacy "
                              f"torch pickle or safetensors)")


def load(path: str):
  """Reads any torch.save file or safetensors file; tensors become lazy `TensorRef`s.

  Safetensors files come back as {"state_dict": {...}, "__metadata__": {...}}.
  """
  path = os.fspath(path)
  kind = sniff(path)
  if kind == "torch-zip":
    return _load_zip(path)
  if kind == "torch-legacy":
    return _load_legacy(path)
  if kind == "safetensors":
    tensors, metadata = load_safetensors(path)
    return {"state_dict": tensors, "__metadata__": metadata}
  raise CheckpointFormatError(f"{path} is a directory, not a checkpoint file")


def to_numpy(tree):
  """Replaces every `TensorRef` in a nested dict/list by a numpy array (reads the data)."""
  return _map_tree(tree, np.asarray)
