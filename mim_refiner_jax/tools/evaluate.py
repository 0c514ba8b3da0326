r"""Evaluation protocols of the paper on any checkpoint (refiner_facts.md section 10).

Checkpoints: any file the converter reads (MAE .pth, MAWS .pt, data2vec 2.0 .pt, refined .th,
timm, safetensors), a Flax directory (e.g. a run's export/encoder_flax), or a training workdir
(its latest checkpoint: the EMA encoder if it has one, else the trained one; --weights, --step).
Several --checkpoint flags share the per-block plot's axes.

  # The paper's k-NN (last block CLS and mean patch, no final norm) and the per-block curve:
  python tools/evaluate.py --checkpoint weights/maerefined_l16.th --protocols knn,per_block \
      --train tfds:imagenet2012:train --test tfds:imagenet2012:validation --knn-dtype bfloat16
  # The CPU demo's MAE and refined encoder on MNIST (32 px: resize 32, no border cut):
  python tools/evaluate.py --checkpoint workdirs/demo/mae \
      --checkpoint workdirs/demo/seed0/stage3 --train mnist:train --test mnist:val \
      --resize 32 --protocols knn,per_block --k 1,10,20 --out workdirs/demo/evaluation

Protocols: knn, per_block, probe, lowshot, cluster (the last three come from
evaluation/{probe,lowshot,cluster}.py). Sources: the spec strings of data/sources.py,
tfds:DATASET:SPLIT, image_folder:ROOT, mnist:SPLIT, synthetic:N, with options after commas
(tfds:imagenet2012:validation,data_dir=/data/tfds). The eval view resizes the short side and centre-crops to the
checkpoint's resolution (patch size x position grid) unless --image-size is given. Features are
cached (--cache-dir); results go to OUT/results.json (default: WORKDIR/evaluation for a workdir,
else CHECKPOINT.eval/), with TensorBoard scalars "eval/..." in a workdir.
Runs on all local devices (and all hosts under jax.distributed).
"""

import argparse
import sys


from mim_refiner_jax import errors
from mim_refiner_jax.evaluation import suite


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--checkpoint", action="append", required=True,
                 help="checkpoint file, Flax directory or training workdir (repeatable)")
  p.add_argument("--name", action="append", default=None, help="label per --checkpoint")
  p.add_argument("--train", required=True, help="train source (k-NN bank, probe training)")
  p.add_argument("--test", required=True, help="test source")
  p.add_argument("--protocols", default="knn", help=f"comma-separated from {suite.PROTOCOLS}")
  p.add_argument("--features", default="last",
                 help="k-NN feature keys, comma-separated ([block{i}_|last{n}_](cls|patch_mean|"
                      "cls_patch_mean)), 'last' (last block CLS and mean patch, no final norm: "
                      "the paper's) or 'all_blocks'")
  p.add_argument("--k", default="10", help="k values, comma-separated (one similarity pass); "
                 "'mim' = the MIM baselines' 1,2,3,5,10,20,30,50,100,200")
  p.add_argument("--tau", type=float, default=0.07)
  p.add_argument("--knn-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="k-NN similarity dtype (the paper ran bf16)")
  p.add_argument("--per-block-pooling", default="cls",
                 choices=["cls", "patch_mean", "cls_patch_mean"])
  p.add_argument("--per-block-k", type=int, default=10, help="k of the per-block k-NN")
  p.add_argument("--per-block-probe", action="store_true",
                 help="also train the probe grid on every block (slow)")
  p.add_argument("--selective-aggregation", action="store_true",
                 help="probe: also the selective-aggregation probe on the last block's patch "
                      "tokens (holds [N, T, D] features in memory)")
  p.add_argument("--probe-augment", type=int, default=0, metavar="A",
                 help="probe: train on A copies of the train set under the reference's minimal "
                      "augmentation (RandomResizedCrop + flip; epoch e on copy e mod A), each "
                      "extracted and cached once; 0 (default): the no-aug features")
  p.add_argument("--lowshot-features", default="", help="default: last block CLS, no norm")
  p.add_argument("--cluster-features", default="", help="default: last block CLS, no norm")
  p.add_argument("--image-size", type=int, default=0,
                 help="crop size; default the checkpoint's patch size x position grid")
  p.add_argument("--resize", type=int, default=0, help="short side before the centre crop; "
                 "default image size x 256/224")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="encoder compute dtype")
  p.add_argument("--weights", default="auto", choices=["auto", "ema", "live"],
                 help="workdir checkpoints: the EMA or the trained encoder (auto: EMA if any)")
  p.add_argument("--step", type=int, default=None, help="workdir checkpoint step (default last)")
  p.add_argument("--cache-dir", default=None,
                 help=f"feature cache (default WORKDIR/feature_cache or {suite.DEFAULT_CACHE})")
  p.add_argument("--no-cache", action="store_true")
  p.add_argument("--out", default=None, help="output directory for results.json and plots")
  p.add_argument("--verbose", action="store_true", help="tracebacks for input errors too")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def options_from_args(args) -> suite.Options:
  protocols = tuple(p for p in args.protocols.split(",") if p)
  bad = [p for p in protocols if p not in suite.PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f"--protocols: unknown {bad or protocols}; choose from {suite.PROTOCOLS}")
  if args.k == "mim":
    ks = suite.knn_lib.MIM_BASELINE_KS
  else:
    try:
      ks = tuple(int(k) for k in args.k.split(",") if k)
    except ValueError:
      raise ValueError(f"--k: expected integers like 10 or 1,10,20 (or 'mim'), got {args.k!r}") \
          from None
  if not ks or min(ks) < 1:
    raise ValueError(f"--k: need positive integers, got {args.k!r}")
  return suite.Options(
      train=args.train, test=args.test, protocols=protocols, features=args.features, k=ks,
      tau=args.tau, knn_dtype=args.knn_dtype, per_block_pooling=args.per_block_pooling,
      per_block_k=args.per_block_k, per_block_probe=args.per_block_probe,
      selective_aggregation=args.selective_aggregation, probe_augment=args.probe_augment,
      lowshot_features=args.lowshot_features, cluster_features=args.cluster_features,
      image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
      dtype=args.dtype, weights=args.weights, step=args.step,
      cache_dir="" if args.no_cache else args.cache_dir, progress=not args.no_progress)


def main(argv=None):
  args = parse_args(argv)
  if args.name and len(args.name) != len(args.checkpoint):
    sys.exit("error: give one --name per --checkpoint (or none)")

  def run():
    try:
      return _run()
    except ValueError as e:  # the suite's checks of options and keys are user mistakes
      raise errors.UserError(str(e)) from e

  def _run():
    opts = options_from_args(args)
    # The source specs are checked before any checkpoint is loaded.
    for spec in (args.train, args.test):
      suite.dataset_lib.source_config(spec)
    return suite.run(args.checkpoint, opts, names=args.name, out_dir=args.out)

  # User mistakes (UserError, ValueError, missing files): one line, no traceback.
  return errors.run_main(run, verbose=args.verbose)


if __name__ == "__main__":
  main()
