"""Multi-crop augmentation of MIM-Refiner (refiner_facts.md section 9), host-side numpy + PIL.

The reference (KappaData on torchvision) transforms PIL RGB images with torchvision's functional
ops, which for PIL inputs are thin wrappers around PIL (ImageEnhance, ImageOps, Image.resize). We
call the same PIL primitives, so each op below matches `torchvision.transforms.functional` exactly
given the same parameters (tests/test_multicrop.py). Random parameters come from an explicit
`np.random.Generator` (Grain's `random_map` hands one per element, seeded by seed and index), so a
sample's views are deterministic; they are not the same random numbers as torch's.

Per view, in the reference order (section 9):
  crop (RandomResizedCrop, bicubic) -> horizontal flip -> colour jitter (p 0.8, ops in random
  order) -> PIL Gaussian blur -> grayscale -> solarize -> to float and normalise.

  view       size  crop scale    blur p  solarize p
  global 1   224   (0.25, 1)     1.0     0
  global 2   224   (0.25, 1)     0.1     0.2
  local x10   96   (0.05, 0.25)  0.5     0        (96 for patch 16, 98 for patch 14)

`color_augs=False` keeps only crop and flip. Every size is configurable, so tiny models on 32 px
images work (e.g. global 32, local 16, eval resize 36 -> crop 32).

Output of `MultiCrop(cfg)(record, rng)` (NHWC uint8; the train step normalises on the device):
  {"global": [2, G, G, 3], "local": [n, L, L, 3] ([0, L, L, 3] when n = 0), "label", "index",
   "num_skipped"}.
"""

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Order of the colour-jitter ops as torchvision's ColorJitter numbers them.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def local_size_for_patch(patch_size: int) -> int:
  """Local view side in the reference: 96 for patch 16, 98 for patch 14 (6x6 / 7x7 tokens)."""
  sizes = {16: 96, 14: 98}
  if patch_size not in sizes:
    raise ValueError(f"no reference local-view size for patch {patch_size}; set local_size")
  return sizes[patch_size]


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------


def _from_config(cls, cfg):
  """cfg: None, an instance of cls, a dict or a ConfigDict; unknown keys raise (typos fail loud)."""
  if cfg is None:
    return cls()
  if isinstance(cfg, cls):
    return cfg
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    cfg = cfg.to_dict()
  cfg = dict(cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
  tuples = {k: tuple(v) for k, v in cfg.items() if isinstance(v, (list, tuple))}
  return cls(**{**cfg, **tuples})


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """Training views; defaults are the reference's (refiner_facts.md section 9)."""
  global_size: int = 224
  local_size: int = 96
  num_local: int = 10
  global_scale: tuple[float, float] = (0.25, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.25)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  color_augs: bool = True  # False: crop and flip only
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  global_blur_p: tuple[float, float] = (1.0, 0.1)  # global view 1, global view 2
  local_blur_p: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  grayscale_p: float = 0.2
  global_solarize_p: tuple[float, float] = (0.0, 0.2)
  local_solarize_p: float = 0.0
  solarize_threshold: int = 128
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @classmethod
  def from_config(cls, cfg: Any = None) -> "MultiCropConfig":
    return _from_config(cls, cfg)

  def __post_init__(self):
    if self.global_size <= 0 or self.local_size <= 0 or self.num_local < 0:
      raise ValueError(f"need global_size, local_size > 0 and num_local >= 0, got {self}")
    for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")


MINAUG_SCALE, MINAUG_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision RandomResizedCrop defaults


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation view: short side to `resize_size` (bicubic, antialiased), centre crop."""
  resize_size: int = 256
  crop_size: int = 224
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  # >= 0: the probe's minimal augmentation instead (refiner_facts section 9, train_minaug.yaml):
  # RandomResizedCrop(crop_size, scale [0.08, 1], bicubic) + horizontal flip, drawn from
  # (augment_seed, dataset index), so a copy of a dataset is the same on every run and host.
  augment_seed: int = -1

  @classmethod
  def from_config(cls, cfg: Any = None) -> "EvalConfig":
    return _from_config(cls, cfg)

  def __post_init__(self):
    if not 0 < self.crop_size <= self.resize_size:
      raise ValueError(f"need 0 < crop_size <= resize_size, got {self.crop_size}, "
                       f"{self.resize_size}")


# ----------------------------------------------------------------------------------------------
# Ops: explicit parameters in, PIL image out (each mirrors torchvision.transforms.functional).
# ----------------------------------------------------------------------------------------------


def resized_crop(img: Image.Image, top: int, left: int, height: int, width: int,
                 size: int) -> Image.Image:
  """F.resized_crop(img, top, left, height, width, [size, size], BICUBIC) for PIL images.

  Crop first, then resize: PIL's resize(box=...) would read pixels outside the box at the edges.
  """
  img = img.crop((left, top, left + width, top + height))
  return img.resize((size, size), Image.BICUBIC)


def hflip(img: Image.Image) -> Image.Image:
  return img.transpose(Image.FLIP_LEFT_RIGHT)


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
  return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
  """Shifts the PIL HSV hue channel by int(factor * 255) levels, wrapping (as torchvision)."""
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f"hue factor must be in [-0.5, 0.5], got {factor}")
  h, s, v = img.convert("HSV").split()
  shift = int(factor * 255) % 256  # int() truncates toward zero, as torchvision's np.int32 cast
  h = h.point([(x + shift) % 256 for x in range(256)])  # uint8 wrap-around
  return Image.merge("HSV", (h, s, v)).convert("RGB")


_JITTER_FNS = {"brightness": adjust_brightness, "contrast": adjust_contrast,
               "saturation": adjust_saturation, "hue": adjust_hue}


def color_jitter(img: Image.Image, order: Sequence[int], factors: Sequence[float]) -> Image.Image:
  """Applies the jitter ops in `order` (indices into JITTER_OPS) with `factors` (same indexing)."""
  for op in order:
    img = _JITTER_FNS[JITTER_OPS[op]](img, factors[op])
  return img


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
  """PIL's Gaussian blur with radius = sigma, as the reference's PIL blur (section 9)."""
  return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def grayscale(img: Image.Image) -> Image.Image:
  """F.rgb_to_grayscale(img, num_output_channels=3): ITU-R 601 luma, repeated to 3 channels."""
  return img.convert("L").convert("RGB")


def solarize(img: Image.Image, threshold: int) -> Image.Image:
  """Inverts the pixels >= threshold."""
  return ImageOps.solarize(img, threshold)


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """`[C, 256]` float32: the normalised value of each uint8 level per channel (float32 arithmetic
  of ToTensor + Normalize). The train step looks pixels up in it on the device (Refiner)."""
  levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
  return ((levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T.copy()


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, as ToTensor + Normalize (but NHWC).

  Through a per-channel 256-entry table computed with that float32 arithmetic: the same values,
  about 5x faster than the arithmetic on every pixel (a quarter of the augmentation time).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.shape[-1] != len(mean):
    raise ValueError(f"expected uint8 [..., {len(mean)}] pixels, got {image.dtype} {image.shape}")
  table = normalize_table(mean, std)
  out = np.empty(image.shape, np.float32)
  for c in range(image.shape[-1]):
    np.take(table[c], image[..., c], out=out[..., c], mode="clip")  # uint8: always in range
  return out


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
  """F.resize(img, size, BICUBIC, antialias=True): short side to `size`, long side truncated."""
  width, height = img.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  if (new_w, new_h) == (width, height):
    return img
  return img.resize((new_w, new_h), Image.BICUBIC)  # PIL always antialiases when shrinking


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """F.center_crop(img, size) for images at least `size` on each side."""
  width, height = img.size
  if width < size or height < size:
    raise ValueError(f"image {width}x{height} is smaller than the centre crop {size}")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------
# Parameter samplers.
# ----------------------------------------------------------------------------------------------


def sample_crop_params(rng: np.random.Generator, height: int, width: int,
                       scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
  """(top, left, h, w) drawn like torchvision's RandomResizedCrop.get_params.

  10 tries of area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); then the largest
  centred crop whose aspect ratio is clipped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter_params(rng: np.random.Generator, brightness: float, contrast: float,
                         saturation: float, hue: float
                         ) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(op order, factors) as torchvision's ColorJitter.get_params; factors index JITTER_OPS."""
  order = tuple(int(i) for i in rng.permutation(4))
  factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
             rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
             rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
             rng.uniform(-hue, hue))
  return order, tuple(float(f) for f in factors)


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """Everything random about one view; None / False means the op is not applied."""
  size: int
  crop: tuple[int, int, int, int]  # top, left, height, width
  flip: bool = False
  jitter: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # order, factors
  blur_sigma: float | None = None
  grayscale: bool = False
  solarize: bool = False


def sample_view_params(rng: np.random.Generator, height: int, width: int, cfg: MultiCropConfig,
                       size: int, scale: Sequence[float], blur_p: float,
                       solarize_p: float) -> ViewParams:
  crop = sample_crop_params(rng, height, width, scale, cfg.ratio)
  flip = bool(rng.random() < cfg.flip_p)
  if not cfg.color_augs:
    return ViewParams(size=size, crop=crop, flip=flip)
  jitter = None
  if rng.random() < cfg.jitter_p:
    jitter = sample_jitter_params(rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
  blur_sigma = float(rng.uniform(*cfg.blur_sigma)) if rng.random() < blur_p else None
  gray = bool(rng.random() < cfg.grayscale_p)
  solar = bool(rng.random() < solarize_p)
  return ViewParams(size=size, crop=crop, flip=flip, jitter=jitter, blur_sigma=blur_sigma,
                    grayscale=gray, solarize=solar)


def apply_view(img: Image.Image, p: ViewParams, solarize_threshold: int = 128) -> Image.Image:
  """The reference order: crop -> flip -> jitter -> blur -> grayscale -> solarize."""
  img = resized_crop(img, *p.crop, p.size)
  if p.flip:
    img = hflip(img)
  if p.jitter is not None:
    img = color_jitter(img, *p.jitter)
  if p.blur_sigma is not None:
    img = gaussian_blur(img, p.blur_sigma)
  if p.grayscale:
    img = grayscale(img)
  if p.solarize:
    img = solarize(img, solarize_threshold)
  return img


def to_pil_rgb(image: np.ndarray) -> Image.Image:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
  return Image.fromarray(np.ascontiguousarray(image), "RGB")


# ----------------------------------------------------------------------------------------------
# Record transforms (module-level classes: Grain pickles them into worker processes).
# ----------------------------------------------------------------------------------------------


def _passthrough(record: dict) -> dict:
  """Label, dataset index and the unreadable-file counter, as int32 (JAX's default int)."""
  return {"label": np.int32(record["label"]), "index": np.int32(record["index"]),
          "num_skipped": np.int32(record.get("num_skipped", 0))}


class MultiCrop:
  """record {"image": uint8 HxWx3, "label", "index"} + rng -> uint8 global and local views.

  The views stay uint8 (a quarter of float32's bytes on the host and across PCIe/ICI); the train
  step normalises them on the device with `cfg.mean`, `cfg.std` (Refiner.normalize), the same
  float32 arithmetic as `normalize` here.
  """

  def __init__(self, cfg: Any = None):
    self.cfg = MultiCropConfig.from_config(cfg)

  def sample_params(self, rng: np.random.Generator, height: int, width: int) -> list[ViewParams]:
    """[global 1, global 2, local 1..n]."""
    c = self.cfg
    views = [sample_view_params(rng, height, width, c, c.global_size, c.global_scale,
                                c.global_blur_p[v], c.global_solarize_p[v]) for v in range(2)]
    views += [sample_view_params(rng, height, width, c, c.local_size, c.local_scale,
                                 c.local_blur_p, c.local_solarize_p) for _ in range(c.num_local)]
    return views

  def views_uint8(self, image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Un-normalised views [global 1, global 2, local 1..n], uint8 HxWx3 each (for show_views)."""
    img = to_pil_rgb(image)
    params = self.sample_params(rng, img.height, img.width)
    return [np.asarray(apply_view(img, p, self.cfg.solarize_threshold)) for p in params]

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    c = self.cfg
    views = self.views_uint8(record["image"], rng)
    local = (np.stack(views[2:]) if c.num_local
             else np.zeros((0, c.local_size, c.local_size, 3), np.uint8))
    # uint8: normalised on the device by the train step (models/refiner.py), with c.mean/c.std
    return {"global": np.stack(views[:2]), "local": local, **_passthrough(record)}


class EvalTransform:
  """record -> {"image": float32 [C, C, 3], "label", "index", "num_skipped"} (no randomness)."""

  def __init__(self, cfg: Any = None):
    self.cfg = EvalConfig.from_config(cfg)

  def view_uint8(self, image: np.ndarray, index: int = 0) -> np.ndarray:
    if self.cfg.augment_seed >= 0:
      return np.asarray(self.minimal_augmentation(to_pil_rgb(image), index))
    img = resize_short_side(to_pil_rgb(image), self.cfg.resize_size)
    return np.asarray(center_crop(img, self.cfg.crop_size))

  def minimal_augmentation(self, img: Image.Image, index: int) -> Image.Image:
    rng = np.random.default_rng([self.cfg.augment_seed, int(index) % 2**32])
    top, left, h, w = sample_crop_params(rng, img.height, img.width, MINAUG_SCALE, MINAUG_RATIO)
    img = resized_crop(img, top, left, h, w, self.cfg.crop_size)
    return hflip(img) if rng.random() < 0.5 else img

  def __call__(self, record: dict) -> dict:
    image = normalize(self.view_uint8(record["image"], record.get("index", 0)), self.cfg.mean,
                      self.cfg.std)
    return {"image": image, **_passthrough(record)}
