"""A multi-host run's trainer as a child process, so that JAX's own abort becomes one line.

When process 0 dies (kill -9, out of memory, a preempted VM), it takes JAX's coordination service
with it, and jaxlib aborts every other process at once (SIGABRT) with "Terminating process because
the JAX distributed service detected fatal errors" and pages of C++ and Python stacks: Python
cannot take that over (distributed.py). So on several processes `train.py` runs itself again as
a child and watches it:
  * the child's stdout is this process's; its stderr passes through line by line, except that a
    run of C++ log lines (`E1204 10:00:00.123 ...`) is held until the next other line (or 200 of
    them), since JAX's abort message is such a run;
  * when the child aborts with JAX's message, this process prints ONE line and exits with status
    3 (distributed.LOST_PROCESS_EXIT_CODE), and leaves JAX's report in a file the line names;
  * otherwise what is held is printed and the child's status is returned as is;
  * SIGINT (Ctrl-C) and SIGTERM are passed on to the child, which saves a checkpoint and exits;
    the child is killed with this process (PR_SET_PDEATHSIG), as a lost host would be.
MIM_REFINER_SUPERVISED=1 in the environment runs the trainer without a supervisor.
"""

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

ENV = "MIM_REFINER_SUPERVISED"
LOST_PROCESS_EXIT_CODE = 3  # distributed.LOST_PROCESS_EXIT_CODE (not imported: no jax here)
JAX_ABORT = "Terminating process because the JAX distributed service detected fatal errors"
# absl / glog C++ log lines: severity, MMDD, time, thread, file:line]
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")
_HOLD = 200  # C++ log lines held at most before they are passed on


def supervised() -> bool:
  """True in the child (or when the user asked for no supervisor)."""
  return os.environ.get(ENV) == "1"


def _die_with_parent():
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:  # not Linux: a killed supervisor leaves the child to the watchdog
    pass


def run(module: str, args: list[str], process_id: int | None, num_processes: int | None) -> int:
  """Runs `python -m module args` as a child; returns the exit status to use (see module doc)."""
  child = subprocess.Popen([sys.executable, "-m", module, *args],
                           env=dict(os.environ, **{ENV: "1"}),
                           stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                           start_new_session=True, preexec_fn=_die_with_parent)
  forward = lambda signum, frame: child.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  held, aborted = [], threading.Event()

  def pump():
    for line in child.stderr:
      if JAX_ABORT in line:
        aborted.set()
      if aborted.is_set() or _CPP_LOG.match(line):
        held.append(line)
        if aborted.is_set() or len(held) < _HOLD:
          continue
        line = ""  # (a long run of C++ lines: pass the held ones on)
      sys.stderr.writelines(held + [line])
      sys.stderr.flush()
      held.clear()

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    status = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  reader.join(timeout=10)
  if aborted.is_set() and status in (-signal.SIGABRT, 128 + signal.SIGABRT):
    with tempfile.NamedTemporaryFile("w", prefix="mim_refiner_jax_abort_", suffix=".log",
                                     delete=False) as f:
      f.writelines(held)
    who = (f"process {process_id} of {num_processes}" if process_id is not None
           and num_processes else "this process")
    print(f"error: {who} lost JAX's coordination service: process 0, which hosts it, died or its "
          "host is gone, so this process stops too; rerun the same command on every host (any "
          f"host count) to resume from the last checkpoint (JAX's report: {f.name})",
          file=sys.stderr, flush=True)
    return LOST_PROCESS_EXIT_CODE
  sys.stderr.writelines(held)
  sys.stderr.flush()
  if status < 0:
    name = signal.Signals(-status).name
    print(f"error: the trainer process was killed by {name}"
          + (" (out of memory?)" if -status == signal.SIGKILL else ""), file=sys.stderr,
          flush=True)
    return 128 - status
  return status
