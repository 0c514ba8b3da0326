"""User errors: mistakes the user can fix, shown as one line without a traceback.

Library code raises `UserError` (a ValueError, so `except ValueError` and `pytest.raises(ValueError)`
keep working) with a message that names the field or file and says how to fix it:

  raise UserError(f"config.queue.size={n} must divide by the number of devices ({d})")

The command-line entry points (the trainer, tools/*.py) run their work through `run_main`, which
prints such errors as `error: <message>` on stderr and exits with status 2; `--verbose` shows the
traceback as well. Anything else (a bug) keeps its full traceback.
"""

import sys
import traceback
from typing import Callable

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
  """A bad input (config value, file, data source, checkpoint) that the user can fix."""


def is_user_error(error: BaseException) -> bool:
  """UserError, a missing file (its message names it) or a non-finite loss (says what to do)."""
  return isinstance(error, (UserError, FileNotFoundError, FloatingPointError))


def print_error(message: str):
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()


def run_main(fn: Callable[[], object], verbose: bool = False):
  """Calls `fn()`; a user error becomes one line on stderr and exit status 2, Ctrl-C status 130."""
  try:
    return fn()
  except KeyboardInterrupt:
    print_error("interrupted")
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    if verbose:
      traceback.print_exc()
    print_error(str(e).strip())
    sys.exit(USER_ERROR_EXIT_CODE)
