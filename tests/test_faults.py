"""Faults (issue 9, item 8), each caused for real: damaged checkpoint files, a second run on a live
workdir, a SIGKILLed run, a save that fails mid-run (a file-size limit set on the running
process), high-bit-depth image files, metric rows of re-run steps.
"""

import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mim_refiner_jax import checkpoint as checkpoint_lib
from mim_refiner_jax import metrics as metrics_lib
from mim_refiner_jax.data import sources
from tests.test_train import CONFIG, _run, pretrained  # noqa: F401  (module fixture)


# ------------------------------------------------------------------------ damaged checkpoints
def _truncate_arrays(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, step_dir
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _damage(step_dir, kind):
  if kind == "array file truncated":
    _truncate_arrays(step_dir)
  elif kind == "meta JSON truncated":
    with open(os.path.join(step_dir, "meta", "metadata"), "r+b") as f:
      f.truncate(5)
  elif kind == "_CHECKPOINT_METADATA overwritten":
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "wb") as f:
      f.write(b"\x00garbage")
  elif kind == "state item missing":
    shutil.rmtree(os.path.join(step_dir, "state"))
  else:
    raise ValueError(kind)


def _files(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, fs in os.walk(directory) for f in fs)


@pytest.mark.parametrize("kind", ["array file truncated", "meta JSON truncated",
                                  "_CHECKPOINT_METADATA overwritten", "state item missing"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, kind, caplog):
  directory = str(tmp_path / "checkpoints")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = {"w": jnp.arange(4096.0), "step": jnp.int32(0)}
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  make_iter = lambda: iter(grain.MapDataset.range(100).to_iter_dataset())
  it = make_iter()
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=5)
  for step in (1, 2, 3):
    next(it)
    ckpt.save(step, dict(state, step=jnp.int32(step)), it, {"step": step})
  ckpt.close()
  _damage(os.path.join(directory, "3"), kind)
  damaged_files = _files(os.path.join(directory, "3"))

  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=5)
  it = make_iter()
  with caplog.at_level("WARNING"):
    step, restored, meta = ckpt.restore_newest(target, it)
  assert step == 2 and meta == {"step": 2} and int(restored["step"]) == 2
  assert next(it) == 2  # the data iterator is at step 2's position too
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 3" in warnings[0], warnings
  # Nothing deleted: the damaged step is moved aside whole, and step 3 can be saved again.
  assert _files(os.path.join(directory + "_damaged", "3")) == damaged_files
  assert ckpt.all_steps() == [1, 2]
  ckpt.save(3, dict(state, step=jnp.int32(33)), it, {"step": 3})
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, keep=5)
  step, restored, _ = ckpt.restore_newest(target, make_iter())
  assert step == 3 and int(restored["step"]) == 33

  # No step restores: one error naming the directory; nothing is moved or deleted.
  for s in (1, 2, 3):
    _damage(os.path.join(directory, str(s)), kind)
  before = _files(directory)
  with pytest.raises(checkpoint_lib.CheckpointRestoreError,
                     match=f"no checkpoint in {directory} restores \\(step 3: "):
    ckpt.restore_newest(target, make_iter())
  ckpt.close()
  assert _files(directory) == before


# ------------------------------------------------------------------------ trainer subprocesses
def _finalized_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _read_until(proc, predicate, lines, timeout=180):
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if predicate(line):
      return line
    assert time.time() < deadline, "".join(lines)
  raise AssertionError("process ended early:\n" + "".join(lines))


def _logged_step(line):
  """12 for '05:17:45 step 12/2000 (0.6%) | ...', else None."""
  words = line.split()
  if len(words) > 2 and words[1] == "step" and "/" in words[2]:
    return int(words[2].split("/")[0])
  return None


def test_lock_crash_damaged_resume_and_failed_save(pretrained, tmp_path):  # noqa: F811
  """One workdir through the faults of a real run, with the real command in subprocesses:
  a second run is refused while the first lives; after SIGKILL the workdir is usable; the newest
  checkpoint, damaged, is skipped for the previous one and the run saves on; re-run steps replace
  their metric rows; a save that fails mid-run (file-size limit, as a full disk) stops the run at
  once with one message naming the intact checkpoints."""
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:stage=2,epochs=500,knn=false", f"--workdir={workdir}",
          f"--config.init.pretrained={pretrained}", "--config.checkpoint.keep=3"]
  first = _run(args)
  lines_a = []
  try:
    _read_until(first, lambda l: " devices: " in l, lines_a)  # it holds the lock from here on
    second = _run(args)
    _read_until(first, lambda l: (_logged_step(l) or 0) >= 9, lines_a)
    deadline = time.time() + 60
    while len(_finalized_steps(workdir)) < 2:  # two finished saves (4 and 8) before freezing it
      assert time.time() < deadline, "".join(lines_a)
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # alive (holding the lock) but no longer moving
    out_b = second.communicate(timeout=120)[0]
    assert second.returncode != 0, out_b
    assert f"workdir {workdir} is in use by another run (pid {first.pid} on host" in out_b, out_b
  finally:
    first.kill()  # SIGKILL: no cleanup code runs
    first.communicate()
  assert os.path.exists(os.path.join(workdir, "run.lock"))  # left behind, but no longer locked
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows_a = [json.loads(line) for line in f]
  killed_at = time.time()

  steps = _finalized_steps(workdir)
  newest, previous = steps[-1], steps[-2]
  _truncate_arrays(os.path.join(workdir, "checkpoints", str(newest)))
  assert max(r["step"] for r in rows_a) >= newest  # these rows get re-run

  third = _run(args)
  lines_c = []
  try:
    _read_until(third, lambda l: (_logged_step(l) or 0) >= newest + 2, lines_c)
    deadline = time.time() + 60  # the damaged step number is saved again, then limit file sizes
    while newest not in _finalized_steps(workdir):
      assert time.time() < deadline, "".join(lines_c)
      time.sleep(0.05)
    resource.prlimit(third.pid, resource.RLIMIT_FSIZE, (90_000, resource.RLIM_INFINITY))
    out_c = "".join(lines_c) + third.communicate(timeout=120)[0]
  finally:
    third.kill()
  assert third.returncode != 0, out_c
  assert (f"checkpoint step {newest} in {workdir}/checkpoints does not restore" in out_c
          and f"and resumed from step {previous}" in out_c), out_c
  assert f"resumed {workdir} at step {previous}" in out_c, out_c
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", str(newest)))
  # One message for the failed save, naming what is intact; none of Orbax's thread tracebacks.
  failed = [l for l in out_c.splitlines() if "failed (" in l and "saving checkpoint step" in l]
  assert len(failed) == 1, out_c
  assert "intact checkpoints there: steps" in failed[0], failed[0]
  # At most the trainer's own uncaught error and its cause (until main prints user errors alone).
  assert out_c.count("Traceback") <= 2 and "Event loop is closed" not in out_c, out_c
  failed_step = int(failed[0].split("saving checkpoint step ")[1].split()[0])
  logged = [s for s in map(_logged_step, out_c.splitlines()) if s]
  assert failed_step > newest and max(logged) <= failed_step + 4, (failed_step, logged)
  # Metric rows: one per step; the re-run steps' rows are the new run's.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  loss_steps = [r["step"] for r in rows if "loss" in r]
  assert loss_steps == list(range(1, max(loss_steps) + 1)), loss_steps
  assert all(r["wall_time"] > killed_at for r in rows if r["step"] > previous)
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released on exit


def test_metric_rows_replaced_after_resume(tmp_path):
  workdir = str(tmp_path)
  with metrics_lib.MetricWriter(workdir) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "lo')  # torn by a crash
  with metrics_lib.MetricWriter(workdir) as writer:
    assert writer.drop_after(3) == 3
    for step in (4, 5):
      writer.write(step, {"loss": 10.0 * step})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  # TensorBoard: the resumed writer's event file starts with a purge of the steps after 3
  # (SessionLog START at step 4; TensorBoard then hides the older events of steps >= 4).
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  newest = max(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")),
               key=os.path.getmtime)
  events, data = [], open(newest, "rb").read()
  while data:  # TFRecord framing: length (8 bytes), its crc (4), payload, payload crc (4)
    length = int.from_bytes(data[:8], "little")
    events.append(event_pb2.Event.FromString(data[12:12 + length]))
    data = data[16 + length:]
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [4] and events[1].step == 4, events[:2]
  assert sorted({e.step for e in events if e.HasField("summary")}) == [4, 5]


# ------------------------------------------------------------------------ high-bit-depth images
def _write_png16(path, array):
  """A 16-bit-per-channel PNG (grey, RGB) written by hand: PIL cannot write 48-bit RGB."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  h, w = array.shape[:2]
  color_type = 0 if array.ndim == 2 else 2
  raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_high_bit_depth_images_scaled_to_8_bits(tmp_path, caplog):
  rng = np.random.default_rng(0)
  grey16 = rng.integers(0, 65536, (12, 10)).astype(np.uint16)
  Image.fromarray(grey16).save(tmp_path / "grey16.png")  # PIL writes it; reads it as "I;16"
  assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
  got = sources.decode_image_file(str(tmp_path / "grey16.png"))
  assert got.shape == (12, 10, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got[..., 0], np.round(grey16 / 257.0).astype(np.uint8))
  assert (got == 255).mean() < 0.01  # before: 99.5% clipped to 255

  rgb48 = rng.integers(0, 65536, (8, 9, 3)).astype(np.uint16)
  _write_png16(tmp_path / "rgb48.png", rgb48)
  got = sources.decode_image_file(str(tmp_path / "rgb48.png"))  # PIL keeps the high byte
  assert np.abs(got.astype(int) - np.round(rgb48 / 257.0)).max() <= 1

  grey16_hand = rng.integers(0, 65536, (5, 6)).astype(np.uint16)
  _write_png16(tmp_path / "grey16_hand.png", grey16_hand)
  got = sources.decode_image_file(str(tmp_path / "grey16_hand.png"))
  np.testing.assert_array_equal(got[..., 0], np.round(grey16_hand / 257.0).astype(np.uint8))

  float01 = rng.uniform(0, 1, (7, 8)).astype(np.float32)
  Image.fromarray(float01).save(tmp_path / "float.tif")
  got = sources.decode_image_file(str(tmp_path / "float.tif"))
  np.testing.assert_array_equal(got[..., 1], np.round(float01 * 255.0).astype(np.uint8))

  wide = np.linspace(-100.0, 900.0, 56, dtype=np.float32).reshape(7, 8)  # not [0, 1]: min-max
  Image.fromarray(wide).save(tmp_path / "wide.tif")
  with caplog.at_level("WARNING"):
    got = sources.decode_image_file(str(tmp_path / "wide.tif"))
  assert got.min() == 0 and got.max() == 255 and np.all(np.diff(got[..., 0].ravel()) >= 0)
  assert any("outside the assumed [0, 1]" in r.getMessage() for r in caplog.records)

  grey8 = rng.integers(0, 256, (4, 4)).astype(np.uint8)  # 8-bit stays exact
  Image.fromarray(grey8).save(tmp_path / "grey8.png")
  np.testing.assert_array_equal(sources.decode_image_file(str(tmp_path / "grey8.png"))[..., 2],
                                grey8)
  # uint16 arrays from tfds records are scaled the same way.
  np.testing.assert_array_equal(sources.to_rgb_uint8(grey16)[..., 0],
                                np.round(grey16 / 257.0).astype(np.uint8))
