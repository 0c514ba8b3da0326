"""Writes a PNG grid of multi-crop views: rows = images, columns = input, 2 global, N local views.

  python tools/show_views.py --out /tmp/views.png
  python tools/show_views.py --out /tmp/tiny.png --global-size 32 --local-size 16 --num-local 4
  python tools/show_views.py --out /tmp/crop_flip.png --no-color-augs

Images default to scikit-image's bundled colour photos; views are shown before normalisation.
Column headers: g1 (blur p 1.0), g2 (blur 0.1, solarize 0.2), l1..lN (blur 0.5).
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from mim_refiner_jax.data import multicrop

DEFAULT_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
PAD = 4
HEADER = 16


def load_images(names):
  import skimage.data  # pylint: disable=g-import-not-at-top
  images = []
  for name in names:
    if os.path.isfile(name):
      images.append(np.asarray(Image.open(name).convert("RGB")))
    elif hasattr(skimage.data, name):
      images.append(np.asarray(getattr(skimage.data, name)())[..., :3])
    else:
      raise SystemExit(f"--images: {name!r} is neither a file nor a skimage.data image")
  return images


def grid(rows, column_sizes, headers):
  """rows: lists of uint8 HxWx3 arrays; each column as wide as its size, views top-aligned."""
  width = sum(column_sizes) + PAD * (len(column_sizes) + 1)
  height = HEADER + len(rows) * (max(column_sizes) + PAD) + PAD
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  x = PAD
  for size, header in zip(column_sizes, headers):
    draw.text((x, 2), header, fill="black")
    x += size + PAD
  for r, views in enumerate(rows):
    x, y = PAD, HEADER + r * (max(column_sizes) + PAD)
    for size, view in zip(column_sizes, views):
      canvas.paste(Image.fromarray(view), (x, y))
      x += size + PAD
  return canvas


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="views.png", help="PNG file to write")
  parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES,
                      help="skimage.data names or image files")
  parser.add_argument("--num-local", type=int, default=10)
  parser.add_argument("--global-size", type=int, default=224)
  parser.add_argument("--local-size", type=int, default=96)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-color-augs", action="store_true",
                      help="crop and flip only (no jitter, blur, grayscale, solarize)")
  args = parser.parse_args(argv)

  crop = multicrop.MultiCrop({"global_size": args.global_size, "local_size": args.local_size,
                              "num_local": args.num_local, "color_augs": not args.no_color_augs})
  rows = []
  for i, image in enumerate(load_images(args.images)):
    rng = np.random.default_rng([args.seed, i])
    scale = args.global_size / max(image.shape[:2])  # the input, shrunk to the global size
    thumb = Image.fromarray(image).resize((max(1, round(image.shape[1] * scale)),
                                           max(1, round(image.shape[0] * scale))), Image.BICUBIC)
    rows.append([np.asarray(thumb)] + crop.views_uint8(image, rng))
  sizes = [args.global_size] * 3 + [args.local_size] * args.num_local
  headers = ["input", "g1", "g2"] + [f"l{k + 1}" for k in range(args.num_local)]
  out = grid(rows, sizes, headers)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  out.save(args.out)
  print(f"wrote {args.out} ({out.width}x{out.height}): {len(rows)} images x "
        f"(input + 2 global {args.global_size}px + {args.num_local} local {args.local_size}px)")


if __name__ == "__main__":
  main()
