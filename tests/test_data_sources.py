"""Sources: record format, tfds (ArrayRecord, no TensorFlow), image folder, MNIST, synthetic,
unreadable-file handling."""
import functools
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image
import skimage.data

from mim_refiner_jax.data import sources


def _check_record(record, index):
  assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
  assert record["image"].shape[-1] == 3
  assert isinstance(record["label"], int) and record["index"] == index


def test_synthetic_is_deterministic_and_class_dependent():
  src = sources.make_source({"name": "synthetic", "num_examples": 12, "num_classes": 3,
                             "image_size": [24, 40], "seed": 7})
  assert len(src) == 12
  for i in range(12):
    _check_record(src[i], i)
    assert src[i]["label"] == i % 3 and src[i]["num_skipped"] == 0
  assert src[5]["image"].shape == (24, 40, 3)
  np.testing.assert_array_equal(src[5]["image"], src[5]["image"])
  assert not np.array_equal(src[5]["image"], src[8]["image"])  # same class, other image
  other_seed = sources.make_source({"name": "synthetic", "num_examples": 12, "num_classes": 3,
                                    "image_size": [24, 40], "seed": 8})
  assert not np.array_equal(src[5]["image"], other_seed[5]["image"])
  # Classes differ in colour: mean RGB per class is far apart compared with within-class spread.
  means = np.array([[src[i]["image"].mean((0, 1)) for i in range(c, 12, 3)] for c in range(3)])
  between = np.linalg.norm(means.mean(1)[:, None] - means.mean(1)[None], axis=-1).max()
  assert between > 20


def test_mnist_source_pads_to_32_and_repeats_grey():
  src = sources.make_source({"name": "mnist", "split": "val", "image_size": 32})
  images, labels = sources._mnist_arrays("val")  # cached mnist.load_mnist("val"): parsed once
  assert len(src) == len(images) == 1000
  record = src[123]
  _check_record(record, 123)
  assert record["image"].shape == (32, 32, 3) and record["label"] == labels[123]
  np.testing.assert_array_equal(record["image"][2:30, 2:30, 1], images[123])
  assert (record["image"][..., 0] == record["image"][..., 2]).all()
  assert not record["image"][:2].any() and not record["image"][:, 30:].any()  # zero padding
  assert np.bincount(labels).tolist() == [100] * 10 and labels.dtype == np.int64
  assert sources.make_source({"name": "mnist", "split": "val", "image_size": 16})[0][
      "image"].shape == (16, 16, 3)  # resized below 28 px


def _write_image_folder(root, corrupt=()):
  """b/ and a/ classes (labels a=0, b=1) with PNG grey, RGBA, JPEG and RGB PNG files."""
  os.makedirs(root / "a" / "nested")
  os.makedirs(root / "b")
  astronaut = skimage.data.astronaut()[::8, ::8]  # 64x64
  Image.fromarray(astronaut).save(root / "a" / "x1.JPEG", quality=95)
  Image.fromarray(astronaut[..., 0]).save(root / "a" / "x2.png")  # grey
  Image.fromarray(np.dstack([astronaut, np.full(astronaut.shape[:2], 9, np.uint8)])).save(
      root / "a" / "nested" / "x3.png")  # RGBA
  Image.fromarray(astronaut[:40]).save(root / "b" / "y1.png")
  Image.fromarray(astronaut[:, :30]).save(root / "b" / "y2.jpg")
  (root / "b" / "notes.txt").write_text("not an image")
  for name in corrupt:
    path = root / name
    if name.endswith("truncated.jpg"):
      buf = io.BytesIO()
      Image.fromarray(astronaut).save(buf, format="JPEG")
      path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    else:
      path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
  return astronaut


def test_image_folder_layout_labels_and_decoding(tmp_path):
  astronaut = _write_image_folder(tmp_path)
  src = sources.make_source({"name": "image_folder", "root": str(tmp_path)})
  inner = src.source
  assert inner.classes == ["a", "b"]
  assert inner.files == ["a/x1.JPEG", "a/x2.png", "a/nested/x3.png", "b/y1.png", "b/y2.jpg"]
  assert [src[i]["label"] for i in range(len(src))] == [0, 0, 0, 1, 1]
  # Same files, order and labels as torchvision's ImageFolder.
  from torchvision.datasets import ImageFolder  # pylint: disable=g-import-not-at-top
  ref = ImageFolder(str(tmp_path))
  assert [(os.path.relpath(p, tmp_path), y) for p, y in ref.samples] == list(
      zip(inner.files, inner.labels.tolist()))
  for i in range(len(src)):
    _check_record(src[i], i)
  np.testing.assert_array_equal(src[2]["image"], astronaut)  # RGBA -> RGB, alpha dropped
  grey = src[1]["image"]
  np.testing.assert_array_equal(grey, np.repeat(astronaut[..., :1], 3, axis=-1))
  assert src[3]["image"].shape == (40, 64, 3) and src[4]["image"].shape == (64, 30, 3)
  assert np.abs(src[0]["image"].astype(int) - astronaut).mean() < 8  # JPEG q95 of a busy image
  for i in range(len(src)):  # pixels as torchvision's default (PIL) loader decodes them
    np.testing.assert_array_equal(src[i]["image"], np.asarray(ref[i][0]))


def test_corrupt_images_are_skipped_counted_and_warned_once(tmp_path, caplog):
  _write_image_folder(tmp_path, corrupt=("a/x0_bad.jpg", "b/y0_truncated.jpg"))
  src = sources.make_source({"name": "image_folder", "root": str(tmp_path)})
  files = src.source.files
  bad = [files.index("a/x0_bad.jpg"), files.index("b/y0_truncated.jpg")]
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # the second pass must not warn again
      records = [src[i] for i in range(len(src))]
  for b in bad:
    assert records[b]["index"] == b + 1 and records[b]["num_skipped"] == 1
    np.testing.assert_array_equal(records[b]["image"], records[b + 1]["image"])
  assert sum(r["num_skipped"] for r in records) == 2
  warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
  assert len(warnings) == 2
  assert any("x0_bad.jpg" in w for w in warnings) and any("y0_truncated.jpg" in w for w in warnings)
  # The last index wraps around to index 0.
  last = len(files) - 1
  os.replace(tmp_path / "a" / "x0_bad.jpg", tmp_path / "b" / "z_bad.jpg")
  src = sources.make_source({"name": "image_folder", "root": str(tmp_path)})
  assert src.source.files[-1] == "b/z_bad.jpg"
  assert src[last]["index"] == 0 and src[last]["num_skipped"] == 1

  fail_fast = sources.make_source({"name": "image_folder", "root": str(tmp_path),
                                   "fail_fast": True})
  with pytest.raises(sources.UnreadableImageError, match="y0_truncated.jpg.*fail_fast=True"):
    fail_fast[fail_fast.source.files.index("b/y0_truncated.jpg")]


@functools.cache  # tfds registers a builder class by name, once per process
def _make_tfds_builder():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyColourAndGrey(tfds.core.GeneratorBasedBuilder):
    """6 train / 2 test images of varying size: pixel value = 10 * example id, label = id % 3."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "img": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding="zlib"),
          "cls": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(6)),
              "test": self._generate_examples(range(6, 8))}

    def _generate_examples(self, ids):
      for i in ids:
        channels = 1 if i % 2 else 3  # odd ids are grey
        yield i, {"img": np.full((5 + i, 7, channels), 10 * i, np.uint8), "cls": i % 3}

  return TinyColourAndGrey


def test_tfds_array_record_source(tmp_path):
  builder = _make_tfds_builder()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  src = sources.make_source({"name": "tfds", "dataset": builder.name, "split": "train",
                             "data_dir": str(tmp_path), "image_key": "img", "label_key": "cls"})
  assert len(src) == 6
  seen = set()
  for i in range(6):
    record = src[i]
    _check_record(record, i)
    example_id = int(record["image"][0, 0, 0]) // 10  # tfds may store examples in any order
    assert record["image"].shape == (5 + example_id, 7, 3)
    assert (record["image"] == 10 * example_id).all()  # grey repeated to 3 channels
    assert record["label"] == example_id % 3
    seen.add(example_id)
  assert seen == set(range(6))
  test_split = sources.make_source({"name": "tfds", "dataset": builder.name, "split": "test",
                                    "data_dir": str(tmp_path), "image_key": "img",
                                    "label_key": "cls"})
  assert len(test_split) == 2


def test_tfds_imagenet2012_spec_with_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=3):
    src = sources.make_source({"name": "tfds", "dataset": "imagenet2012", "split": "validation"})
    assert len(src) == 3
    for i in range(3):
      _check_record(src[i], i)
      assert 0 <= src[i]["label"] < 1000


def test_make_source_errors():
  with pytest.raises(ValueError, match="unknown data source name 'imagenet'.*image_folder"):
    sources.make_source({"name": "imagenet"})
  with pytest.raises(ValueError, match="bad config for source 'synthetic'.*num_exampels"):
    sources.make_source({"name": "synthetic", "num_exampels": 3})
  with pytest.raises(ValueError, match="not a directory"):
    sources.make_source({"name": "image_folder", "root": "/nonexistent/imagenet"})
