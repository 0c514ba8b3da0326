"""Input-pipeline throughput per host: our Grain + numpy/PIL multi-crop vs the torchvision recipe.

  python tools/bench_input.py                        # short default run (~1 min on 2 cores)
  python tools/bench_input.py --workers 8 --images 2048 --batch 128

Both pipelines read the same JPEG files (an ImageNet-like folder written to a temp dir from
scikit-image's photos, ~400x350 on average unless --folder is given), decode them with PIL, make
the 12 views of refiner_facts.md section 9 (2 x 224 + 10 x 96 by default), normalise and batch:
  ours:  sources.ImageFolderSource -> loader.make_train_loader (Grain, W worker processes)
  torch: torchvision ImageFolder + transforms (RandomResizedCrop, RandomHorizontalFlip,
         RandomApply(ColorJitter), PIL GaussianBlur, RandomGrayscale, RandomSolarize, ToTensor,
         Normalize; the reference's approach) -> torch DataLoader (W worker processes).
Printed: single-process transform cost (no loader), and loader throughput with W workers
(images/s, views/s, images/s per worker process), time to the first batch, and our/torch ratios.
Loader rates count the batches after the first (worker start-up is timed apart); the batches
that workers finish while the first is awaited inflate both rates slightly (about one batch per
worker), so measure with many batches (--images) for precise numbers.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# pylint: disable=g-import-not-at-top,wrong-import-position
from mim_refiner_jax.data import loader
from mim_refiner_jax.data import multicrop
from mim_refiner_jax.data import sources

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina")


def write_jpeg_folder(root, num_files, num_classes=10, seed=0):
  """JPEGs (quality 90) of random crops of skimage photos, ~400x350 on average, like ImageNet."""
  import skimage.data
  rng = np.random.default_rng(seed)
  photos = [np.asarray(getattr(skimage.data, n)())[..., :3] for n in PHOTOS]
  for i in range(num_files):
    photo = photos[i % len(photos)]
    h, w = int(rng.integers(280, 421)), int(rng.integers(320, 481))
    img = Image.fromarray(photo)
    if min(photo.shape[:2]) < max(h, w):  # small photos: enlarge first
      s = max(h, w) / min(photo.shape[:2])
      img = img.resize((int(photo.shape[1] * s) + 1, int(photo.shape[0] * s) + 1), Image.BICUBIC)
    top = int(rng.integers(0, img.height - h + 1))
    left = int(rng.integers(0, img.width - w + 1))
    folder = os.path.join(root, f"class{i % num_classes:02d}")
    os.makedirs(folder, exist_ok=True)
    img.crop((left, top, left + w, top + h)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


_TORCHVISION_OPS = None  # must stay referenced, or torch drops the op definitions


def _make_torchvision_importable() -> None:
  """torchvision 0.28.0 from PyPI is a CUDA build whose compiled ops do not load next to the CPU
  torch 2.13.0 wheel (`operator torchvision::nms does not exist`); declaring the two op schemas
  its meta registrations need makes the pure-Python transforms importable
  (../shared/ENGINEERING.md; the tests use the same shim, tests/torchvision_compat.py)."""
  global _TORCHVISION_OPS
  import torch
  try:
    torch.ops.torchvision.nms  # pylint: disable=pointless-statement
    return  # a working torchvision build
  except (AttributeError, RuntimeError):
    pass
  if _TORCHVISION_OPS is None:
    _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


# ----------------------------------------------------------------------------------------------
# The torchvision recipe (module level: the DataLoader's workers pickle it).
# ----------------------------------------------------------------------------------------------


class PILGaussianBlur:
  """KappaData-style PIL blur: sigma ~ U(0.1, 2.0), PIL GaussianBlur(radius=sigma)."""

  def __call__(self, img):
    import torch
    sigma = float(torch.empty(1).uniform_(0.1, 2.0))
    return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class TorchMultiCrop:
  """[g1, g2, l1..ln] tensors [3, H, W], as the reference composes torchvision transforms."""

  def __init__(self, cfg: multicrop.MultiCropConfig):
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC

    def view(size, scale, blur_p, solarize_p):
      ops = [T.RandomResizedCrop(size, scale=scale, ratio=cfg.ratio, interpolation=bicubic),
             T.RandomHorizontalFlip(cfg.flip_p)]
      if cfg.color_augs:
        ops += [T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation,
                                             cfg.hue)], p=cfg.jitter_p),
                T.RandomApply([PILGaussianBlur()], p=blur_p),
                T.RandomGrayscale(cfg.grayscale_p)]
        if solarize_p > 0:
          ops.append(T.RandomSolarize(cfg.solarize_threshold, p=solarize_p))
      return T.Compose(ops + [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    self.views = [view(cfg.global_size, cfg.global_scale, cfg.global_blur_p[v],
                       cfg.global_solarize_p[v]) for v in range(2)]
    self.views += [view(cfg.local_size, cfg.local_scale, cfg.local_blur_p, cfg.local_solarize_p)
                   for _ in range(cfg.num_local)]

  def __call__(self, img):
    return [t(img) for t in self.views]


# ----------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------


def time_loader(batches, num_batches):
  """(seconds to the first batch, seconds for the remaining num_batches - 1)."""
  start = time.perf_counter()
  it = iter(batches)
  next(it)
  first = time.perf_counter()
  for _ in range(num_batches - 1):
    next(it)
  return first - start, time.perf_counter() - first


def report(name, images, seconds, views_per_image, processes):
  rate = images / seconds
  print(f"  {name:6s} {rate:8.1f} images/s  {rate * views_per_image:9.1f} views/s  "
        f"{rate / processes:7.1f} images/s per process   ({images} images in {seconds:.2f} s)")
  return rate


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=256, help="images per loader measurement")
  parser.add_argument("--transform-images", type=int, default=48,
                      help="images for the single-process transform-only measurement")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--folder", default=None, help="an ImageNet-layout folder to read instead")
  parser.add_argument("--files", type=int, default=128, help="JPEGs to write without --folder")
  parser.add_argument("--global-size", type=int, default=224)
  parser.add_argument("--local-size", type=int, default=96)
  parser.add_argument("--num-local", type=int, default=10)
  args = parser.parse_args(argv)
  from absl import flags
  flags.FLAGS(sys.argv[:1], known_only=True)  # Grain's worker processes read absl flags
  _make_torchvision_importable()
  import torch
  import torchvision

  cfg = multicrop.MultiCropConfig(global_size=args.global_size, local_size=args.local_size,
                                  num_local=args.num_local)
  views = 2 + cfg.num_local
  with tempfile.TemporaryDirectory() as tmp:
    root = args.folder
    if root is None:
      root = tmp
      write_jpeg_folder(root, args.files)
    source = sources.make_source({"name": "image_folder", "root": root})
    sizes = np.array([Image.open(os.path.join(root, f)).size for f in source.source.files[:64]])
    print(f"{len(source)} JPEGs in {root}, mean size {sizes[:, 0].mean():.0f}x"
          f"{sizes[:, 1].mean():.0f} (WxH); views: 2 x {cfg.global_size} + {cfg.num_local} x "
          f"{cfg.local_size}; {os.cpu_count()} CPU cores")

    # 1. Transform only (decode included), one process, one thread.
    torch.set_num_threads(1)
    ours, theirs = multicrop.MultiCrop(cfg), TorchMultiCrop(cfg)
    rng = np.random.default_rng(0)
    n = args.transform_images
    t0 = time.perf_counter()
    for i in range(n):
      ours(source[i % len(source)], rng)
    t1 = time.perf_counter()
    tv_folder = torchvision.datasets.ImageFolder(root)
    for i in range(n):
      theirs(tv_folder[i % len(tv_folder)][0])
    t2 = time.perf_counter()
    print(f"transform only (decode + {views} views + normalise), 1 process, 1 thread:")
    r_ours = report("ours", n, t1 - t0, views, 1)
    r_torch = report("torch", n, t2 - t1, views, 1)
    print(f"  ratio ours/torch {r_ours / r_torch:.2f}")

    # 2. Loaders with W worker processes; the first batch (worker start-up) is timed apart.
    num_batches = max(2, args.images // args.batch)
    counted = (num_batches - 1) * args.batch
    ours_it = loader.make_train_loader(source, cfg, args.batch, seed=0,
                                       worker_count=args.workers, process_index=0,
                                       process_count=1)
    startup_ours, secs_ours = time_loader(ours_it, num_batches)
    if args.workers:
      ours_it.close()
    tv_folder.transform = theirs
    sampler = torch.utils.data.RandomSampler(tv_folder, num_samples=num_batches * args.batch)
    torch_dl = torch.utils.data.DataLoader(tv_folder, batch_size=args.batch, sampler=sampler,
                                           num_workers=args.workers, drop_last=True)
    startup_torch, secs_torch = time_loader(torch_dl, num_batches)
    procs = max(1, args.workers)
    print(f"loaders, batch {args.batch}, {args.workers} worker processes, {counted} images after "
          f"the first batch (first batch: ours {startup_ours:.1f} s, torch {startup_torch:.1f} s):")
    r_ours = report("ours", counted, secs_ours, views, procs)
    r_torch = report("torch", counted, secs_torch, views, procs)
    print(f"  ratio ours/torch {r_ours / r_torch:.2f}")


if __name__ == "__main__":
  main()
