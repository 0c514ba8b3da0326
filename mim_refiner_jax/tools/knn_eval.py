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

Sources are spec strings (mim_refiner_jax/data/sources.py): `tfds:DATASET:SPLIT[,data_dir=DIR]`,
`image_folder:ROOT`, `mnist:SPLIT`, `synthetic:N`, options as `,key=value`; mnist and synthetic
images are made at the crop size unless the spec says image_size=...
Images are resized to --resize and centre-cropped to --crop; both default to the checkpoint's own
size (patch size x position-table grid; resize = crop x 256/224), e.g. 256/224 for a ViT-L/16 and
37/32 for the demo's 32 px model. A request that cannot fit memory is refused with the sizes.
Runs on all local devices (and all hosts under jax.distributed). Bad inputs print one line
(`--verbose` adds the traceback) and exit with status 2.
"""

import argparse
import functools
import json
import time

import jax.numpy as jnp

from mim_refiner_jax import errors
from mim_refiner_jax import paths
from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.data import loader, sources
from mim_refiner_jax.evaluation import features, forward_memory, knn
from mim_refiner_jax.models.vit import ViT


def eval_source(spec: str, image_size: int, flag: str):
  """A source spec; mnist/synthetic images default to the evaluation crop size."""
  try:
    cfg = sources.parse_source_spec(spec)
  except errors.UserError as e:
    raise errors.UserError(f"{flag} {spec}: {e}") from None
  if cfg["name"] in ("mnist", "synthetic"):
    cfg.setdefault("image_size", image_size)
  return sources.make_source(cfg, where=f"{flag} {spec}")


def image_sizes(args, vit_kwargs: dict) -> tuple[int, int]:
  """(resize, crop): the flags, else the checkpoint's own size (crop) and crop x 256/224."""
  native = forward_memory.native_image_size(vit_kwargs)
  crop = args.crop or native
  resize = args.resize or int(round(crop * 256 / 224))
  if resize < crop:
    raise errors.UserError(f"--resize {resize} is smaller than --crop {crop}")
  return resize, crop


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
  parser.add_argument("--resize", type=int, default=0,
                      help="resize the short side to this (default: crop x 256/224)")
  parser.add_argument("--crop", type=int, default=0,
                      help="centre crop (default: the checkpoint's image size)")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="encoder compute dtype (the paper's k-NN ran in bf16)")
  parser.add_argument("--json", default="", help="also write the results to this file")
  parser.add_argument("--num-heads", type=int, default=None,
                      help="attention heads, for timm/MAE files of a width not in the size table")
  parser.add_argument("--verbose", action="store_true", help="tracebacks for input errors too")
  args = parser.parse_args(argv)
  return errors.run_main(lambda: evaluate(args), verbose=args.verbose)


def evaluate(args):

  start = time.time()
  try:
    ks = [int(k) for k in args.k.split(",")]
    if min(ks) < 1:
      raise ValueError(args.k)
  except ValueError:
    raise errors.UserError(f"--k {args.k}: give positive integers, e.g. --k 10 or --k 1,10,20"
                           ) from None
  try:
    pretrained = checkpoints.load_pretrained(args.checkpoint, num_heads=args.num_heads)
  except errors.UserError:
    raise
  except (ValueError, OSError, KeyError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.UserError(f"--checkpoint {args.checkpoint}: {first_line}") from None
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
  try:
    blocks = features.feature_blocks(keys, depth)
  except ValueError as e:
    raise errors.UserError(f"--features {args.features}: {e}") from None
  apply_fn = functools.partial(encoder.apply, blocks=blocks)
  resize, crop = image_sizes(args, pretrained.vit_kwargs)
  native = forward_memory.native_image_size(pretrained.vit_kwargs)
  print(f"images: resize {resize}, crop {crop} px (the checkpoint's size is {native} px)")
  fix = (f"lower --batch-size or --crop (this checkpoint was trained at {native} px)")
  forward_memory.check_forward_fits(pretrained.vit_kwargs, args.batch_size, crop, fix)
  eval_cfg = dict(resize_size=resize, crop_size=crop)
  feats = {}
  split_sources = {split: eval_source(spec, crop, f"--{split}")  # both checked before any work
                   for split, spec in (("train", args.train), ("test", args.test))}
  for split, source in split_sources.items():
    batches, num_steps = loader.make_eval_loader(source, eval_cfg, args.batch_size)
    print(f"{split}: {len(source)} images, {num_steps} batches", flush=True)
    try:
      feats[split] = features.extract_features(apply_fn, pretrained.variables, batches,
                                               feature_keys=keys, depth=depth)
    except Exception as e:  # pylint: disable=broad-except
      if not forward_memory.is_out_of_memory(e):
        raise
      request = forward_memory.describe_request(pretrained.vit_kwargs, args.batch_size, crop)
      raise errors.UserError(f"out of device memory for {request}: {fix}") from None
  results = {}
  for key in keys:
    res = knn.knn_accuracy(feats["train"][key], feats["train"]["label"], feats["test"][key],
                           feats["test"]["label"], k=ks if len(ks) > 1 else ks[0], tau=args.tau)
    accs = res["accuracy"] if isinstance(res["accuracy"], dict) else {ks[0]: res["accuracy"]}
    results[key] = {str(k): float(a) for k, a in accs.items()}
    print(f"{key:>22}: " + "  ".join(f"k={k} {100 * a:.2f}%" for k, a in accs.items()))
  print(f"done in {time.time() - start:.1f} s")
  if args.json:
    paths.as_path(args.json).write_text(json.dumps(  # (a local path or gs://...)
        {"checkpoint": args.checkpoint, "train": args.train, "test": args.test,
         "resize": resize, "crop": crop, "tau": args.tau, "accuracy": results}, indent=1))
  return results


if __name__ == "__main__":
  main()
