"""Progress of the evaluation loops: a tqdm bar when stderr is a terminal, else plain lines.

Output to a file or a pipe gets about ten complete lines per loop, so a log never holds a bar's
carriage returns spliced into other log lines. Only process 0 reports.
"""

import sys
import time

import jax


class _Lines:
  """Progress as plain lines: about ten lines per loop."""

  def __init__(self, total, desc):
    self.total, self.desc, self.n, self.start = total, desc, 0, time.time()
    self.every = max(1, -(-(total or 10) // 10))

  def update(self, n=1):
    self.n += n
    if self.n % self.every == 0 or self.n == self.total:
      of = f"/{self.total}" if self.total else ""
      print(f"{self.desc}: {self.n}{of} ({time.time() - self.start:.0f} s)", file=sys.stderr,
            flush=True)

  def close(self):
    pass


def progress_bar(total: int | None, desc: str):
  """A tqdm bar on process 0 when stderr is a terminal, else progress lines; None elsewhere."""
  if jax.process_index() != 0:
    return None
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _Lines(total, desc)
  if not sys.stderr.isatty():
    return _Lines(total, desc)
  return tqdm.tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def iterate(items, desc: str, enabled: bool = True):
  """Yields `items` (a sized iterable), reporting progress when `enabled`."""
  items = list(items) if not hasattr(items, "__len__") else items
  bar = progress_bar(len(items), desc) if enabled else None
  for item in items:
    yield item
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()


def trange(n: int, desc: str, enabled: bool = True):
  return iterate(range(n), desc, enabled)
