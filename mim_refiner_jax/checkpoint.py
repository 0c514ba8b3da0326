"""Orbax checkpoints built around resume: state, data-iterator state and metadata in one step dir.

A checkpoint step holds three items:
  state: the train state pytree (params, optimizer, EMA, BatchNorm statistics, queues, step, rng);
  data:  the Grain iterator state, so a restart continues on the exact next batch;
  meta:  JSON (config name, stage, step, wall time) for people and tools.
Saves are asynchronous; `close()` waits for the last one. Restoring takes abstract targets that
carry the shardings wanted now, so a checkpoint restores onto a mesh of any device count
(../shared/ENGINEERING.md, Orbax section).
"""

import os
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE, DATA, META = "state", "data", "meta"


class PreemptionFlag:
  """Set by SIGTERM or SIGINT (Ctrl-C); the loop saves and exits cleanly when it sees it.

  A second SIGINT (Ctrl-C again) ends the process at once, without saving: after the first, SIGINT
  gets the operating system's default action back, which works even while the main thread is
  inside a long XLA call. Checkpoints already on disk are intact (Orbax commits a step by
  renaming its finished directory).

  Single-process runs rely on this handler. Multi-process runs also ask Orbax, whose
  `reached_preemption` agrees on one step across hosts through JAX's coordination service.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    again = " Press Ctrl-C again to quit at once without saving." if signum == signal.SIGINT else ""
    # os.write, not print/logging: a handler that writes to a stream the main thread is writing
    # to can fail with "reentrant call".
    os.write(2, f"{name} received: saving a checkpoint and stopping after this step.{again}\n"
             .encode())
    if signum == signal.SIGINT or self._event.is_set():
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
    self._event.set()

  def uninstall(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def is_set(self) -> bool:
    return self._event.is_set()


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    # The trainer decides when to save (`should_save`); Orbax only keeps the last `keep`.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      return self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except OSError as e:  # a full disk or a vanished mount: say so, keep what is saved
      raise OSError(f"saving checkpoint step {step} to {self.directory} failed: {e}. Earlier "
                    f"checkpoints there are intact; free disk space and rerun to resume.") from e

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Returns `(state, meta)`; `data_iterator` (if given) is restored in place."""
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], restored[META]

  def restore_metadata(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(shapes, shardings):
  """`jax.ShapeDtypeStruct` targets carrying the shardings wanted now (any device count)."""
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
