"""Several processes: starting jax.distributed, and stopping every process when one fails.

A multi-host run is only as alive as its least alive process. Left alone (jax 0.10.2), a process
that dies (kill -9, out of memory, a preempted VM) leaves the others blocked in, or failing out
of, a collective; they then hang in JAX's shutdown barrier until the coordination service's
heartbeat timeout (100 s) aborts them with SIGABRT and pages of C++ stacks and thread dumps. A
process that fails at start-up (a bad path on one host only) leaves the others waiting in their
first collective. Python cannot take over JAX's own abort: jaxlib's `missed_heartbeat_callback`
aborts with std::bad_cast when given a Python function (supervisor.py summarises that abort from
outside the process instead).

`Watchdog`, one daemon thread per process, over the coordination service's key-value store:
  * every `interval` seconds it bumps this process's counter and reads everyone's. A process
    whose counter has not moved for `timeout` seconds (--host_timeout) is lost: every other
    process prints ONE line, `error: process 1 of 2 stopped responding ...`, and exits with
    status 3 (LOST_PROCESS_EXIT_CODE). The counters are compared on the reader's own clock, so
    hosts' clocks need not agree. If the store itself is unreachable for `timeout` seconds,
    process 0 (which hosts it) is the lost one.
  * a process that fails (`fail`: a user error, a bug, Ctrl-C) publishes its one-line error
    first and waits (at most `timeout`) until the others have read it; they print
    `error: process 1 of 2 failed: <its message>` and exit with its status (2 for user errors).
  * a process that ends normally says so (`stop`), so the others do not wait for its counter.
Bound: a lost process stops the others within timeout + 2 intervals of its last heartbeat. JAX's
own heartbeat timeout is set above that (`jax_heartbeat_timeout`), so this watchdog decides first.
"""

import os
import sys
import threading
import time
import traceback

import jax

from mim_refiner_jax import errors

LOST_PROCESS_EXIT_CODE = 3
_PREFIX = "mim_refiner_jax/watchdog/"


def jax_heartbeat_timeout(host_timeout: float) -> int:
  """JAX's coordination-service heartbeat timeout: its default (100 s), or more than ours."""
  return int(max(100, 2 * host_timeout + 30))


def _count(value) -> int:
  """A heartbeat counter as stored (a decimal string; None before the first one)."""
  return -1 if value is None else int(value)


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


class Watchdog:
  """See the module docstring; `start()` after jax.distributed.initialize, `stop()` before
  jax.distributed.shutdown, `fail(error)` instead of raising an error out of main."""

  def __init__(self, timeout: float, interval: float | None = None):
    self.timeout = float(timeout)
    self.interval = interval or min(max(self.timeout / 5, 0.2), 5.0)
    self.index, self.count = jax.process_index(), jax.process_count()
    self.client = _client()
    self._stopped = threading.Event()
    self._failing = False
    self._counter = 0
    self._changed = {}  # process -> (last counter seen, time.monotonic() when it changed)
    self._last_ok = time.monotonic()
    self._failing_since = None  # time.monotonic() of the first failed store access in a row
    self._thread = threading.Thread(target=self._run, name="host-watchdog", daemon=True)

  def start(self) -> "Watchdog":
    now = time.monotonic()
    self._changed = {p: (None, now) for p in range(self.count) if p != self.index}
    self._thread.start()
    return self

  def stop(self):
    """This process ends normally: the others stop watching it."""
    self._stopped.set()
    self._thread.join(timeout=2 * self.interval + 1)
    try:
      self.client.key_value_set(f"{_PREFIX}done/{self.index}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the store went away: nothing to tell
      pass

  # --------------------------------------------------------------------------------- the loop
  def _run(self):
    while not self._stopped.wait(self.interval):
      if self._failing:
        continue  # fail() speaks for this process now
      try:
        self._pulse()
      except Exception:  # pylint: disable=broad-except  # the store (process 0) is unreachable
        now = time.monotonic()
        self._failing_since = self._failing_since or now
      else:
        self._failing_since = None
      self._judge()

  def _pulse(self):
    self._counter += 1
    self.client.key_value_set(f"{_PREFIX}alive/{self.index}", str(self._counter),
                              allow_overwrite=True)
    entries = dict(self.client.key_value_dir_get(_PREFIX))
    now = time.monotonic()
    self._last_ok = now
    failed = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in entries.items()
                    if k.startswith(f"{_PREFIX}error/") and k != f"{_PREFIX}error/{self.index}")
    if failed:
      self.client.key_value_set(f"{_PREFIX}ack/{self.index}", "1", allow_overwrite=True)
      process, value = failed[0]
      status, message = value.split(" ", 1)
      self._exit(int(status), f"process {process} of {self.count} failed: {message}")
    for p in list(self._changed):
      if f"{_PREFIX}done/{p}" in entries:
        del self._changed[p]  # ended normally
        continue
      value = entries.get(f"{_PREFIX}alive/{p}")
      if value is not None and value != self._changed[p][0]:
        self._changed[p] = (value, now)

  def _judge(self):
    now = time.monotonic()
    stale = [p for p, (_, t) in self._changed.items() if now - t > self.timeout]
    heartbeat = f"no heartbeat for {self.timeout:g} s, --host_timeout"
    if self._failing_since is not None and now - self._last_ok > self.timeout:
      # Every counter froze when the store went away; one that froze well before that stopped
      # on its own. If none did, process 0, which hosts the store, is the lost one.
      early = [p for p in stale if self._changed[p][1] < self._last_ok - 2 * self.interval]
      if not early:
        self._exit(LOST_PROCESS_EXIT_CODE, self._lost_message(
            0, f"its coordination service is unreachable for {self.timeout:g} s, --host_timeout"))
      stale = early
    if stale:
      lost = min(stale, key=lambda p: self._changed[p][1])  # the first to fall silent
      self._exit(LOST_PROCESS_EXIT_CODE, self._lost_message(lost, heartbeat), lost=lost)

  def _lost_message(self, process: int, why: str) -> str:
    return (f"process {process} of {self.count} stopped responding ({why}): it died or its host "
            "is gone, so this process stops too; rerun the same command on every host (any host "
            "count) to resume from the last checkpoint")

  def _exit(self, status: int, message: str, lost: int | None = None):
    errors.print_error(message)
    sys.stdout.flush()
    try:
      self.client.key_value_set(f"{_PREFIX}exiting/{self.index}", "1", allow_overwrite=True)
      if self.index == 0:  # hosts the service: the others' JAX clients abort if it goes first
        self._wait_for_others("exiting", skip=lost)
    except Exception:  # pylint: disable=broad-except  # the store is gone: nothing to wait for
      pass
    os._exit(status)  # pylint: disable=protected-access  # the main thread may be stuck in XLA

  def _wait_for_others(self, key: str, skip: int | None = None):
    """Until every other process has set `key` (or is done, or `skip`), at most `timeout` s."""
    others = set(self._changed) - {skip}
    deadline = time.monotonic() + self.timeout
    while others and time.monotonic() < deadline:
      entries = dict(self.client.key_value_dir_get(_PREFIX))
      others = {p for p in others if f"{_PREFIX}{key}/{p}" not in entries
                and f"{_PREFIX}done/{p}" not in entries}
      time.sleep(self.interval / 4)
    if key == "exiting":
      time.sleep(0.2)  # their os._exit follows their key at once

  def _counters(self) -> dict | None:
    """Every other live process's heartbeat counter, read from the store now (None: no store)."""
    try:
      entries = dict(self.client.key_value_dir_get(_PREFIX))
    except Exception:  # pylint: disable=broad-except  # the store is gone: wait for the watchdog
      return None
    return {p: entries.get(f"{_PREFIX}alive/{p}") for p in list(self._changed)}

  # ------------------------------------------------------------------------ this process fails
  def fail(self, error: BaseException, verbose: bool = False):
    """Ends this process for `error` and tells the others; never returns.

    Anything may be the echo of another process's death (a collective or a checkpoint save that
    lost its peer), so the watchdog first gets the time to name that process: a user error or
    Ctrl-C waits until every other process has shown a heartbeat since (an interval or two), any
    other error `timeout` seconds; only then is it reported as this process's own.
    """
    user_error = errors.is_user_error(error) or isinstance(error, KeyboardInterrupt)
    # A user error is published once every other process's heartbeat counter has moved past its
    # value now (an interval or two): a checkpoint save whose collective lost a dead peer fails
    # as a UserError too, and is then reported as that peer's loss, not as a disk error.
    counters = self._counters() if user_error else None
    deadline = time.monotonic() + self.timeout + 3 * self.interval
    while time.monotonic() < deadline:  # the watchdog thread exits the process if it decides
      if counters is not None and all(_count(self._changed[p][0]) > _count(value)
                                      for p, value in counters.items() if p in self._changed):
        break
      time.sleep(self.interval / 2)
    self._failing = True
    if isinstance(error, KeyboardInterrupt):
      status, message = 130, "interrupted"
    elif user_error:
      status, message = errors.USER_ERROR_EXIT_CODE, str(error).strip()
    else:
      status = 1
      text = " ".join(str(error).split())[:300]
      message = f"{type(error).__name__}: {text} (traceback in its log)"
    try:
      self.client.key_value_set(f"{_PREFIX}error/{self.index}", f"{status} {message}",
                                allow_overwrite=True)
      self._wait_for_others("ack")
    except Exception:  # pylint: disable=broad-except  # the store is gone: the others notice
      pass
    if verbose or not user_error:
      traceback.print_exception(error)
    self._exit(status, message)


def wait_for_all(name: str, timeout_s: float = 3600.0):
  """A barrier through the coordination service, not a device collective: CPU collectives (gloo)
  give up after 30 s when one process reaches its first collective that much later than another
  (e.g. its compile missed the persistent cache). No-op with one process; a process that dies
  meanwhile is reported by the Watchdog."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"mim_refiner_jax/{name}", int(timeout_s * 1000))
