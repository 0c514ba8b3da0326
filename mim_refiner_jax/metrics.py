"""Metric logging: JSONL + TensorBoard from process 0, throughput / ETA / MFU, finite-loss check.

ENGINEERING.md items 16-17: one JSON object per logged step in `workdir/metrics.jsonl`
(`{"step": s, "wall_time": t, "<name>": value, ...}`), TensorBoard scalars in `workdir/tb` through
tensorboardX (no TensorFlow, no clu), and a throughput tracker that starts measuring after the
compile steps. MFU uses the FLOPs XLA reports for the compiled step (`compiled_flops`) and a table
of dense bf16 peaks per device kind; unknown kinds (and CPUs) get no MFU rather than a guess.
"""

import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mim_refiner_jax import paths

# Dense bf16 peak FLOP/s of ONE jax device, keyed by `device.device_kind` as jax reports it.
# TPU v2/v3 expose each of a chip's 2 TensorCores as a device (chip: 45 / 123 TFLOP/s); v4 and v5p
# expose the whole (megacore) chip; v5e / v6e chips have one TensorCore.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
}
_PEAK_BY_LOWER_KIND = {kind.lower(): peak for kind, peak in PEAK_FLOPS_PER_DEVICE.items()}


class NonFiniteLossError(FloatingPointError):
  """A logged loss (or norm) is NaN or inf; the trainer stops and keeps the last good checkpoint."""

  def __init__(self, step: int, name: str, value: float):
    super().__init__(f"non-finite {name} = {value} at step {step}; stopping (the last saved "
                     "checkpoint predates it). Lower the learning rate or check the inputs.")
    self.step, self.name, self.value = step, name, value


def check_finite(step: int, metrics: Mapping[str, Any], keys=("loss",)) -> None:
  """Raises NonFiniteLossError if any of `keys` in the (host-side) `metrics` is NaN or inf."""
  for key in keys:
    if key not in metrics:
      raise KeyError(f"check_finite: metric {key!r} not in {sorted(metrics)}")
    value = np.asarray(jax.device_get(metrics[key]), np.float64)
    if not np.all(np.isfinite(value)):
      raise NonFiniteLossError(step, key, float(value.ravel()[~np.isfinite(value.ravel())][0]))


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind; None if unknown (e.g. "cpu")."""
  return _PEAK_BY_LOWER_KIND.get(device_kind.strip().lower())


def device_peak_flops(device=None) -> float | None:
  """`peak_flops_per_device` of `device` (default: the first jax device)."""
  if device is None:
    device = jax.devices()[0]
  return peak_flops_per_device(device.device_kind)


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled function, PER DEVICE; None if XLA does not say.

  For a sharded jit XLA analyses the partitioned per-device program: an 8-way row-sharded matmul
  reports 1/8 of its unsharded FLOPs (checked on CPU, jax 0.10). `cost_analysis()` returns a dict,
  a list of dicts (older jax) or None, and may raise on some backends.
  """
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError, ValueError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 and math.isfinite(flops) else None


def mfu(flops_per_device: float | None, step_time: float,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1]: achieved / peak FLOP/s of one device; None if unknown."""
  if not flops_per_device or not peak_per_device or not step_time > 0:
    return None
  return flops_per_device / step_time / peak_per_device


def format_duration(seconds: float) -> str:
  """3725 -> '1:02:05', 65 -> '1:05'."""
  seconds = int(round(max(seconds, 0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ThroughputTracker:
  """Step time, images/s, ETA and MFU that ignore the first (compiling) steps.

  Call `update(step)` at points where the device is synchronised (after fetching metrics), with
  `step` = number of steps completed. The first such call at or after `start_step + skip_steps`
  starts the measurement; later calls report the rates over the interval since the previous call.
  Time spent between `pause()` and `resume()` (evaluations, checkpoints) is left out of the step
  time but counted in the ETA, which extrapolates the wall time per step since measurement began.
  """

  def __init__(self, total_steps: int, images_per_step: int, *, start_step: int = 0,
               skip_steps: int = 1, num_devices: int = 1, flops_per_device: float | None = None,
               peak_flops_per_device: float | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps, self.images_per_step = total_steps, images_per_step
    self.start_step, self.skip_steps, self.num_devices = start_step, skip_steps, num_devices
    self.flops_per_device, self.peak = flops_per_device, peak_flops_per_device
    self.clock = clock
    self.start_time = clock()
    self.origin = None  # (step, wall time) where measurement began
    self.last = None    # (step, wall time, paused seconds so far) at the previous update
    self.paused_total, self.pause_start = 0.0, None

  def pause(self):
    if self.pause_start is None:
      self.pause_start = self.clock()

  def resume(self):
    if self.pause_start is not None:
      self.paused_total += self.clock() - self.pause_start
      self.pause_start = None

  def update(self, step: int) -> dict[str, float]:
    """Measurements at `step` (only what is known yet; keys as logged, e.g. "img_per_sec")."""
    self.resume()
    now = self.clock()
    out = {"elapsed_sec": now - self.start_time}
    if self.origin is None:
      if step - self.start_step >= self.skip_steps:
        self.origin = (step, now)
        self.last = (step, now, self.paused_total)
      return out
    last_step, last_time, last_paused = self.last
    self.last = (step, now, self.paused_total)
    steps = step - last_step
    busy = (now - last_time) - (self.paused_total - last_paused)
    if steps <= 0 or busy <= 0:
      return out
    step_time = busy / steps
    out.update(step_time_sec=step_time,
               img_per_sec=self.images_per_step / step_time,
               img_per_sec_per_device=self.images_per_step / step_time / self.num_devices)
    wall_per_step = (now - self.origin[1]) / (step - self.origin[0])
    out["eta_sec"] = max(self.total_steps - step, 0) * wall_per_step
    utilisation = mfu(self.flops_per_device, step_time, self.peak)
    if utilisation is not None:
      out["mfu"] = utilisation
    return out

  def progress_line(self, step: int, measured: Mapping[str, float]) -> str:
    """E.g. 'step 120/1000 (12.0%) | 0.412 s/step | 310.5 img/s | MFU 41.2% | 1:10 elapsed |
    ETA 6:02' (parts not measured yet are left out)."""
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    if "step_time_sec" in measured:
      parts.append(f"{measured['step_time_sec']:.3f} s/step")
      parts.append(f"{measured['img_per_sec']:.1f} img/s")
    if "mfu" in measured:
      parts.append(f"MFU {100.0 * measured['mfu']:.1f}%")
    parts.append(f"{format_duration(measured.get('elapsed_sec', 0.0))} elapsed")
    if "eta_sec" in measured:
      parts.append(f"ETA {format_duration(measured['eta_sec'])}")
    return " | ".join(parts)


def _scalar(name: str, value) -> int | float:
  array = np.asarray(jax.device_get(value))  # explicit: allowed under the transfer guard
  if array.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  item = array.reshape(()).item()
  if isinstance(item, bool):
    return int(item)
  if not isinstance(item, (int, float)):
    raise ValueError(f"metric {name!r} must be a number, got {type(item).__name__}")
  return item


class _RemoteText:
  """A text "file" on an object store, which has no append: the text is kept in memory and the
  whole object rewritten on every flush (metric logs are small: rows of a few hundred bytes)."""

  def __init__(self, path: str, mode: str = "a"):
    self.path = paths.as_path(path)
    self.text = self.path.read_text() if mode == "a" and self.path.exists() else ""

  def write(self, text: str):
    self.text += text

  def flush(self):
    self.path.write_text(self.text)

  def close(self):
    self.flush()


class _RemoteEventFile(_RemoteText):
  """tensorboardX's record writer for remote logdirs (its own gs:// writer uses another client):
  the event bytes are kept and the object rewritten through etils.epath on every flush."""

  def __init__(self, path: str):  # pylint: disable=super-init-not-called
    self.path, self.data = paths.as_path(path), bytearray()

  def write(self, data: bytes):
    self.data += data

  def flush(self):
    self.path.write_bytes(bytes(self.data))


class _RemoteEventFiles:
  """A tensorboardX writer factory: `open` and `directory_check` for one URL scheme."""

  def open(self, path):
    return _RemoteEventFile(path)

  def directory_check(self, path):  # object stores need no directories
    pass


def _open_jsonl(path: str):
  return _RemoteText(path) if paths.is_remote(path) else open(path, "a", encoding="utf-8")


def _summary_writer(logdir: str, **kwargs):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  if paths.is_remote(logdir):
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory(logdir.split("://")[0], _RemoteEventFiles())
  return SummaryWriter(logdir=logdir, **kwargs)


class MetricWriter:
  """Appends `workdir/metrics.jsonl` and writes TensorBoard scalars to `workdir/tb`, on process 0.

  On other processes every method is a no-op (pass `is_main` to override the process test).
  Use as a context manager or call `close()`. A resumed run calls `drop_after(start_step)` so that
  re-run steps replace their old rows instead of duplicating them.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_main: bool | None = None):
    if is_main is None:
      is_main = jax.process_index() == 0
    self.active = is_main
    self.jsonl_path = paths.join(workdir, "metrics.jsonl")  # gs://... through etils.epath
    self.tb_dir = paths.join(workdir, "tb")
    self._jsonl = self._tb = None
    if not self.active:
      return
    paths.makedirs(workdir)
    self._jsonl = _open_jsonl(self.jsonl_path)
    if tensorboard:
      self._tb = _summary_writer(self.tb_dir)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar `metrics` (python, numpy or fetched jax scalars) for `step`."""
    if not self.active:
      return
    clash = {"step", "wall_time"} & set(metrics)
    if clash:
      raise ValueError(f"metric names {sorted(clash)} are reserved by the JSONL record")
    values = {name: _scalar(name, value) for name, value in metrics.items()}
    wall_time = time.time()
    record = {"step": int(step), "wall_time": wall_time, **values}
    self._jsonl.write(json.dumps(record) + "\n")  # NaN / inf as the JSON extensions python reads
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=int(step), walltime=wall_time)
      self._tb.flush()

  def drop_after(self, step: int) -> int:
    """Forgets what was logged for steps after `step` (call once a run knows its start step).

    A run resumed from step S redoes the steps after S: their rows from the interrupted run are
    removed from metrics.jsonl (rewritten atomically; a torn last line from a crash goes too),
    and TensorBoard is told to purge its events from step S + 1 on (tensorboardX `purge_step`).
    Returns the number of rows removed.
    """
    if not self.active:
      return 0
    self._jsonl.close()
    jsonl = paths.as_path(self.jsonl_path)
    lines = jsonl.read_text().splitlines(keepends=True) if jsonl.exists() else []
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):  # a line torn by a crash
        pass
    if len(kept) != len(lines):
      if paths.is_remote(self.jsonl_path):  # an object write replaces it whole (atomic)
        paths.as_path(self.jsonl_path).write_text("".join(kept))
      else:
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
          f.writelines(kept)
        os.replace(tmp, self.jsonl_path)
    self._jsonl = _open_jsonl(self.jsonl_path)
    if self._tb is not None:
      self._tb.close()
      self._tb = _summary_writer(self.tb_dir, purge_step=step + 1)
    return len(lines) - len(kept)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
