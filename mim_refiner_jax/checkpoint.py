"""Orbax checkpoints built around resume: state, data-iterator state and metadata in one step dir.

A checkpoint step holds three items:
  state: the train state pytree (params, optimizer, EMA, BatchNorm statistics, queues, step, rng);
  data:  a Grain iterator state (optional; the trainer saves none: its input stream restarts at
         the state's global step on any host count, data/loader.py);
  meta:  JSON (config name, stage, step, wall time) for people and tools.
Saves are asynchronous; `close()` waits for the last one. Restoring takes abstract targets that
carry the shardings wanted now, so a checkpoint restores onto a mesh of any device count
(../shared/ENGINEERING.md, Orbax section).

Faults (issue 9, item 8): a damaged newest checkpoint is reported and skipped for the newest one
that restores (`Checkpointer.restore_newest`); a failed asynchronous save stops the run with one
message (`CheckpointSaveError`); a workdir is locked against a second live run (`WorkdirLock`).
"""

import concurrent.futures
import fcntl
import json
import logging as logging_std
import os
import re
import signal
import socket
import sys
import threading
import time

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mim_refiner_jax import errors


STATE, DATA, META = "state", "data", "meta"


class PreemptionFlag:
  """Set by SIGTERM or SIGINT (Ctrl-C); the loop saves and exits cleanly when it sees it.

  A second SIGINT (Ctrl-C again) ends the process at once, without saving: after the first, SIGINT
  gets the operating system's default action back, which works even while the main thread is
  inside a long XLA call. Checkpoints already on disk are intact (Orbax commits a step by
  renaming its finished directory).

  Single-process runs rely on this handler. On several processes a stop must happen at the same
  step everywhere (a save is collective), and a signal reaches each host at its own moment: there
  SIGTERM is left to JAX's preemption notifier (installed by jax.distributed.initialize), and
  Orbax's `reached_preemption` returns True at one step agreed through the coordination service;
  Ctrl-C here sends this process a SIGTERM, so it takes the same path. The local flag then only
  stops a run that is still compiling.
  """

  def __init__(self, what: str = "saving a checkpoint and stopping after this step"):
    self.what = what  # what the process does next, for the message
    self._event = threading.Event()
    self._previous = {}
    self._multi_process = False

  def install(self, multi_process: bool = False):
    self._multi_process = multi_process
    signals = (signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in signals}
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    again = " Press Ctrl-C again to quit at once without saving." if signum == signal.SIGINT else ""
    # os.write, not print/logging: a handler that writes to a stream the main thread is writing
    # to can fail with "reentrant call".
    os.write(2, f"{name} received: {self.what}.{again}\n".encode())
    if signum == signal.SIGINT or self._event.is_set():
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
    self._event.set()
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: every process stops together

  def uninstall(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def is_set(self) -> bool:
    return self._event.is_set()


class CheckpointRestoreError(errors.UserError):
  """No checkpoint in a directory restores; the message names the directory and each reason."""


class CheckpointSaveError(errors.UserError):
  """A checkpoint save failed; the message says which checkpoints are intact and what to do."""


class _QuietOrbaxErrors(logging_std.Filter):
  """Drops Orbax's own ERROR records (tracebacks from its save threads, unparsable metadata).

  The Checkpointer turns those failures into one message of its own (CheckpointSaveError, or a
  warning about a damaged step), so Orbax's copies, printed once per thread, only bury it. Active
  only at absl's default WARNING verbosity: with --verbosity=0 or higher everything is shown.

  It also keeps the first exception that Orbax's threads log: that is the earliest sign of a
  failed asynchronous save (Orbax itself raises it only when the next save waits for this one).
  """

  def __init__(self):
    super().__init__()
    self.first_error = None

  def filter(self, record):
    is_orbax_error = (record.levelno >= logging_std.ERROR
                      and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))
    if is_orbax_error and record.exc_info and self.first_error is None:
      self.first_error = record.exc_info[1]
    # asyncio's "Task exception was never retrieved" for Orbax's reads of a damaged step that
    # restore_newest already reported (on the asyncio logger: not a save failure).
    orbax_task = (record.name == "asyncio" and record.levelno >= logging_std.ERROR
                  and "orbax" in record.getMessage())
    if logging.get_verbosity() >= logging.INFO:
      return True
    return not (is_orbax_error or orbax_task)


_QUIET_ORBAX = _QuietOrbaxErrors()


def _short(error: BaseException, limit: int = 300) -> str:
  """One line about `error`. TensorStore messages run to pages (nested contexts and the spec);
  keep the innermost cause and the file it names, e.g. 'File too large: /w/checkpoints/...'."""
  text = " ".join(str(error).split())
  text = text.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
  files = re.findall(r'"(/[^"]+)"', text)
  os_error = re.search(r":\s*([^:\[]+?)\s*\[os_error_code", text)
  if os_error and files:
    text = f"{os_error.group(1)}: {files[-1]}"
  elif files and '": ' in text:
    cause = text.rsplit('": ', 1)[-1]
    text = f"{files[-1]}: {cause}"
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_orbax_aftermath(exc, obj=None) -> bool:
  """Errors of Orbax's remaining writes after a failed save, raised as the process ends: their
  event loop is closed ("Event loop is closed"; "Python is likely shutting down")."""
  text = str(exc)
  code = getattr(obj, "cr_code", None)
  return ("Event loop is closed" in text or "likely shutting down" in text
          or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename))


def _silence_orbax_aftermath():
  """After a failed save, Orbax's other writes end with one traceback each (dozens): drop those
  (the Checkpointer reports the failure once); every other error is printed as before."""
  if getattr(sys.excepthook, "_orbax_aftermath", False):
    return
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_orbax_aftermath(exc):
      previous_excepthook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not _is_orbax_aftermath(unraisable.exc_value, unraisable.object):
      previous_unraisablehook(unraisable)

  excepthook._orbax_aftermath = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _warn(message: str):
  if jax.process_index() == 0:
    logging.warning("%s", message)


def _all_hosts_agree(ok: bool) -> bool:
  """True if `ok` on every process (a damaged file may be one host's shard only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above.

  Faults it handles (issue 9, item 8):
  - `restore_newest` falls back from a damaged newest step (unreadable array file, bad JSON,
    missing item) to the newest one that restores, and moves the damaged ones aside to
    `<directory>_damaged/` (nothing is deleted) so later saves of those step numbers work.
  - A failed asynchronous save (full disk, vanished or replaced directory) is noticed by `check()`
    as soon as Orbax's save thread ends, and by the next `save()`/`close()`: one
    CheckpointSaveError says which checkpoints are intact.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    # gs:// and other remote paths stay as they are; local ones become absolute.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.every_steps = every_steps
    for logger in (logging.get_absl_logger(), logging_std.getLogger("asyncio")):
      if _QUIET_ORBAX not in logger.filters:
        logger.addFilter(_QUIET_ORBAX)
    _silence_orbax_aftermath()
    # The trainer decides when to save (`should_save`); Orbax only keeps the last `keep`.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})
    self._saving = None  # step of the last save whose outcome is not known yet
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  # ---------------------------------------------------------------------------------- saving
  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    self.check()
    problem = self._unwritable()
    if problem:
      self._failed = True
      raise self._save_failed(step, problem)
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    _QUIET_ORBAX.first_error = None
    try:
      # Waits for the previous save first and raises its error, if it failed.
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # a full disk or a vanished mount: say so, keep what is saved
      raise self._save_failed(self._saving or step, e) from None
    self._saving = step
    return saved

  def _unwritable(self) -> str | None:
    """Why a new step directory cannot be made here, or None. Orbax itself would hang on a
    failed directory creation (read-only, or a file in its place: orbax-checkpoint 0.12.8) and
    silently recreate a deleted directory, losing track of the checkpoints that were in it."""
    if "://" in self.directory:
      return None  # remote stores: Orbax reports their errors itself
    if not os.path.isdir(self.directory):
      return "the directory " + ("is now a file" if os.path.exists(self.directory)
                                 else "has vanished")
    probe = os.path.join(self.directory, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
      os.mkdir(probe)
      os.rmdir(probe)
    except OSError as e:
      return f"cannot create a directory there: {e.strerror or e}"
    return None

  def check(self):
    """Raises CheckpointSaveError if the last asynchronous save has failed (cheap; every step)."""
    if self._saving is None:
      return
    if self._manager.is_saving_in_progress():
      error = _QUIET_ORBAX.first_error  # a save thread failed; the others may run on a while
      if error is not None and not isinstance(error, concurrent.futures.CancelledError):
        step, self._saving = self._saving, None
        raise self._save_failed(step, error) from None
      return
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()  # the save thread has ended: returns or re-raises
    except Exception as e:
      raise self._save_failed(step, e) from None

  def _save_failed(self, step: int, error) -> CheckpointSaveError:
    """The one message for a failed save: what failed, which checkpoints are intact, what to do.
    `error` is an exception or a short reason."""
    self._failed = True
    try:
      self._manager.reload()
      intact = self.all_steps()
    except Exception:  # the directory itself may be gone
      intact = []
    fix = "fix the cause (free disk space, make the directory writable or restore it) and rerun"
    if intact:
      kept = (f"intact checkpoints there: step{'s' if len(intact) > 1 else ''} "
              f"{', '.join(map(str, intact))}; {fix} the same command to resume from step "
              f"{intact[-1]}")
    else:
      kept = f"no intact checkpoint is there; {fix} the same command to start again"
    return CheckpointSaveError(f"saving checkpoint step {step} to {self.directory} failed "
                               f"({error if isinstance(error, str) else _short(error, 200)}); "
                               f"{kept}")

  def wait(self):
    self.check()
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the last save and closes; after a failed save, closes without raising again."""
    if self._failed:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except  # already reported by CheckpointSaveError
        pass
      return
    try:
      self.check()
      self._manager.wait_until_finished()
    except CheckpointSaveError:
      self._failed = True
      self.close()
      raise
    except Exception as e:
      step = self._saving or self.latest_step()
      error = self._save_failed(step, e)
      self.close()
      raise error from e
    self._manager.close()

  # ------------------------------------------------------------------------------- restoring
  def restore(self, step: int, abstract_state, data_iterator=None):
    """Returns `(state, meta)`; `data_iterator` (if given) is restored in place."""
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], restored[META]

  def _check_json_files(self, step: int):
    """Parses the step's JSON files, to name the one that is damaged (Orbax's errors do not, and
    it reads a damaged `_CHECKPOINT_METADATA` with only a log line)."""
    step_dir = epath.Path(self.directory) / str(step)
    for path in [step_dir / "_CHECKPOINT_METADATA", step_dir / META / "metadata",
                 step_dir / STATE / "_METADATA", *(step_dir / DATA).glob("*.json")]:
      if path.exists():
        try:
          json.loads(path.read_text())
        except ValueError as e:
          raise ValueError(f"{path} is not valid JSON ({e})") from None

  def restore_newest(self, abstract_state, data_iterator=None, *, set_aside: bool = True):
    """Restores the newest step that restores: `(step, state, meta)`, or None if there is none.

    Each newer step that fails gets one warning naming it and the reason. With `set_aside`,
    those steps are then moved to `<directory>_damaged/<step>` (never deleted) so that this run
    can save those step numbers again. If no step restores: CheckpointRestoreError.
    """
    self._manager.reload()
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failed = []
    for step in steps:
      error = None
      try:
        self._check_json_files(step)
        state, meta = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # any damage: try the next step
        error = e
      if not _all_hosts_agree(error is None):
        failed.append((step, _short(error) if error is not None else "damaged on another host"))
        continue
      moved = self._set_aside([s for s, _ in failed]) if failed and set_aside else {}
      for bad, reason in failed:
        where = f"moved it to {moved[bad]}" if bad in moved else "left it in place"
        _warn(f"checkpoint step {bad} in {self.directory} does not restore ({reason}); {where} "
              f"and resumed from step {step}")
      return step, state, meta
    older = f"; steps {', '.join(str(s) for s, _ in failed[1:])} fail too" if failed[1:] else ""
    raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} restores (step {failed[0][0]}: {failed[0][1]}{older}); "
        "if the config changed, use the one it was saved with, else move the directory aside to "
        "start again")

  def _set_aside(self, steps) -> dict[int, str]:
    """Moves damaged step directories to `<directory>_damaged/` (process 0; all hosts wait)."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    aside, moved = epath.Path(self.directory + "_damaged"), {}
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointer_set_aside_start")
    for step in steps:
      target, suffix = aside / str(step), 1
      while target.exists():  # an earlier run set aside the same step number
        target, suffix = aside / f"{step}.{suffix}", suffix + 1
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        (epath.Path(self.directory) / str(step)).rename(target)
      moved[step] = str(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointer_set_aside_end")
    self._manager.reload()
    return moved

  def restore_metadata(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META]


class WorkdirInUseError(errors.UserError):
  """Another live run holds the workdir's lock; the message names the workdir and that run."""


class WorkdirLock:
  """An exclusive lock on a workdir for the life of this process (process 0 only).

  Local workdirs: `fcntl.flock` on `<workdir>/run.lock`: the kernel drops the lock when its
  process dies, so a crashed or SIGKILLed run never leaves the workdir locked; the file's content
  (pid, host, start time) only names the holder in the error. On NFS, Linux maps flock to NFS
  locks (held across clients; a dead client's lock lapses when its lease expires).

  Remote workdirs (gs://, ...) have no locks: `run.lock` is a lease object instead (`RemoteLease`).
  On release the lock file or lease is removed again (and a local workdir, if the lock created it
  and nothing else was written there).
  """

  FILENAME = "run.lock"

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, self.FILENAME)
    self._fd = None
    self._lease = None
    self._created_workdir = False

  def acquire(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    if "://" in self.workdir:
      self._lease = RemoteLease(epath.Path(self.workdir) / self.FILENAME).acquire()
      return self
    self._created_workdir = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown pid"
        os.close(fd)
        raise WorkdirInUseError(
            f"workdir {os.path.abspath(self.workdir)} is in use by another run ({holder}); "
            "wait for it to end or stop it, or choose another --workdir") from None
      except OSError as e:  # e.g. ENOLCK: a file system without locks
        os.close(fd)
        _warn(f"cannot lock workdir {self.workdir} ({e}); not protected against a second run")
        return self
      try:  # a releasing run may have removed the file between our open and flock: retry
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode())
    self._fd = fd
    return self

  def release(self):
    if self._lease is not None:
      self._lease.release()
      self._lease = None
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding it: see the inode check in acquire
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # only if empty: a run that failed before writing anything
      except OSError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class RemoteLease:
  """The workdir lock on an object store (gs://...), which has no flock: a JSON object naming
  the holder (pid, host, start time) and the time it was last renewed.

  A run takes the lease unless another run renewed it less than `ttl_s` ago; a background thread
  renews it every `ttl_s / 4`, and release deletes it. What it guarantees: a second run started
  while the first is alive is refused with one line naming the first. What it does not: two runs
  started within the same second can both take it (an object write is not a compare-and-swap
  here; the second writer's read-back usually catches it), and after a kill -9 the dead run's
  lease blocks the workdir until it is `ttl_s` old (the message says until when; deleting the
  object frees it at once).
  """

  TTL_S = 120.0

  def __init__(self, path: epath.Path, ttl_s: float | None = None):
    self.path = path
    self.ttl_s = ttl_s or float(os.environ.get("MIM_REFINER_LEASE_TTL_S", self.TTL_S))
    self.record = {"holder": f"pid {os.getpid()}", "host": socket.gethostname(),
                   "id": os.urandom(8).hex(), "started": time.time()}
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # a torn or foreign object: treat as expired
      return {}

  def _write(self):
    self.path.write_text(json.dumps(dict(self.record, renewed=time.time())))

  def acquire(self) -> "RemoteLease":
    current = self._read()
    if current and time.time() - current.get("renewed", 0) < self.ttl_s:
      expires = time.strftime("%H:%M:%S", time.localtime(current["renewed"] + self.ttl_s))
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("started", 0)))
      raise WorkdirInUseError(
          f"workdir {self.path.parent} is in use by another run ({current.get('holder')} on host "
          f"{current.get('host')}, started {started}; its lease {self.path} was renewed "
          f"{time.time() - current['renewed']:.0f} s ago); wait for it to end or stop it, or "
          f"choose another --workdir (if that run is dead, its lease expires at {expires}; "
          "deleting the object frees the workdir at once)")
    self._write()
    time.sleep(0.2)  # a run that wrote at the same moment: the last writer keeps the lease
    if (self._read() or {}).get("id") != self.record["id"]:
      raise WorkdirInUseError(f"workdir {self.path.parent} was taken by another run starting at "
                              "the same time; choose another --workdir or stop that run")
    self._thread = threading.Thread(target=self._renew, daemon=True, name="workdir-lease")
    self._thread.start()
    return self

  def _renew(self):
    while not self._stop.wait(self.ttl_s / 4):
      try:
        self._write()
      except Exception as e:  # pylint: disable=broad-except  # a store hiccup: retry next time
        _warn(f"could not renew the workdir lease {self.path} ({_short(e, 200)})")

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      if (self._read() or {}).get("id") == self.record["id"]:
        self.path.unlink()
    except Exception:  # pylint: disable=broad-except  # best effort: an old lease expires anyway
      pass


def abstract_with_shardings(shapes, shardings):
  """`jax.ShapeDtypeStruct` targets carrying the shardings wanted now (any device count)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
