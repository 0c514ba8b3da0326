"""Metric writer (JSONL + TensorBoard), throughput / ETA / MFU tracker, finite-loss check."""

import glob
import json
import math
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_refiner_jax import metrics


def read_tb_scalars(path):
  """Scalars of a TensorBoard event file, parsed from its TFRecord framing (no TensorFlow)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = []
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4  # length, length crc, payload, payload crc
    for value in event.summary.value:
      scalars.append((event.step, value.tag, value.simple_value))
  return scalars


def test_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricWriter(workdir, is_main=True) as writer:
    writer.write(10, {"loss": np.float32(1.5), "lr": 1e-3, "images": 256})
    writer.write(20, {"loss": jnp.asarray(0.75), "knn/acc": np.array([0.5])})
  # Reopening appends (resume) instead of overwriting.
  with metrics.MetricWriter(workdir, is_main=True, tensorboard=False) as writer:
    writer.write(30, {"loss": float("nan")})
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[0]["loss"] == 1.5 and records[0]["lr"] == 1e-3 and records[0]["images"] == 256
  assert records[1] == {"step": 20, "wall_time": records[1]["wall_time"], "loss": 0.75,
                        "knn/acc": 0.5}
  assert math.isnan(records[2]["loss"])
  assert records[0]["wall_time"] <= records[1]["wall_time"]

  (event_file,) = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  scalars = read_tb_scalars(event_file)
  assert (10, "loss", 1.5) in scalars and (20, "knn/acc", 0.5) in scalars
  assert {tag for _, tag, _ in scalars} == {"loss", "lr", "images", "knn/acc"}


def test_writer_checks_and_non_main_process(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / "other"), is_main=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "other")  # only process 0 writes
  with metrics.MetricWriter(str(tmp_path / "main"), is_main=True, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="must be a scalar"):
      writer.write(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 3})


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_tracker_skips_compile_and_computes_rates():
  clock = FakeClock()
  tracker = metrics.ThroughputTracker(total_steps=1000, images_per_step=256, start_step=0,
                                      skip_steps=1, num_devices=8, flops_per_device=5e12,
                                      peak_flops_per_device=1e14, clock=clock)
  clock.now += 30.0  # step 1 includes compilation
  first = tracker.update(1)
  assert first == {"elapsed_sec": 30.0}  # nothing measured yet
  clock.now += 0.5 * 99  # 99 steps at 0.5 s
  m = tracker.update(100)
  assert m["step_time_sec"] == pytest.approx(0.5)
  assert m["img_per_sec"] == pytest.approx(512.0)
  assert m["img_per_sec_per_device"] == pytest.approx(64.0)
  assert m["eta_sec"] == pytest.approx(900 * 0.5)
  assert m["elapsed_sec"] == pytest.approx(30.0 + 49.5)
  assert m["mfu"] == pytest.approx(5e12 / 0.5 / 1e14)
  # An evaluation of 20 s is excluded from the step time but slows the ETA.
  clock.now += 0.25 * 50
  tracker.pause()
  clock.now += 20.0
  tracker.resume()
  m = tracker.update(150)
  assert m["step_time_sec"] == pytest.approx(0.25)
  assert m["eta_sec"] == pytest.approx(850 * (49.5 + 12.5 + 20.0) / 149)
  line = tracker.progress_line(150, m)
  assert line.startswith("step 150/1000 (15.0%)")
  assert "0.250 s/step" in line and "1024.0 img/s" in line and "MFU 20.0%" in line
  assert "ETA 7:48" in line and "1:52 elapsed" in line


def test_tracker_resumed_run_and_unknown_peak():
  clock = FakeClock()
  tracker = metrics.ThroughputTracker(total_steps=5000, images_per_step=64, start_step=4000,
                                      skip_steps=2, flops_per_device=1e12, clock=clock)
  clock.now += 10
  assert "step_time_sec" not in tracker.update(4001)  # still compiling / warming up
  clock.now += 1
  assert "step_time_sec" not in tracker.update(4002)  # measurement starts here
  clock.now += 2 * 10
  m = tracker.update(4012)
  assert m["step_time_sec"] == pytest.approx(2.0)
  assert m["eta_sec"] == pytest.approx(988 * 2.0)
  assert "mfu" not in m  # no peak known: MFU omitted, not guessed
  assert metrics.format_duration(3725) == "1:02:05" and metrics.format_duration(65) == "1:05"


def test_peak_flops_table_and_mfu():
  assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops_per_device("nvidia h100 80gb hbm3 ") == 989e12
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("TPU v5") == 459e12
  assert metrics.peak_flops_per_device("TPU v4") == 275e12
  assert metrics.peak_flops_per_device("TPU v4 lite") is None  # not in the table: no guess
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.device_peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200")) == 989e12
  assert metrics.device_peak_flops() is None  # the CPU test devices
  assert metrics.mfu(4e14, 1.0, 1e15) == pytest.approx(0.4)
  assert metrics.mfu(4e14, 1.0, None) is None and metrics.mfu(None, 1.0, 1e15) is None


def test_compiled_flops_real_and_odd_cost_analyses():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  matmul = jax.jit(lambda x, y: x @ y)
  assert metrics.compiled_flops(matmul.lower(a, b).compile()) == 2 * 64 * 32 * 16
  # Sharded 8 ways by rows, XLA reports the per-device program (documented in compiled_flops).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = matmul.lower(jax.device_put(a, rows), b).compile()
  assert metrics.compiled_flops(sharded) == 2 * 64 * 32 * 16 / 8

  def fake(result=None, error=None):
    def cost_analysis():
      if error:
        raise error
      return result
    return types.SimpleNamespace(cost_analysis=cost_analysis)

  assert metrics.compiled_flops(fake([{"flops": 12.0}])) == 12.0
  assert metrics.compiled_flops(fake({"flops": 7})) == 7.0
  assert metrics.compiled_flops(fake(None)) is None
  assert metrics.compiled_flops(fake([])) is None
  assert metrics.compiled_flops(fake({"bytes accessed": 3.0})) is None
  assert metrics.compiled_flops(fake({"flops": -1.0})) is None
  assert metrics.compiled_flops(fake(error=NotImplementedError("no"))) is None


def test_check_finite():
  metrics.check_finite(5, {"loss": np.float32(0.3), "grad_norm": 1.0},
                       keys=("loss", "grad_norm"))
  with pytest.raises(metrics.NonFiniteLossError, match="non-finite loss = nan at step 7") as err:
    metrics.check_finite(7, {"loss": float("nan")})
  assert err.value.step == 7 and err.value.name == "loss"
  assert isinstance(err.value, FloatingPointError)
  with pytest.raises(metrics.NonFiniteLossError, match="grad_norm = inf"):
    metrics.check_finite(8, {"loss": 1.0, "grad_norm": np.inf}, keys=("loss", "grad_norm"))
  with pytest.raises(KeyError, match="'loss'"):
    metrics.check_finite(9, {"total": 1.0})
