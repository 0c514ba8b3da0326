r"""The CPU demo: refine the bundled MNIST MAE with MIM-Refiner and compare it with honest baselines.

  python tools/demo.py                      # seed 0, in workdirs/demo
  python tools/demo.py --seeds 0,1,2        # the README table (three refinement seeds)

The refinement itself is `mim-refiner-refine` (mim_refiner_jax/refine.py) on the shipped MAE and
the digits with mim_refiner_jax/demo_config.py, once per seed in WORKDIR/seed<N> (stage2/, stage3/,
evaluation/, export/, report.html); the demo adds what a comparison needs:
1. Baselines under the one k-NN protocol (k=10, tau=0.07, standardise with train statistics,
   L2-normalise; refiner_facts.md section 10.1; 4,000 train digits -> 1,000 held-out digits):
   raw pixels, and the MAE before refinement with every pooling (CLS and mean patch token of every
   block, raw residual stream; CLS, mean patch and CLS || mean patch after the final LayerNorm).
   The MAE is the one shipped in mim_refiner_jax/data/demo_mae/ (made by tools/pretrain_mae.py with
   the command recorded next to it), so the demo spends no time on pre-training.
2. Per seed, the refine command: memory plan, stage 2, stage 3, its evaluation, exports, report.
3. The same evaluation as 1. of the refined EMA encoder.
Prints the table, writes WORKDIR/runs/<time>.json (one file per run, never overwritten),
WORKDIR/demo_results.json (the latest run) and WORKDIR/knn_per_block.png.

Re-runs reuse finished phases and evaluations (and say so); --fresh retrains the given seeds.
More protocols plug in as entries of PROTOCOLS: each maps (train features, train labels, test
features, test labels) to a number and becomes a column of every feature in the results.
"""

import argparse
import functools
import os
import shutil
import sys
import time

import numpy as np

from mim_refiner_jax import demo_config
from mim_refiner_jax import errors
from mim_refiner_jax import progress as progress_lib
from mim_refiner_jax import refine
from mim_refiner_jax.demo_config import SHIPPED_MAE

# models/heads.py NORMS, spelled out: the demo imports jax only after its first output.
HEAD_NORMS = ("sync_batch", "local_batch", "async_stats", "batch_renorm", "none")
RESULTS_VERSION = 3  # bump when the evaluation changes: cached evaluations are then redone
# Seconds per phase of the default demo on 2 idle cores (a fresh run); the stages' are scaled by
# the epochs asked for, and the ETA scales all of them by the pace this run measures.
NOMINAL_SECONDS = dict(setup=8, baselines=21, stage2=31, stage3=215, evaluate=8)
DIGITS = "mnist:train,image_size=32"  # the refine command's --train (4,000 digits)


# ----------------------------------------------------------------------------- evaluation
def knn_protocol(train_x, train_y, test_x, test_y) -> float:
  """refiner_facts.md section 10.1: standardise (train stats), L2, k=10, tau=0.07 vote."""
  from mim_refiner_jax.evaluation import knn  # pylint: disable=g-import-not-at-top
  return knn.knn_accuracy(train_x, train_y, test_x, test_y, k=10, tau=0.07)["accuracy"]


PROTOCOLS = {"knn": knn_protocol}

# The other protocols of the evaluation suite (mim_refiner_jax/evaluation; refiner_facts.md
# sections 10.2, 10.3) run on the headline features only: the paper's k-NN feature (last block
# CLS, no norm), the MAE's best pooling (CLS || mean patch after the final LN) and the pixels.
# Every feature x every protocol would not fit the demo's minutes.
HEADLINE = ("pixels", "block{last}_cls", "ln_cls+mean")
SUITE_COLUMNS = (("linear probe", "probe"), ("1-shot", "1shot"), ("2-shot", "2shot"),
                 ("5-shot", "5shot"), ("1%", "1percent"), ("k-means ACC", "cluster_acc"),
                 ("k-means NMI", "cluster_nmi"))


def suite_protocols(train_x, train_y, test_x, test_y) -> dict:
  """DINOv2-grid linear probe (best of grid and epochs), 1/2/5-shot and 1% logistic regression
  (mean over 3 split seeds) and k-means of the held-out digits (lowest-inertia run of 10)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from mim_refiner_jax.evaluation import cluster, lowshot, probe
  # One device: the demo's few thousand rows gain nothing from splitting (and on simulated CPU
  # devices the cross-device collectives only cost time).
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
  grid = probe.linear_probe_grid({"f": train_x}, train_y, {"f": test_x}, test_y, mesh=mesh,
                                 progress=False)
  low = lowshot.lowshot_eval(train_x, train_y, test_x, test_y, mesh=mesh,
                             progress=False)["settings"]
  clusters = cluster.clustering_eval(test_x, test_y, mesh=mesh,
                                     progress=False)["lowest_inertia"]
  return dict(probe=grid["best"]["accuracy"], cluster_acc=clusters["acc"],
              cluster_nmi=clusters["nmi"], **{k: v["mean"] for k, v in low.items()})


def load_digits() -> dict:
  """The demo's split: 4,000 train digits (400 per class) and 1,000 held-out (100 per class)."""
  from mim_refiner_jax.data import mnist  # pylint: disable=g-import-not-at-top
  (tx, ty), (vx, vy) = mnist.load_mnist("train"), mnist.load_mnist("val")
  return dict(train=tx, train_y=ty, test=vx, test_y=vy)


def pixel_features(images: np.ndarray) -> dict:
  """Raw 28x28 grey pixels, flattened: the baseline every representation has to beat."""
  return {"pixels": images.reshape(len(images), -1).astype(np.float32)}


@functools.cache
def _forward(vit_kwargs_items: tuple):
  """One jitted feature function per architecture (compiled once per shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.data import multicrop  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  encoder = ViT(**dict(vit_kwargs_items))
  blocks = tuple(range(encoder.depth))
  mean, std = np.array(multicrop.IMAGENET_MEAN), np.array(multicrop.IMAGENET_STD)

  @jax.jit
  def forward(variables, images_uint8):
    x = (images_uint8.astype(jnp.float32) / 255.0 - mean) / std  # as the train/eval loaders
    _, aux = encoder.apply(variables, x, blocks=blocks)
    feats = {}
    for i in blocks:  # raw residual stream of every block (no norm)
      feats[f"block{i}_cls"] = aux["block_cls"][i]
      feats[f"block{i}_mean"] = aux["block_patch_mean"][i]
    feats["ln_cls"], feats["ln_mean"] = aux["cls"], aux["patch_mean"]  # after the final LN
    return feats
  return forward


def encoder_features(pretrained, images: np.ndarray, batch_size: int = 500) -> dict:
  """Every pooling of every block of a `convert.checkpoints.Pretrained` encoder, as numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.data import mnist  # pylint: disable=g-import-not-at-top
  forward = _forward(tuple(sorted(pretrained.vit_kwargs.items())))
  image_size = pretrained.vit_kwargs["pos_grid"] * pretrained.vit_kwargs["patch_size"]
  rgb = mnist.to_rgb(images, image_size)
  out = []
  for start in range(0, len(rgb), batch_size):
    chunk = rgb[start:start + batch_size]
    pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)  # one shape
    feats = forward(pretrained.variables, np.concatenate([chunk, pad]))
    out.append({k: np.asarray(v)[:len(chunk)] for k, v in jax.device_get(feats).items()})
  feats = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
  depth = pretrained.vit_kwargs["depth"]
  for prefix in [f"block{i}" for i in range(depth)] + ["ln"]:  # CLS || mean patch token
    feats[f"{prefix}_cls+mean"] = np.concatenate([feats[f"{prefix}_cls"],
                                                  feats[f"{prefix}_mean"]], axis=1)
  return feats


def evaluate(extract, digits: dict, protocols=None) -> dict:
  """Evaluates a feature extractor: `{feature name: {protocol: value}}`.

  `extract(images uint8 [N, 28, 28]) -> {name: [N, D] features}`, fit on the train digits and
  scored on the held-out ones by every protocol.
  """
  protocols = PROTOCOLS if protocols is None else protocols
  train, test = extract(digits["train"]), extract(digits["test"])
  labels = digits["train_y"], digits["test_y"]
  results = {name: {p: float(fn(train[name], labels[0], test[name], labels[1]))
                    for p, fn in protocols.items()} for name in train}
  depth = sum(name.endswith("_cls") and name.startswith("block") for name in train)
  for name in (h.format(last=depth - 1) for h in HEADLINE):
    if name in train:
      results[name].update(suite_protocols(train[name], labels[0], test[name], labels[1]))
  return results


# ----------------------------------------------------------------------------- stages
def portable(path: str) -> str:
  """The shipped MAE as its path inside the package (results files are copied to docs/ and must
  not name this machine's folders); any other file as given."""
  above_package = os.path.dirname(os.path.dirname(os.path.abspath(demo_config.__file__)))
  full = os.path.abspath(path)
  return os.path.relpath(full, above_package) if full == SHIPPED_MAE else path


def refine_argv(seed: int, args, workdir: str) -> list[str]:
  """The refine command of one seed: the shipped MAE (or --mae) on the digits, the demo config."""
  argv = ["--pretrained", args.mae, "--train", DIGITS, "--workdir",
          os.path.join(workdir, f"seed{seed}"),
          "--config", f"{os.path.abspath(demo_config.__file__)}:seed={seed}",
          "--config.log_every_steps=5"]
  for stage, epochs in ((2, args.stage2_epochs), (3, args.stage3_epochs)):
    if epochs:
      warmup = min(demo_config.get_config(f"stage={stage}").warmup_epochs, epochs / 2)
      argv += [f"--stage{stage}.num_epochs={float(epochs)}",
               f"--stage{stage}.warmup_epochs={float(warmup)}"]
  if args.batch_size:
    argv.append(f"--config.batch_size={args.batch_size}")
  if args.head_norm != "sync_batch":
    argv.append(f"--config.heads.norm={args.head_norm}")
  return argv


def cached_evaluation(path: str, key: dict, compute, progress: progress_lib.Progress, what: str):
  cached = refine.read_json(path)
  if cached and cached.get("key") == key:
    progress.skip(key["phase"])
    progress.say(f"reusing the evaluation of {what} from {path}")
    return cached["results"], dict(seconds=cached["seconds"], reused=True)
  with progress.phase(key["phase"], f"evaluating {what}"):
    start = time.time()
    results = compute()
    seconds = time.time() - start
  refine.write_json(path, {"key": key, "results": results, "seconds": seconds})
  return results, dict(seconds=seconds, reused=False)


# ----------------------------------------------------------------------------- report
COLUMNS = (("CLS last", "block{last}_cls"), ("CLS LN", "ln_cls"), ("mean LN", "ln_mean"),
           ("CLS|mean LN", "ln_cls+mean"))


def best_feature(results: dict, protocol: str = "knn") -> tuple[float, str]:
  return max((v[protocol], k) for k, v in results.items())


def table(results: dict, depth: int, protocol: str = "knn") -> str:
  cols = [(title, key.format(last=depth - 1)) for title, key in COLUMNS]
  n_test = results["test_size"]
  lines = [f"{protocol} accuracy (%) on {n_test:,} held-out MNIST digits ({results['protocol']})",
           f"{'features':<22}" + "".join(f"{t:>12}" for t, _ in cols) + f"{'best':>8}  (where)",
           f"{'raw pixels':<22}" + f"{100 * results['pixels']['pixels'][protocol]:>12.1f}"
           + " " * (12 * (len(cols) - 1)) + f"{100 * results['pixels']['pixels'][protocol]:>8.1f}"]

  def row(name, res):
    value, where = best_feature(res, protocol)
    return (f"{name:<22}" + "".join(f"{100 * res[k][protocol]:>12.1f}" for _, k in cols)
            + f"{100 * value:>8.1f}  ({where})")
  lines.append(row("MAE (before)", results["mae"]))
  for seed, res in results["refined"].items():
    lines.append(row(f"refined, seed {seed}", res))
  if len(results["refined"]) > 1:
    runs = list(results["refined"].values())
    mean_std = lambda k: (100 * np.mean([r[k][protocol] for r in runs]),
                          100 * np.std([r[k][protocol] for r in runs]))
    cells = "".join(f"{'%.1f+-%.1f' % mean_std(k):>12}" for _, k in cols)
    best = [100 * best_feature(r, protocol)[0] for r in runs]
    lines.append(f"{'refined, mean+-std':<22}" + cells
                 + f"{'%.1f+-%.1f' % (np.mean(best), np.std(best)):>11}")
  return "\n".join(lines)


def suite_table(results: dict, depth: int) -> str:
  """The other protocols on the headline features (mean+-std over refinement seeds)."""
  lines = [f"other protocols (%) on the headline features, {results['test_size']:,} held-out "
           "digits: linear probe (DINOv2 grid), low-shot logistic regression (mean of 3 splits), "
           "k-means (best of 10)",
           f"{'features':<34}" + "".join(f"{t:>13}" for t, _ in SUITE_COLUMNS)]
  runs = list(results["refined"].values())
  for feature in (h.format(last=depth - 1) for h in HEADLINE):
    rows = [("raw pixels", [results["pixels"]])] if feature == "pixels" else [
        (f"MAE (before), {feature}", [results["mae"]]),
        (f"refined x{len(runs)}, {feature}", runs)]
    for name, res in rows:
      if not res or not all(key in r.get(feature, {}) for r in res for _, key in SUITE_COLUMNS):
        continue
      cells = []
      for _, key in SUITE_COLUMNS:
        values = [100 * r[feature][key] for r in res]
        cells.append(f"{np.mean(values):.1f}" + (f"+-{np.std(values):.1f}" if len(res) > 1
                                                 else ""))
      lines.append(f"{name:<34}" + "".join(f"{c:>13}" for c in cells))
  return "\n".join(lines)


def plot(results: dict, depth: int, path: str, protocol: str = "knn"):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  x = np.arange(depth + 1)  # blocks 0..depth-1, then the main output after the final LN
  keys = lambda pool: [f"block{i}_{pool}" for i in range(depth)] + [f"ln_{pool}"]
  styles = {"cls": ("o", "-"), "mean": ("s", "--"), "cls+mean": ("^", ":")}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  pixels = 100 * results["pixels"]["pixels"][protocol]
  ax.axhline(pixels, color="black", lw=1, ls="-.", label=f"raw pixels ({pixels:.1f}%)")
  runs = list(results["refined"].values())
  for pool, (marker, ls) in styles.items():
    ax.plot(x, [100 * results["mae"][k][protocol] for k in keys(pool)], marker=marker, ls=ls,
            color="tab:gray", label=f"MAE, {pool}")
    if runs:
      values = 100 * np.array([[r[k][protocol] for k in keys(pool)] for r in runs])
      ax.errorbar(x, values.mean(0), yerr=values.std(0) if len(runs) > 1 else None,
                  marker=marker, ls=ls, color="tab:blue", capsize=3,
                  label=f"refined, {pool}" + (f" (mean+-std, {len(runs)} seeds)"
                                               if len(runs) > 1 else ""))
  ax.set_xticks(x, [str(i) for i in range(depth)] + ["final LN"])
  ax.set_xlabel("block (raw residual stream) / main output")
  name = {"knn": "k-NN (k=10)"}.get(protocol, protocol)
  ax.set_ylabel(f"{name} accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"MNIST {name} on {results['test_size']:,} held-out digits,\n"
               f"fit on {results['train_size']:,}: MAE vs MIM-Refiner", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default=os.path.join("workdirs", "demo"))
  parser.add_argument("--seeds", default="0", help="refinement seeds, comma-separated")
  parser.add_argument("--mae", default=SHIPPED_MAE,
                      help="the MAE to refine (any checkpoint init.pretrained reads); default: the "
                           "shipped one")
  parser.add_argument("--stage2-epochs", type=float, default=0,
                      help="0: mim_refiner_jax/demo_config.py's default")
  parser.add_argument("--stage3-epochs", type=float, default=0,
                      help="0: mim_refiner_jax/demo_config.py's default")
  parser.add_argument("--batch-size", type=int, default=0, help="0: mim_refiner_jax/demo_config.py's default")
  parser.add_argument("--head-norm", default="sync_batch", choices=HEAD_NORMS,
                      help="the ID heads' BatchNorm statistics (models/heads.py); sync_batch is "
                           "the reference's")
  parser.add_argument("--fresh", action="store_true",
                      help="retrain the stages of these seeds and redo every evaluation")
  args = parser.parse_args(argv)
  try:
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2")
  if not args.seed_list:
    parser.error("--seeds is empty")
  for flag, value in (("--stage2-epochs", args.stage2_epochs),
                      ("--stage3-epochs", args.stage3_epochs), ("--batch-size", args.batch_size)):
    if value < 0:
      parser.error(f"{flag} must be positive (0: the default), got {value:g}")
  if not os.path.exists(args.mae):
    parser.error(f"--mae {args.mae} does not exist (the shipped MAE is regenerated by the command "
                 "in mim_refiner_jax/data/demo_mae/mae_mnist.json)")
  return args


def main(argv=None):
  args = parse_args(argv)
  # A user's mistake met midway (a damaged --mae, a batch the trainer rejects) is one line.
  try:
    return errors.run_main(functools.partial(run, args, sys.argv[1:] if argv is None else argv))
  except refine.Stopped as e:
    print(f"stopped: {e}", flush=True)
    return 0  # as the trainer after Ctrl-C: nothing lost, nothing failed


def run(args, argv: list[str]) -> dict:
  workdir = os.path.abspath(args.workdir)
  if args.fresh:
    for seed in args.seed_list:
      shutil.rmtree(os.path.join(workdir, f"seed{seed}"), ignore_errors=True)
    for name in ("baselines.json",):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
  stamp = time.strftime("%Y%m%d-%H%M%S")
  plan = [("setup", NOMINAL_SECONDS["setup"]),  # phase names are unique, for the ETA
          ("baselines", NOMINAL_SECONDS["baselines"])]
  scale = {stage: (epochs / demo_config.get_config(f"stage={stage}").num_epochs if epochs else 1.0)
           for stage, epochs in ((2, args.stage2_epochs), (3, args.stage3_epochs))}
  for seed in args.seed_list:  # the refine command's phases, then the demo's own evaluation
    plan += [(f"seed{seed} setup", 1), (f"seed{seed} plan", refine.NOMINAL["plan"]),
             (f"seed{seed} stage2", NOMINAL_SECONDS["stage2"] * scale[2]),
             (f"seed{seed} stage3", NOMINAL_SECONDS["stage3"] * scale[3]),
             (f"seed{seed} evaluate", refine.NOMINAL["evaluate"]),
             (f"seed{seed} export", refine.NOMINAL["export"]),
             (f"seed{seed} report", refine.NOMINAL["report"]),
             (f"seed{seed} evaluation", NOMINAL_SECONDS["evaluate"])]

  with progress_lib.Progress(plan, label="demo") as progress:
    start, cpu_start = time.time(), time.process_time()
    with progress.phase("setup", f"loading the MAE to refine ({args.mae}) and the digits; "
                        f"workdir {workdir}"):
      from mim_refiner_jax import train  # pylint: disable=g-import-not-at-top
      from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
      mae_sha = refine.sha256(args.mae) if os.path.isfile(args.mae) else os.path.abspath(args.mae)
      mae = train.load_pretrained(args.mae, setting="--mae")
      depth = mae.vit_kwargs["depth"]
      digits = load_digits()
    results = {"protocol": "k=10, tau=0.07, standardise with train statistics, L2-normalise",
               "train_size": len(digits["train"]), "test_size": len(digits["test"]),
               "mae_checkpoint": {"path": portable(args.mae), "sha256": mae_sha},
               "refined": {}, "times": {}, "command": "python tools/demo.py " + " ".join(argv),
               "started": stamp, "load_avg_start": os.getloadavg()}

    def baselines():
      return {"pixels": evaluate(pixel_features, digits),
              "mae": evaluate(lambda im: encoder_features(mae, im), digits)}
    base, results["times"]["baselines"] = cached_evaluation(
        os.path.join(workdir, "baselines.json"),
        {"phase": "baselines", "mae": mae_sha, "version": RESULTS_VERSION}, baselines, progress,
        "raw pixels and the MAE before refinement (every block and pooling)")
    results.update(base)

    for seed in args.seed_list:
      refine_args = refine.parse_args(refine_argv(seed, args, workdir))
      refined_run = refine.run(refine_args, progress, prefix=f"seed{seed} ")
      phases = refined_run["phases"]
      times = {f"stage{s}": phases[f"stage{s}"] for s in (2, 3)}
      s3 = os.path.join(workdir, f"seed{seed}", "stage3")
      refined = checkpoints.load_flax(os.path.join(s3, "export", "encoder_flax"))
      res, times["evaluate"] = cached_evaluation(
          os.path.join(s3, "demo_eval.json"),
          {"phase": f"seed{seed} evaluation", "stage3_finished": times["stage3"]["finished"],
           "version": RESULTS_VERSION},
          lambda: evaluate(lambda im: encoder_features(refined, im), digits), progress,
          f"the refined model of seed {seed}")
      results["refined"][str(seed)] = res
      results["times"][f"seed{seed}"] = times
      results.setdefault("reports", {})[str(seed)] = os.path.relpath(  # (runs/*.json travel)
          refined_run["report"]["html"], workdir)
    results["times"]["this_run_sec"] = time.time() - start
    # CPU seconds of all threads: on an idle 2-core machine the wall time is between this / 2
    # and this, whatever the load during the run was.
    results["times"]["this_run_cpu_sec"] = time.process_time() - cpu_start
    results["load_avg_end"] = os.getloadavg()

  for protocol in PROTOCOLS:
    print()
    print(table(results, depth, protocol))
  print()
  print(suite_table(results, depth))
  reused = [name for name, t in [("baselines", results["times"]["baselines"])] + [
      (f"seed {seed} {part}", t) for seed in args.seed_list
      for part, t in results["times"][f"seed{seed}"].items()] if t["reused"]]
  print(f"this run: {results['times']['this_run_sec']:.0f}s "
        f"({results['times']['this_run_cpu_sec']:.0f} CPU-s; load average "
        f"{results['load_avg_start'][0]:.1f} at the start)"
        + (f"; reused from earlier runs: {', '.join(reused)}" if reused else ""))
  run_file = os.path.join(workdir, "runs", f"{stamp}.json")
  refine.write_json(run_file, results)
  refine.write_json(os.path.join(workdir, "demo_results.json"), results)
  plot(results, depth, os.path.join(workdir, "knn_per_block.png"))
  print(f"wrote {run_file} (this run), {workdir}/demo_results.json (latest) and "
        f"{workdir}/knn_per_block.png; the refine reports: "
        + ", ".join(os.path.join(workdir, r) for r in results["reports"].values()))
  return results


if __name__ == "__main__":
  main()
