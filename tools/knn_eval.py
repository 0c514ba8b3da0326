r"""k-NN accuracy of any encoder checkpoint (refiner_facts.md section 10.1).

Reads every format the converter does (MAE .pth, MAWS .pt, data2vec 2.0 .pt, official refined .th,
timm state dicts, safetensors, Flax checkpoint directories, e.g. a run's export/encoder_flax) and
evaluates k-NN with the reference protocol: train-split features standardised with their own mean
and std, L2-normalised, top-k exp(s/tau) vote. Features default to the paper's: the last block's
CLS token and mean patch token, without the final LayerNorm.

  # ImageNet (prepared with tfds; see mim_refiner_jax/data/sources.py):
  python tools/knn_eval.py --checkpoint weights/maerefined_l16.th \
      --train tfds:imagenet2012_subset/10pct:train --test tfds:imagenet2012:validation
  # The CPU demo's refined encoder on the held-out MNIST digits:
  python tools/knn_eval.py --checkpoint workdirs/demo/seed0/stage3/export/encoder_flax \
      --train mnist:train --test mnist:val --resize 32 --crop 32 --features all_blocks

Sources: `tfds:DATASET:SPLIT[:DATA_DIR]`, `folder:ROOT`, `mnist:SPLIT`, `synthetic:N`.
Runs on all local devices (and all hosts under jax.distributed).
"""

import argparse
import functools
import json
import os
import sys
import time

# Runs as `python tools/knn_eval.py` from the repository root without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from mim_refiner_jax.convert import checkpoints  # noqa: E402
from mim_refiner_jax.data import loader, sources  # noqa: E402
from mim_refiner_jax.evaluation import features, knn  # noqa: E402
from mim_refiner_jax.models.vit import ViT  # noqa: E402


def source_config(spec: str, image_size: int) -> dict:
  """`tfds:imagenet2012:validation` -> the config dict `sources.make_source` takes."""
  kind, _, rest = spec.partition(":")
  parts = rest.split(":") if rest else []
  if kind == "tfds" and len(parts) in (2, 3):
    cfg = dict(name="tfds", dataset=parts[0], split=parts[1])
    if len(parts) == 3:
      cfg["data_dir"] = parts[2]
    return cfg
  if kind == "folder" and len(parts) == 1:
    return dict(name="image_folder", root=parts[0])
  if kind == "mnist" and len(parts) == 1:
    return dict(name="mnist", split=parts[0], image_size=image_size)
  if kind == "synthetic" and len(parts) == 1:
    return dict(name="synthetic", num_examples=int(parts[0]), image_size=image_size)
  raise ValueError(f"bad source {spec!r}: use tfds:DATASET:SPLIT[:DATA_DIR], folder:ROOT, "
                   "mnist:SPLIT or synthetic:N")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="any format the converter reads")
  parser.add_argument("--train", required=True, help="source of the k-NN bank")
  parser.add_argument("--test", required=True, help="source that is classified")
  parser.add_argument("--features", default="last",
                      help="comma-separated keys (cls, patch_mean, block{i}_cls, "
                           "block{i}_patch_mean, last4_cls), 'last' (last block CLS and mean "
                           "patch, no final norm: the paper's) or 'all_blocks'")
  parser.add_argument("--k", default="10", help="one k or several, comma-separated")
  parser.add_argument("--tau", type=float, default=0.07)
  parser.add_argument("--resize", type=int, default=256)
  parser.add_argument("--crop", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="encoder compute dtype (the paper's k-NN ran in bf16)")
  parser.add_argument("--json", default="", help="also write the results to this file")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads, for timm/MAE files of a width not in the size table")
  args = parser.parse_args(argv)

  start = time.time()
  pretrained = checkpoints.load_pretrained(args.checkpoint, num_heads=args.num_heads)
  info = pretrained.info
  print(f"loaded {args.checkpoint}: format {info['format']}, {info['family']} "
        f"{info['size']}, patch {info['patch_size']}, {pretrained.num_params / 1e6:.1f}M params")
  encoder = ViT(**pretrained.vit_kwargs, dtype=jnp.dtype(args.dtype))
  depth = encoder.depth
  if args.features == "last":
    keys = (f"block{depth - 1}_cls", f"block{depth - 1}_patch_mean")
  elif args.features == "all_blocks":
    keys = tuple(f"block{i}_cls" for i in range(depth)) + ("cls",)
  else:
    keys = tuple(k for k in args.features.split(",") if k)
  apply_fn = functools.partial(encoder.apply, blocks=features.feature_blocks(keys, depth))
  eval_cfg = dict(resize_size=args.resize, crop_size=args.crop)
  feats = {}
  for split, spec in (("train", args.train), ("test", args.test)):
    source = sources.make_source(source_config(spec, args.crop))
    batches, num_steps = loader.make_eval_loader(source, eval_cfg, args.batch_size)
    print(f"{split}: {len(source)} images, {num_steps} batches", flush=True)
    feats[split] = features.extract_features(apply_fn, pretrained.variables, batches,
                                             feature_keys=keys, depth=depth)
  ks = [int(k) for k in args.k.split(",")]
  results = {}
  for key in keys:
    res = knn.knn_accuracy(feats["train"][key], feats["train"]["label"], feats["test"][key],
                           feats["test"]["label"], k=ks if len(ks) > 1 else ks[0], tau=args.tau)
    accs = res["accuracy"] if isinstance(res["accuracy"], dict) else {ks[0]: res["accuracy"]}
    results[key] = {str(k): float(a) for k, a in accs.items()}
    print(f"{key:>22}: " + "  ".join(f"k={k} {100 * a:.2f}%" for k, a in accs.items()))
  print(f"done in {time.time() - start:.1f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"checkpoint": args.checkpoint, "train": args.train, "test": args.test,
                 "tau": args.tau, "accuracy": results}, f, indent=1)
  return results


if __name__ == "__main__":
  main()
