"""Paths of workdirs, output dirs, weights and data roots: local or remote (gs://, s3://, ...).

Every file the package reads or writes under such a path goes through `etils.epath` (what Orbax
uses too): for gs:// it talks to GCS through gcsfs (or tf.io.gfile where TensorFlow is
installed); for local paths it is the os module. A remote path is never turned into a local one
(os.path.abspath("gs://b/w") is "<cwd>/gs:/b/w", a local folder named after the URL).

What an object store cannot do is done the safe way here:
- files that readers need as real local files (PyTorch zips, safetensors) are read from a
  temporary local copy (`local_copy`) and written through one (`upload_via_local`);
- there is no append: `write_text` replaces the whole object (callers keep the text in memory);
- there is no flock: the workdir lock becomes a lease object (checkpoint.WorkdirLock).
"""

import contextlib
import os
import shutil
import socket
import tempfile
import uuid

from etils import epath

from mim_refiner_jax import errors


def is_remote(path) -> bool:
  """True for URLs such as gs://bucket/dir (any scheme etils.epath serves)."""
  return "://" in os.fspath(path)


def resolve(path) -> str:
  """Remote paths as they are; local ones absolute (and `~` expanded)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def as_path(path) -> epath.Path:
  return epath.Path(resolve(path))


def join(path, *parts) -> str:
  """`os.path.join` that keeps a URL's `//` (str, so callers can print and compare it)."""
  return os.fspath(as_path(path).joinpath(*parts))


def basename(path) -> str:
  return as_path(os.fspath(path).rstrip("/")).name


def makedirs(directory):
  """`mkdir -p` for local paths; nothing for URLs: object stores have no directories, and
  gcsfs's makedirs would create a missing bucket (from a typo) instead of failing."""
  if not is_remote(directory):
    os.makedirs(resolve(directory), exist_ok=True)


def walk(directory, follow_links: bool = False):
  """(dirpath, dirnames, filenames) under `directory`, as os.walk; for URLs through etils.epath,
  with the scheme kept on dirpath (fsspec drops it)."""
  directory = resolve(directory)
  if not is_remote(directory):
    yield from os.walk(directory, followlinks=follow_links)
    return
  scheme = directory.split("://")[0] + "://"
  for root, dirs, files in epath.Path(directory).walk():
    root = os.fspath(root)
    yield (root if "://" in root else scheme + root), dirs, files


@contextlib.contextmanager
def local_copy(path):
  """Yields a local filename with `path`'s content: `path` itself, or a temporary copy of a
  remote file (deleted afterwards), for readers that need a real file (zip, mmap)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  source = epath.Path(path)
  if not source.exists():
    raise FileNotFoundError(f"{path} does not exist")
  with tempfile.TemporaryDirectory(prefix="mim_refiner_download_") as tmp:
    local = os.path.join(tmp, source.name or "file")
    with source.open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    yield local


def mirror_locally(directory, local_root, log=print) -> str:
  """A local copy of a remote `directory` under `local_root` (its bucket and path below it),
  refreshed file by file where the size differs; returns the local directory. For readers that
  open local files only (ArrayRecord). Each file is written to a temporary name and renamed, so an
  interrupted copy never leaves a short file under the real name."""
  import fsspec  # pylint: disable=g-import-not-at-top
  directory = resolve(directory)
  scheme, below = directory.split("://", 1)
  local = os.path.join(local_root, below.strip("/"))
  fs, root = fsspec.core.url_to_fs(directory)
  listing = fs.find(root, detail=True)  # every file with its size, in one listing
  files = {f"{scheme}://{name}": info["size"] for name, info in listing.items()
           if info.get("type") != "directory"}
  todo = []
  for remote, size in sorted(files.items()):
    target = os.path.join(local, os.path.relpath(remote, directory))
    if not (os.path.exists(target) and os.path.getsize(target) == size):
      todo.append((remote, target, size))
  if todo:
    log(f"copying {len(todo)} of {len(files)} files ({sum(t[2] for t in todo) / 2**30:.2f} GiB) of "
        f"{directory} to {local}, once: the reader opens local files only")
  for remote, target, _ in todo:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.partial.{os.getpid()}"  # (processes sharing a host copy side by side)
    with epath.Path(remote).open("rb") as src, open(partial, "wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(partial, target)
  return local


@contextlib.contextmanager
def upload_via_local(path):
  """Yields a local filename to write; a remote `path` receives the file when the block ends
  (nothing is uploaded if the block fails). Local paths are written in place."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="mim_refiner_upload_") as tmp:
    local = os.path.join(tmp, epath.Path(path).name or "file")
    yield local
    target = epath.Path(path)
    with open(local, "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)


def make_readable(path: str):
  """Mode 0644 less the umask, as `open(path, "w")` makes: writers that create files 0600
  (safetensors, mkstemp) would otherwise hide outputs from the group (local files only)."""
  if is_remote(path):
    return
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o644 & ~umask)


def check_writable(directory, setting: str):
  """UserError naming `directory` (and the `setting` that chose it) unless files can be created
  there: a read-only mount, no permission, a bucket without write access. Creates the directory
  (a local one with its parents) if it does not exist; leaves nothing else behind."""
  directory = resolve(directory)
  path = epath.Path(directory)
  probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  try:
    if path.exists() and not path.is_dir():
      raise errors.UserError(f"{setting}={directory} is a file, not a directory; choose a "
                             "directory")
    makedirs(directory)
    probe.write_text("probe")
    probe.unlink()
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # OSError locally; gcsfs raises others
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    raise errors.UserError(f"{setting}={directory} cannot be written ({type(e).__name__}: "
                           f"{reason}); make it writable (permissions, a read-write mount, a "
                           "bucket this account may write to) or choose another") from None
