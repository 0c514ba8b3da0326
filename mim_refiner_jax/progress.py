"""One progress line across the phases of a long command, with an ETA for the whole.

Used by `mim_refiner_jax/refine.py` (and through it by the CPU demo). Each phase has a nominal
duration; the ETA scales what is left by the pace this run measured so far, and inside a training
phase by the fraction of steps done (read from the trainer's own "step N/M" lines). A heartbeat
line appears whenever nothing was printed for `every` seconds, so a long compile or a silent
evaluation still shows that the command is alive and how long it should still take.
"""

import contextlib
import re
import sys
import threading
import time

_STEP = re.compile(r"step (\d+)/(\d+) \(")  # metrics.ThroughputTracker.progress_line


class Progress:
  """Phases with an ETA; a sys.stdout proxy while entered (the trainer's lines count too)."""

  def __init__(self, plan: list[tuple[str, float]], every: float = 9.0, label: str = "refine"):
    self.plan = list(plan)  # (phase, nominal seconds), in order; names are unique
    self.every = every
    self.label = label
    self.start = time.time()
    self.done, self.current, self.current_start = set(), None, None
    self.fraction = 0.0  # of the current phase, when it reports steps
    self.warnings = []  # lines met that say "warning" (the report lists them)
    self.measured = []  # (nominal, actual seconds) of the phases run so far: the machine's pace
    self.last_output = time.time()
    self._stdout = sys.stdout
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True)

  def write(self, text):  # sys.stdout proxy
    self.last_output = time.time()
    self.warnings += [line.strip() for line in text.splitlines() if "warning" in line.lower()]
    match = _STEP.search(text)
    if match and self.current:
      self.fraction = int(match.group(1)) / max(int(match.group(2)), 1)
    return self._stdout.write(text)

  def flush(self):
    self._stdout.flush()

  def __getattr__(self, name):
    return getattr(self._stdout, name)

  def __enter__(self):
    sys.stdout = self
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    sys.stdout = self._stdout

  def extend(self, phases: list[tuple[str, float]]):
    """Replaces the nominal seconds of known phases (e.g. once the step counts are known)."""
    nominal = dict(phases)
    self.plan = [(name, nominal.get(name, seconds)) for name, seconds in self.plan]

  def eta(self) -> float:
    """Nominal seconds of what is left, scaled by this machine's pace in the phases so far."""
    measured_nominal = sum(n for n, _ in self.measured)
    # The pace of a few seconds of setup says little: trust it from ~20 nominal seconds on.
    pace = (sum(a for _, a in self.measured) / measured_nominal if measured_nominal >= 20
            else 1.0)
    left = 0.0
    for name, nominal in self.plan:
      if name == self.current:
        by_time = pace * nominal - (time.time() - self.current_start)
        by_steps = pace * nominal * (1 - self.fraction) if self.fraction else by_time
        left += max(min(by_time, by_steps) if self.fraction else by_time,
                    0.05 * pace * nominal)
      elif name not in self.done:
        left += pace * nominal
    return left

  def clock(self) -> str:
    elapsed = time.time() - self.start
    names = [name for name, _ in self.plan]
    where = ""
    if self.current in names:
      where = f" | {names.index(self.current) + 1}/{len(names)} {self.current}"
      if self.fraction:
        where += f" {100 * self.fraction:.0f}%"
    return (f"[{self.label} {int(elapsed) // 60}:{int(elapsed) % 60:02d}{where} | "
            f"ETA {self.eta():4.0f}s]")

  def say(self, message: str):
    print(f"{self.clock()} {message}", flush=True)

  @contextlib.contextmanager
  def phase(self, name: str, what: str):
    self.current, self.current_start, self.fraction = name, time.time(), 0.0
    self.say(f"{what} ...")
    try:
      yield
    finally:
      self.measured.append((dict(self.plan).get(name, 1.0), time.time() - self.current_start))
      self.done.add(name)
      self.current, self.fraction = None, 0.0

  def skip(self, name: str):
    self.done.add(name)

  def _beat(self):
    while not self._stop.wait(0.5):
      if self.current and time.time() - self.last_output >= self.every:
        self.say(f"{self.current}: still working ({time.time() - self.current_start:.0f}s in "
                 "this phase)")
