"""Grain input pipelines: per-host multi-crop training batches and padded evaluation batches.

Training (`make_train_loader`): ONE global stream, of which each host reads its slice.
  source -> shuffle (reshuffled every epoch) -> repeat(num_epochs) -> MultiCrop (Grain's
  random_map: the generator depends on the seed and the element's position in the global stream,
  so every epoch augments differently) -> global batch k = stream elements [k B, (k + 1) B)
  -> host p of P takes rows [p b, (p + 1) b) of it (b = B / P) -> threads -> workers.
So the sequence of global batches, augmentations included, is a function of (seed, step) alone,
not of the process count: a run checkpointed on P hosts continues on any other host count with
the same samples (issue 19; `start_step` starts the stream at a global step, which is all the
input "state" a checkpoint needs). The global array puts process p's rows p-th
(sharding.global_batch, devices in process order), so it equals the 1-process batch.
Batches are formed before the worker processes (Grain hands whole batches to workers round-robin),
so the stream is the same for any worker_count and every host yields the same number of batches.
Batching follows repeat, so a batch may straddle two epochs (with num_epochs=None the stream is
endless; a finite run gets floor(num_epochs * N / B) global batches). The returned iterator also
supports get_state()/set_state() (same worker_count: the state of worker processes differs).

Per-host training batch, b = global_batch_size // process_count, views VIEW-MAJOR (the encoder
runs once per resolution group, and the pooled rows are [g1(B); g2(B); l1(B); ...],
refiner_facts.md section 4):
  "global":      uint8 [2, b, G, G, 3]     global views 1 and 2, NHWC pixels (normalised on the
                                           device by the step: models/refiner.py)
  "local":       uint8 [n, b, L, L, 3]     local views ([0, b, L, L, 3] when n = 0)
  "label":       int32 [b]
  "index":       int32 [b]                 dataset index (NN-queue self-exclusion)
  "num_skipped": int32 [b]                 unreadable files skipped to fill the row; sum it for
                                           the batch's skip count (metrics)
To make global arrays, shard the batch axis: P(None, "data") for "global"/"local", P("data")
for the rest (jax.make_array_from_process_local_data).

Evaluation (`make_eval_loader`) returns (dataset, num_steps): iterating the dataset (again for
every evaluation) gives exactly num_steps batches on every host, the last padded:
  "image": float32 [b, C, C, 3], "label": int32 [b], "index": int32 [b] (-1 on padding),
  "num_skipped": int32 [b], "mask": bool [b] (False on padding rows: a black image, label 0).
"""

import math
import signal
from typing import Any

import grain
import numpy as np

from mim_refiner_jax.data import multicrop


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    # Only now, at call time: devices must not be touched before jax.distributed.initialize.
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _per_host_batch(global_batch_size, process_count):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return global_batch_size // process_count


def _derived_seed(seed, process_index, purpose):
  """Independent uint32 seeds per (seed, host, purpose): hosts must not share augmentations."""
  return int(np.random.SeedSequence([seed, process_index, purpose]).generate_state(1)[0])


def _ignore_sigint(worker_index, worker_count):  # pylint: disable=unused-argument
  """In Grain workers: Ctrl-C in a terminal signals the whole process group; the trainer, not its
  workers, decides what to do (save, then stop), so a worker must not die of it."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _finish(ds, worker_count, read_threads, read_buffer_size, worker_buffer_size):
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=read_buffer_size))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      raise RuntimeError("Grain worker processes read absl flags, which are not parsed yet: run "
                         "under absl.app.run(main) or call flags.FLAGS(sys.argv[:1], "
                         "known_only=True) first (or use worker_count=0)")
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size),
                        worker_init_fn=_ignore_sigint)
  return ds


def collate_views(samples):
  """MultiCrop outputs -> one view-major batch (stacked straight into [views, b, ...])."""
  return {"global": np.stack([s["global"] for s in samples], axis=1),
          "local": np.stack([s["local"] for s in samples], axis=1),
          **{k: np.stack([s[k] for s in samples]) for k in ("label", "index", "num_skipped")}}


def make_train_loader(source, transform_cfg: Any, global_batch_size: int, seed: int, *,
                      start_step: int = 0, num_epochs: int | None = None, worker_count: int = 0,
                      process_index: int | None = None, process_count: int | None = None,
                      read_threads: int = 1, read_buffer_size: int = 2,
                      worker_buffer_size: int = 1) -> grain.DatasetIterator:
  """Infinite (num_epochs=None) or finite iterator of per-host training batches (module doc).

  source: random-access (e.g. sources.make_source(cfg)); transform_cfg: MultiCropConfig fields;
  start_step: the global step of the first batch (a resumed run's step, on any host count);
  worker_count: Grain worker processes (0 = in this process); read_threads / read_buffer_size:
  threads (and batches in flight) per worker; process_index/count default to JAX's (read at call
  time). Memory per worker is about (read_buffer_size + worker_buffer_size) batches.
  """
  process_index, process_count = _process_info(process_index, process_count)
  batch_size = _per_host_batch(global_batch_size, process_count)
  if len(source) < global_batch_size:
    raise ValueError(f"{len(source)} examples are fewer than the global batch "
                     f"{global_batch_size}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=_derived_seed(seed, 0, 0))
  ds = ds.repeat(num_epochs)
  # The augmentation seed is the same on every host: a record's views depend on its position in
  # the global stream only.
  ds = ds.random_map(multicrop.MultiCrop(transform_cfg), seed=_derived_seed(seed, 0, 1))
  # Row blocks of b: global batch k is blocks k P .. k P + P - 1; host p takes block k P + p.
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=collate_views)
  ds = ds[:len(ds) // process_count * process_count]  # whole global batches only
  ds = ds[process_index::process_count][start_step:]
  return iter(_finish(ds, worker_count, read_threads, read_buffer_size, worker_buffer_size))


class _PaddedShard:
  """This host's eval records, padded with zero records (mask False) to a fixed length."""

  def __init__(self, source, process_index, process_count, padded_len, crop_size):
    self.source, self.padded_len, self.crop_size = source, padded_len, crop_size
    self.rows = range(process_index, len(source), process_count)

  def __len__(self):
    return self.padded_len

  def __getitem__(self, i):
    if i < len(self.rows):
      return {**self.source[self.rows[i]], "mask": True}
    return {"image": np.zeros((self.crop_size, self.crop_size, 3), np.uint8), "label": 0,
            "index": -1, "num_skipped": 0, "mask": False}


class _EvalTransformWithMask:
  def __init__(self, cfg):
    self.transform = multicrop.EvalTransform(cfg)

  def __call__(self, record):
    return {**self.transform(record), "mask": np.bool_(record["mask"])}


def make_eval_loader(source, eval_cfg: Any, global_batch_size: int, *, worker_count: int = 0,
                     process_index: int | None = None, process_count: int | None = None,
                     read_threads: int = 1, read_buffer_size: int = 2,
                     worker_buffer_size: int = 1) -> tuple[grain.IterDataset, int]:
  """(re-iterable dataset of padded per-host eval batches, num_steps), module docstring layout.

  Every record appears exactly once over all hosts (host p gets records p, p + P, ...), and every
  host runs num_steps = ceil(ceil(N / P) / b) steps, so none waits in a collective for the others.
  """
  process_index, process_count = _process_info(process_index, process_count)
  batch_size = _per_host_batch(global_batch_size, process_count)
  cfg = multicrop.EvalConfig.from_config(eval_cfg)
  max_shard_len = math.ceil(len(source) / process_count)
  num_steps = math.ceil(max_shard_len / batch_size)
  shard = _PaddedShard(source, process_index, process_count, num_steps * batch_size,
                       cfg.crop_size)
  ds = grain.MapDataset.source(shard).map(_EvalTransformWithMask(cfg)).batch(batch_size)
  return _finish(ds, worker_count, read_threads, read_buffer_size, worker_buffer_size), num_steps
