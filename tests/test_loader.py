"""Grain loaders: batch layout, host shards, epochs, determinism, resume, workers, eval padding."""
import itertools

from etils import epath
import grain
import numpy as np
import pytest

from mim_refiner_jax.data import loader
from mim_refiner_jax.data import multicrop
from mim_refiner_jax.data import sources

VIEWS = {"global_size": 16, "local_size": 8, "num_local": 3}


@pytest.fixture(scope="module")
def source():
  return sources.make_source({"name": "synthetic", "num_examples": 24, "num_classes": 4,
                              "image_size": 24})


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_layout(source):
  it = loader.make_train_loader(source, VIEWS, global_batch_size=8, seed=0, process_index=1,
                                process_count=2)
  batch = next(it)
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {"global": ((2, 4, 16, 16, 3), np.uint8),
                    "local": ((3, 4, 8, 8, 3), np.uint8),
                    "label": ((4,), np.int32), "index": ((4,), np.int32),
                    "num_skipped": ((4,), np.int32)}
  for r in range(4):
    assert batch["label"][r] == source[int(batch["index"][r])]["label"]
  assert (batch["num_skipped"] == 0).all()


def test_global_batches_do_not_depend_on_the_process_count(source):
  """Issue 19: the hosts' slices, in process order, are the 1-process batch (augmentations
  included), for 1, 2 and 4 processes, and `start_step` starts at that global batch; so a run
  resumes on another host count with the same samples."""
  def global_batches(process_count, start_step=0, n=5):
    hosts = [_take(loader.make_train_loader(source, VIEWS, global_batch_size=8, seed=2,
                                            start_step=start_step, process_index=p,
                                            process_count=process_count), n)
             for p in range(process_count)]
    axis = {"global": 1, "local": 1}
    return [{k: np.concatenate([h[i][k] for h in hosts], axis=axis.get(k, 0))
             for k in hosts[0][i]} for i in range(n)]

  one = global_batches(1, n=7)  # 7 x 8 rows cross two epochs of 24 records
  _assert_same_batches(global_batches(2), one[:5])
  _assert_same_batches(global_batches(4), one[:5])
  _assert_same_batches(global_batches(2, start_step=3, n=4), one[3:])
  _assert_same_batches(global_batches(4, start_step=5, n=2), one[5:])


def test_epochs_shards_and_determinism(source):
  def epochs(process_index, seed=0):
    it = loader.make_train_loader(source, VIEWS, global_batch_size=8, seed=seed, num_epochs=2,
                                  process_index=process_index, process_count=2)
    return list(it)

  host0, host1 = epochs(0), epochs(1)
  assert len(host0) == len(host1) == 6  # 2 epochs x 3 global batches of 8 / 2 hosts
  # Global batch k is host 0's k-th batch then host 1's: 3 global batches per epoch of 24.
  idx = np.concatenate([np.concatenate([a["index"], b["index"]]) for a, b in zip(host0, host1)])
  first, second = idx[:24], idx[24:]
  assert sorted(first) == sorted(second) == list(range(24))  # each epoch once over the hosts
  assert not np.array_equal(first, second)  # reshuffled per epoch
  # Deterministic for a seed; another seed changes the order and the augmentations.
  _assert_same_batches(host0, epochs(0))
  other = epochs(0, seed=1)
  assert not np.array_equal(np.concatenate([b["index"] for b in host0]),
                            np.concatenate([b["index"] for b in other]))
  # Each epoch augments a record differently (the generator depends on the position).
  def views_of_record0(batches):
    (view,) = [b["global"][:, r] for b in batches for r, i in enumerate(b["index"]) if i == 0]
    return view
  assert not np.array_equal(views_of_record0(host0[:3] + host1[:3]),
                            views_of_record0(host0[3:] + host1[3:]))


def test_unequal_shards_give_equal_step_counts():
  src = sources.make_source({"name": "synthetic", "num_examples": 25, "image_size": 16})
  counts = [len(list(loader.make_train_loader(src, VIEWS, 4, seed=0, num_epochs=1,
                                              process_index=p, process_count=2)))
            for p in range(2)]
  assert counts == [6, 6]  # 12 records per host (one of 25 dropped), batch 2 per host


def test_resume_from_iterator_state(source, tmp_path):
  def make():
    return loader.make_train_loader(source, VIEWS, global_batch_size=4, seed=3,
                                    process_index=0, process_count=1)

  it = make()
  _take(it, 7)  # crosses the first epoch boundary (6 batches per epoch)
  state = it.get_state()
  # The trainer saves the iterator with Orbax through Grain's checkpoint handler.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  expected = _take(it, 4)
  restored = make()
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), expected)
  from_file = handler.restore(epath.Path(tmp_path), item=make())
  _assert_same_batches(_take(from_file, 4), expected)


def test_workers_give_the_same_stream_and_resume(source):
  kwargs = dict(global_batch_size=4, seed=5, process_index=0, process_count=1)
  expected = _take(loader.make_train_loader(source, VIEWS, **kwargs), 5)
  it = loader.make_train_loader(source, VIEWS, worker_count=2, **kwargs)
  try:
    _assert_same_batches(_take(it, 3), expected[:3])
    state = it.get_state()
  finally:
    it.close()
  restored = loader.make_train_loader(source, VIEWS, worker_count=2, **kwargs)
  try:
    restored.set_state(state)
    _assert_same_batches(_take(restored, 2), expected[3:])
  finally:
    restored.close()


def test_corrupt_files_are_counted_in_batches(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c in range(2):
    (tmp_path / f"class{c}").mkdir()
    for i in range(4):
      Image.fromarray(np.full((20, 20, 3), 30 * i + 100 * c, np.uint8)).save(
          tmp_path / f"class{c}" / f"{i}.png")
  (tmp_path / "class1" / "2.png").write_bytes(b"garbage")
  src = sources.make_source({"name": "image_folder", "root": str(tmp_path)})
  batches = list(loader.make_train_loader(src, VIEWS, 4, seed=0, num_epochs=1,
                                          process_index=0, process_count=1))
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 1
  indices = np.concatenate([b["index"] for b in batches])
  bad = src.source.files.index("class1/2.png")
  assert bad not in indices and list(indices).count(bad + 1) == 2


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_loader_pads_with_mask(source, process_count):
  src = sources.make_source({"name": "synthetic", "num_examples": 13, "image_size": 24})
  eval_cfg = {"resize_size": 18, "crop_size": 16}
  seen, steps = [], set()
  for p in range(process_count):
    ds, num_steps = loader.make_eval_loader(src, eval_cfg, global_batch_size=4, process_index=p,
                                            process_count=process_count)
    batches = list(ds)
    assert len(batches) == num_steps == 4  # ceil(ceil(13 / P) / (4 / P)) for P = 1 and 2
    steps.add(num_steps)
    for b in batches:
      assert b["image"].shape == (4 // process_count, 16, 16, 3) and b["mask"].dtype == bool
      assert (b["index"][~b["mask"]] == -1).all()
      seen += list(b["index"][b["mask"]])
    # A real row is the eval transform of its record; a second pass gives the same batches.
    transform = multicrop.EvalTransform(eval_cfg)
    np.testing.assert_array_equal(batches[0]["image"][0],
                                  transform(src[int(batches[0]["index"][0])])["image"])
    _assert_same_batches(batches, list(ds))
  assert len(steps) == 1
  assert sorted(seen) == list(range(13))  # every record exactly once over all hosts


def test_bad_batch_sizes_are_rejected(source):
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    loader.make_train_loader(source, VIEWS, 8, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="fewer than the global batch"):
    loader.make_train_loader(source, VIEWS, 32, seed=0, process_index=0, process_count=1)
