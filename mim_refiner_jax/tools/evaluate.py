r"""Evaluation protocols of the paper on any checkpoint (refiner_facts.md section 10).

Checkpoints: any file the converter reads (MAE .pth, MAWS .pt, data2vec 2.0 .pt, refined .th,
timm, safetensors), a Flax directory (e.g. a run's export/encoder_flax), or a training workdir
(its latest checkpoint: the EMA encoder if it has one, else the trained one; --weights, --step).
Several --checkpoint flags share the per-block plot's axes.

  # The paper's settings for every protocol (--preset paper; README "Evaluation") on a refined
  # checkpoint of the official layout and an ImageNet folder:
  python tools/evaluate.py --checkpoint weights/maerefined_l16.th --preset paper \
      --protocols knn,probe,lowshot,cluster \
      --train image_folder:/data/imagenet/train --test image_folder:/data/imagenet/val \
      --out eval/maerefined_l16
  # The CPU demo's MAE and refined encoder on MNIST (a workdir is seen at its monitor's view):
  python tools/evaluate.py --checkpoint workdirs/demo/mae \
      --checkpoint workdirs/demo/seed0/stage3 --train mnist:train --test mnist:val \
      --resize 32 --protocols knn,per_block --k 1,10,20 --out workdirs/demo/evaluation

Protocols: knn, per_block, probe, lowshot, cluster (the last three come from
evaluation/{probe,lowshot,cluster}.py). Sources: the spec strings of data/sources.py,
tfds:DATASET:SPLIT, image_folder:ROOT, mnist:SPLIT, synthetic:N, with options after commas
(tfds:imagenet2012:validation,data_dir=/data/tfds). The eval view resizes the short side and centre-crops to the
checkpoint's resolution (patch size x position grid) unless --image-size is given; a training
workdir is evaluated at its k-NN monitor's view (config.evals.knn), the view is printed. Features
are cached in one place (--cache-dir, default ~/.cache/mim_refiner_jax/features or
$MIM_REFINER_CACHE; --no-cache); results go to OUT/results.json (default: WORKDIR/evaluation for a
workdir, with TensorBoard scalars "eval/..." there, else CHECKPOINT.eval/). With --out nothing is
written next to the checkpoint unless --tensorboard. Accuracies, NMI/AMI/ARI and silhouette print
in percent; Davies-Bouldin raw.
Runs on all local devices (and all hosts under jax.distributed).
"""

import argparse
import sys


from mim_refiner_jax import errors
from mim_refiner_jax.evaluation import presets
from mim_refiner_jax.evaluation import suite


def _ints(text: str, flag: str) -> tuple:
  try:
    values = tuple(int(x) for x in text.split(",") if x)
  except ValueError:
    raise ValueError(f"{flag}: expected integers like 10 or 1,10,20, got {text!r}") from None
  if not values or min(values) < 0:
    raise ValueError(f"{flag}: need non-negative integers, got {text!r}")
  return values


def _floats(text: str, flag: str) -> tuple:
  try:
    values = tuple(float(x) for x in text.split(",") if x)
  except ValueError:
    raise ValueError(f"{flag}: expected numbers like 0.01,0.1, got {text!r}") from None
  if not values or min(values) <= 0:
    raise ValueError(f"{flag}: need positive numbers, got {text!r}")
  return values


def _preset_help(setting: str) -> str:
  default, paper, source = presets.TABLE[setting]
  show = lambda v: ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) \
      if isinstance(v, tuple) else (repr(v) if v != "" else "none")
  return f"[default {show(default)}; paper {show(paper)}: {source}]"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--checkpoint", action="append", required=True,
                 help="checkpoint file, Flax directory or training workdir (repeatable)")
  p.add_argument("--name", action="append", default=None, help="label per --checkpoint")
  p.add_argument("--train", required=True, help="train source (k-NN bank, probe training)")
  p.add_argument("--test", required=True, help="test source")
  p.add_argument("--protocols", default="knn", help=f"comma-separated from {suite.PROTOCOLS}")
  p.add_argument("--preset", default="default", choices=presets.PRESET_NAMES,
                 help="every protocol setting below at once: 'default' (fast) or 'paper' (the "
                      "paper's runs); any flag below overrides its value")
  g = p.add_argument_group("preset settings (default: the --preset's value)")
  g.add_argument("--features", default=None,
                 help="k-NN feature keys, comma-separated ([block{i}_|last{n}_](cls|patch_mean|"
                      "cls_patch_mean)), 'last' (last block CLS and mean patch, no final norm: "
                      "the paper's) or 'all_blocks' " + _preset_help("features"))
  g.add_argument("--k", default=None, help="k values, comma-separated (one similarity pass); "
                 "'mim' = the MIM baselines' 1,2,3,5,10,20,30,50,100,200 " + _preset_help("k"))
  g.add_argument("--tau", type=float, default=None, help=_preset_help("tau"))
  g.add_argument("--knn-dtype", default=None, choices=["float32", "bfloat16"],
                 help="k-NN similarity dtype " + _preset_help("knn_dtype"))
  g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="encoder compute dtype of the cached features " + _preset_help("dtype"))
  g.add_argument("--probe-lrs", default=None, help="probe base LRs (x batch/256), comma-"
                 "separated " + _preset_help("probe_lrs"))
  g.add_argument("--probe-last4-pooling", default=None, choices=["reference", "dinov2"],
                 help="the last-4 CLS || patch input: the reference's 4 CLS + 4 mean patch, or "
                      "DINOv2's 4 CLS + the last mean patch " + _preset_help("probe_last4_pooling"))
  g.add_argument("--probe-epochs", type=int, default=None, help=_preset_help("probe_epochs"))
  g.add_argument("--probe-batch-size", type=int, default=None,
                 help=_preset_help("probe_batch_size"))
  g.add_argument("--probe-augmentation", default=None, choices=["none", "copies", "fresh"],
                 help="none: cached no-aug features; copies: --probe-augment A fixed augmented "
                      "copies; fresh: a new RandomResizedCrop + flip view every epoch, extracted "
                      "on the fly on all devices " + _preset_help("probe_augmentation"))
  g.add_argument("--probe-dtype", default=None, choices=["float32", "bfloat16"],
                 help="encoder dtype of the fresh-augmentation probe " +
                      _preset_help("probe_dtype"))
  g.add_argument("--lowshot-shots", default=None, help=_preset_help("lowshot_shots"))
  g.add_argument("--lowshot-percents", default=None, help=_preset_help("lowshot_percents"))
  g.add_argument("--lowshot-seeds", default=None, help="split seeds when no split files; their "
                 "number is the number of splits " + _preset_help("lowshot_seeds"))
  g.add_argument("--lowshot-split-dir", default=None,
                 help="MSN split files (imagenet_subsets1..3/{1,2,5}imgs_class.txt, "
                      "1percent.txt), read instead of seeded splits " +
                      _preset_help("lowshot_split_dir"))
  g.add_argument("--cluster-algorithm", default=None, choices=["lloyd", "minibatch"],
                 help=_preset_help("cluster_algorithm"))
  g.add_argument("--cluster-restarts", type=int, default=None,
                 help=_preset_help("cluster_restarts"))
  g.add_argument("--separation-sample", type=int, default=None,
                 help="silhouette / Davies-Bouldin of the true classes on at most this many "
                      "rows " + _preset_help("separation_sample"))
  p.add_argument("--per-block-pooling", default="cls",
                 choices=["cls", "patch_mean", "cls_patch_mean"])
  p.add_argument("--per-block-k", type=int, default=10, help="k of the per-block k-NN")
  p.add_argument("--per-block-probe", action="store_true",
                 help="also train the probe grid on every block (slow)")
  p.add_argument("--selective-aggregation", action="store_true",
                 help="probe: also the selective-aggregation probe on the last block's patch "
                      "tokens (holds [N, T, D] features in memory)")
  p.add_argument("--probe-augment", type=int, default=0, metavar="A",
                 help="--probe-augmentation copies: the number of fixed augmented copies of the "
                      "train set (epoch e on copy e mod A), each extracted and cached once")
  p.add_argument("--lowshot-features", default="", help="default: last block CLS, no norm")
  p.add_argument("--cluster-features", default="", help="default: last block CLS, no norm")
  p.add_argument("--image-size", type=int, default=0,
                 help="crop size; default a workdir's k-NN monitor crop, else the checkpoint's "
                      "patch size x position grid")
  p.add_argument("--resize", type=int, default=0, help="short side before the centre crop; "
                 "default a workdir's k-NN monitor resize, else image size x 256/224")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--allow-label-mismatch", action="store_true",
                 help="evaluate even when the test set has classes the train set lacks")
  p.add_argument("--weights", default="auto", choices=["auto", "ema", "live"],
                 help="workdir checkpoints: the EMA or the trained encoder (auto: EMA if any)")
  p.add_argument("--step", type=int, default=None, help="workdir checkpoint step (default last)")
  p.add_argument("--cache-dir", default=None,
                 help=f"feature cache (default {suite.DEFAULT_CACHE}, or $MIM_REFINER_CACHE)")
  p.add_argument("--no-cache", action="store_true")
  p.add_argument("--out", default=None, help="output directory for results.json and plots "
                 "(default WORKDIR/evaluation or CHECKPOINT.eval); with --out nothing is written "
                 "into a workdir unless --tensorboard")
  p.add_argument("--tensorboard", action="store_true",
                 help="also write the scalars into a workdir checkpoint's TensorBoard events")
  p.add_argument("--verbose", action="store_true", help="tracebacks for input errors too")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def options_from_args(args) -> suite.Options:
  protocols = tuple(p for p in args.protocols.split(",") if p)
  bad = [p for p in protocols if p not in suite.PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f"--protocols: unknown {bad or protocols}; choose from {suite.PROTOCOLS}")
  overrides = {}
  if args.k is not None:
    overrides["k"] = suite.knn_lib.MIM_BASELINE_KS if args.k == "mim" else _ints(args.k, "--k")
    if min(overrides["k"]) < 1:
      raise ValueError(f"--k: need positive integers, got {args.k!r}")
  parsers = dict(features=str, tau=float, knn_dtype=str, dtype=str,
                 probe_lrs=lambda t: _floats(t, "--probe-lrs"), probe_last4_pooling=str,
                 probe_epochs=int, probe_batch_size=int, probe_augmentation=str, probe_dtype=str,
                 lowshot_shots=lambda t: _ints(t, "--lowshot-shots"),
                 lowshot_percents=lambda t: _floats(t, "--lowshot-percents"),
                 lowshot_seeds=lambda t: _ints(t, "--lowshot-seeds"), lowshot_split_dir=str,
                 cluster_algorithm=str, cluster_restarts=int, separation_sample=int)
  for name, parse in parsers.items():
    value = getattr(args, name)
    if value is not None:
      overrides[name] = parse(value)
  if args.probe_augment and "probe_augmentation" not in overrides:
    overrides["probe_augmentation"] = "copies"  # --probe-augment A alone, as before
  return suite.Options.from_preset(
      args.preset, train=args.train, test=args.test, protocols=protocols,
      per_block_pooling=args.per_block_pooling, per_block_k=args.per_block_k,
      per_block_probe=args.per_block_probe, selective_aggregation=args.selective_aggregation,
      probe_augment=args.probe_augment, lowshot_features=args.lowshot_features,
      cluster_features=args.cluster_features, image_size=args.image_size, resize=args.resize,
      batch_size=args.batch_size, weights=args.weights, step=args.step,
      cache_dir="" if args.no_cache else args.cache_dir,
      allow_label_mismatch=args.allow_label_mismatch, progress=not args.no_progress, **overrides)


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
    return suite.run(args.checkpoint, opts, names=args.name, out_dir=args.out,
                     tensorboard=True if args.tensorboard else None)

  # User mistakes (UserError, ValueError, missing files): one line, no traceback.
  return errors.run_main(run, verbose=args.verbose)


if __name__ == "__main__":
  main()
