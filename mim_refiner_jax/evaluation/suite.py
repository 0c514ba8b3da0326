"""Every evaluation protocol on any checkpoint: the logic behind tools/evaluate.py.

Protocols (refiner_facts.md section 10; names as on the command line):
  knn        weighted k-NN, several k from one similarity pass (10.1); default features are the
             paper's: the last block's CLS and mean patch token without the final norm.
  per_block  k-NN (optionally also the probe grid) of every block: JSON + PNG (Fig. 3b).
  probe      DINOv2 linear-probe grid (10.2) on {last1_cls, last1_cls+patch, last4_cls,
             last4_cls+patch}; "last 1" includes the final norm, "last 4" is raw; optionally the
             selective-aggregation probe on the last block's patch tokens (beyond_cls_facts 1-2).
  lowshot    1/2/5-shot and 1% logistic regression on the last block's CLS, no norm (10.3).
  cluster    k-means clustering metrics on the test split (10.3).
probe / lowshot / cluster live in evaluation/{probe,lowshot,cluster}.py and are imported only when
asked for. For each checkpoint, the features every chosen protocol needs are extracted in one pass
per split (dataset_features), cached on disk and shared.
"""

import dataclasses
import json
import os
import time

import numpy as np

from mim_refiner_jax import paths as paths_lib
from mim_refiner_jax.evaluation import dataset_features as dataset_lib
from mim_refiner_jax.evaluation import encoders as encoders_lib
from mim_refiner_jax.evaluation import knn as knn_lib
from mim_refiner_jax.evaluation import per_block as per_block_lib

PROTOCOLS = ("knn", "per_block", "probe", "lowshot", "cluster")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mim_refiner_jax", "features")


@dataclasses.dataclass
class Options:
  train: str                       # source specs (dataset_features.source_config)
  test: str
  protocols: tuple = ("knn",)
  features: str = "last"           # knn keys: "last" (the paper's), "all_blocks" or key,key,...
  k: tuple = (knn_lib.DEFAULT_K,)
  tau: float = knn_lib.DEFAULT_TAU
  knn_dtype: str = "float32"       # similarity dtype; "bfloat16" as the paper's runs
  per_block_pooling: str = "cls"
  per_block_k: int = knn_lib.DEFAULT_K
  per_block_probe: bool = False
  selective_aggregation: bool = False
  # > 0: the probe trains on this many copies of the train set under the reference's minimal
  # augmentation (RandomResizedCrop + flip, section 9 train_minaug; epoch e on copy e mod A), each
  # extracted (and cached) once; 0: on the no-aug features, as cached-feature probes do.
  probe_augment: int = 0
  lowshot_features: str = ""       # "" = last block CLS, no norm (section 10.3)
  cluster_features: str = ""       # "" = last block CLS, no norm
  image_size: int = 0              # 0 = the checkpoint's patch size x position grid
  resize: int = 0                  # 0 = image_size * 256 / 224
  batch_size: int = 256
  dtype: str = "float32"           # encoder compute dtype
  weights: str = "auto"            # workdir: ema / live
  step: int | None = None
  cache_dir: str | None = None     # None: WORKDIR/feature_cache or ~/.cache/...; "" = off
  progress: bool = True
  probe_kwargs: dict = dataclasses.field(default_factory=dict)
  lowshot_kwargs: dict = dataclasses.field(default_factory=dict)
  cluster_kwargs: dict = dataclasses.field(default_factory=dict)


PROBE_FEATURES = {  # probe feature-set name -> feature key (section 10.2)
    "last1_cls": "cls", "last1_cls+patch": "cls_patch_mean",
    "last4_cls": "last4_cls", "last4_cls+patch": "last4_cls_patch_mean"}


def knn_keys(spec: str, depth: int) -> tuple[str, ...]:
  if spec == "last":
    return (f"block{depth - 1}_cls", f"block{depth - 1}_patch_mean")
  if spec == "all_blocks":
    return per_block_lib.block_keys(depth, "cls")
  return tuple(k for k in spec.split(",") if k)


def probe_sets(depth: int) -> dict:
  n = min(4, depth)
  return {name.replace("last4", f"last{n}"): key.replace("last4", f"last{n}")
          for name, key in PROBE_FEATURES.items()}


def needed_keys(opts: Options, depth: int) -> tuple[set, set]:
  """(train keys, test keys) the chosen protocols read."""
  last_cls = f"block{depth - 1}_cls"
  train, test = set(), set()
  for p in opts.protocols:
    if p == "knn":
      keys = set(knn_keys(opts.features, depth))
      if any(key.endswith("patch_tokens") for key in keys):
        raise ValueError("k-NN needs one vector per image: patch_tokens keys are for the "
                         "selective-aggregation probe (--protocols probe --selective-aggregation)")
    elif p == "per_block":
      keys = set(per_block_lib.block_keys(depth, opts.per_block_pooling))
    elif p == "probe":
      keys = set(probe_sets(depth).values())
      if opts.selective_aggregation:
        keys.add(f"block{depth - 1}_patch_tokens")
    elif p == "lowshot":
      keys = {opts.lowshot_features or last_cls}
    elif p == "cluster":
      test.add(opts.cluster_features or last_cls)
      continue
    else:
      raise ValueError(f"unknown protocol {p!r}; choose from {PROTOCOLS}")
    train |= keys
    test |= keys
  return train, test


def default_out_dir(path: str) -> str:
  path = paths_lib.resolve(path)  # gs://... stays a URL
  if encoders_lib.is_workdir(path):
    return paths_lib.join(path, "evaluation")
  return path.rstrip("/") + ".eval"


def _run_knn(opts, train, test, depth, mesh) -> dict:
  out = {}
  for key in knn_keys(opts.features, depth):
    res = knn_lib.knn_accuracy(train[key], train["label"], test[key], test["label"],
                               k=tuple(opts.k), tau=opts.tau, mesh=mesh,
                               similarity_dtype=opts.knn_dtype)
    out[key] = {str(k): float(a) for k, a in res["accuracy"].items()}
  return out


def evaluate_checkpoint(path: str, opts: Options, mesh=None, log=print) -> dict:
  """Runs the chosen protocols on one checkpoint; returns its results dict."""
  encoder = encoders_lib.load_encoder(path, weights=opts.weights, step=opts.step)
  depth = encoder.vit_kwargs["depth"]
  image_size = opts.image_size or encoder.image_size
  transform = dataset_lib.eval_transform(image_size, opts.resize or None)
  cache_dir = opts.cache_dir
  if cache_dir is None:
    cache_dir = (paths_lib.join(encoder.identity["path"], "feature_cache")
                 if encoders_lib.is_workdir(encoder.identity["path"]) else DEFAULT_CACHE)
  log(f"{encoder.description}: depth {depth}, eval view {transform}")
  train_keys, test_keys = needed_keys(opts, depth)
  def extract(split, spec, keys, view):
    start = time.time()
    out = dataset_lib.dataset_features(
        encoder, dataset_lib.source_config(spec, image_size), sorted(keys), transform=view,
        batch_size=opts.batch_size, dtype=opts.dtype, mesh=mesh, cache_dir=cache_dir or None,
        progress=f"features {split}" if opts.progress else None)
    log(f"  {split} features ({spec}): {len(out['label'])} images, {time.time() - start:.1f} s")
    return out

  feats = {split: extract(split, spec, keys, transform)
           for split, spec, keys in (("train", opts.train, train_keys),
                                     ("test", opts.test, test_keys)) if keys}
  train, test = feats.get("train"), feats["test"]
  results = dict(checkpoint=encoder.identity, description=encoder.description,
                 transform=transform, train=opts.train, test=opts.test,
                 num_train=None if train is None else int(len(train["label"])),
                 num_test=int(len(test["label"])), protocols={})
  last_cls = f"block{depth - 1}_cls"
  for p in opts.protocols:
    start = time.time()
    if p == "knn":
      res = dict(k=list(opts.k), tau=opts.tau, similarity_dtype=opts.knn_dtype,
                 accuracy=_run_knn(opts, train, test, depth, mesh))
    elif p == "per_block":
      res = per_block_lib.per_block_knn(train, test, depth, pooling=opts.per_block_pooling,
                                        k=opts.per_block_k, tau=opts.tau,
                                        similarity_dtype=opts.knn_dtype, mesh=mesh)
      if opts.per_block_probe:
        res["probe_blocks"] = per_block_lib.per_block_probe(
            train, test, depth, pooling=opts.per_block_pooling, mesh=mesh,
            progress=opts.progress, **opts.probe_kwargs)
    elif p == "probe":
      from mim_refiner_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
      sets = probe_sets(depth)
      probe_train = {n: train[k] for n, k in sets.items()}
      if opts.probe_augment > 0:  # [A, N, D]: augmented copies of the train set
        copies = [extract(f"train, augmented copy {a}", opts.train, set(sets.values()),
                          dict(transform, augment_seed=a)) for a in range(opts.probe_augment)]
        probe_train = {n: np.stack([c[k] for c in copies]) for n, k in sets.items()}
      res = probe.linear_probe_grid(probe_train, train["label"],
                                    {n: test[k] for n, k in sets.items()}, test["label"],
                                    mesh=mesh, progress=opts.progress, **opts.probe_kwargs)
      if opts.selective_aggregation:
        key = f"block{depth - 1}_patch_tokens"
        res = dict(grid=res, selective_aggregation=probe.selective_aggregation_probe(
            train[key], train["label"], test[key], test["label"], mesh=mesh,
            progress=opts.progress, **opts.probe_kwargs))
    elif p == "lowshot":
      from mim_refiner_jax.evaluation import lowshot  # pylint: disable=g-import-not-at-top
      key = opts.lowshot_features or last_cls
      res = dict(features=key, **lowshot.lowshot_eval(
          train[key], train["label"], test[key], test["label"], progress=opts.progress,
          **opts.lowshot_kwargs))
    elif p == "cluster":
      from mim_refiner_jax.evaluation import cluster  # pylint: disable=g-import-not-at-top
      key = opts.cluster_features or last_cls
      res = dict(features=key, **cluster.clustering_eval(
          test[key], test["label"], mesh=mesh, progress=opts.progress, **opts.cluster_kwargs))
    else:
      raise ValueError(f"unknown protocol {p!r}; choose from {PROTOCOLS}")
    res["seconds"] = time.time() - start
    results["protocols"][p] = res
  return results


def scalars(results: dict) -> dict:
  """Flat {name: float} of the headline numbers (console table, TensorBoard)."""
  out = {}
  protocols = results["protocols"]
  for key, accs in protocols.get("knn", {}).get("accuracy", {}).items():
    for k, a in accs.items():
      out[f"knn/{key}/k{k}"] = a
  if "per_block" in protocols:
    res = protocols["per_block"]
    for i, a in enumerate(res["blocks"]):
      out[f"per_block/knn/block{i}"] = a
    out["per_block/knn/main"] = res["main"]
    for i, a in enumerate(res.get("probe_blocks") or []):
      out[f"per_block/probe/block{i}"] = a
  if "probe" in protocols:
    res = protocols["probe"]
    grid = res.get("grid", res)
    out["probe/best"] = grid["best"]["accuracy"]
    if "selective_aggregation" in res:
      out["probe/selective_aggregation"] = res["selective_aggregation"]["best"]["accuracy"]
  for name in ("lowshot", "cluster"):
    if name in protocols:
      out.update(_numbers(protocols[name], name))
  return out


def _numbers(tree, prefix: str) -> dict:
  """Numeric leaves of a nested result dict (lists and non-numbers skipped)."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k != "seconds":
        out.update(_numbers(v, f"{prefix}/{k}"))
  elif isinstance(tree, (int, float, np.integer, np.floating)) and not isinstance(tree, bool):
    out[prefix] = float(tree)
  return out


def table(all_results: dict) -> str:
  """A plain text table: one row per (checkpoint, metric)."""
  rows = []
  for name, results in all_results.items():
    for metric, value in scalars(results).items():
      shown = f"{100 * value:.2f}%" if 0 <= value <= 1 and ("acc" in metric or "knn" in metric
                                                          or "probe" in metric) else f"{value:.4g}"
      rows.append((name, metric, shown))
  if not rows:
    return "(no results)"
  widths = [max(len(r[i]) for r in rows + [("checkpoint", "metric", "value")]) for i in range(3)]
  fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"
  return "\n".join([fmt(("checkpoint", "metric", "value")), "-" * (sum(widths) + 4)]
                   + [fmt(r) for r in rows])


def run(checkpoints: list, opts: Options, *, names: list | None = None, out_dir: str | None = None,
        mesh=None, log=print) -> dict:
  """Evaluates every checkpoint; writes OUT_DIR/results.json (+ per_block.{json,png}) and, for a
  workdir checkpoint, TensorBoard scalars ("eval/...") at its step. Returns all results."""
  import jax  # pylint: disable=g-import-not-at-top
  unknown = [p for p in opts.protocols if p not in PROTOCOLS]
  if unknown:
    raise ValueError(f"unknown protocols {unknown}; choose from {PROTOCOLS}")
  names = names or [_short_name(c) for c in checkpoints]
  if len(set(names)) != len(names):
    names = [f"{i}:{n}" for i, n in enumerate(names)]
  out_dir = out_dir or default_out_dir(checkpoints[0])
  all_results = {}
  for name, path in zip(names, checkpoints):
    all_results[name] = evaluate_checkpoint(path, opts, mesh=mesh, log=log)
  is_main = jax.process_index() == 0
  if is_main:
    paths_lib.makedirs(out_dir)
    paths_lib.as_path(out_dir).joinpath("results.json").write_text(
        json.dumps(all_results, indent=1, default=float))
  if "per_block" in opts.protocols and is_main:
    first = next(iter(all_results.values()))
    combined = dict(k=opts.per_block_k, tau=opts.tau, pooling=opts.per_block_pooling,
                    test=opts.test, num_test=first["num_test"],
                    checkpoints={n: r["protocols"]["per_block"] for n, r in all_results.items()})
    paths = per_block_lib.write(combined, out_dir)
    log(f"per-block plot: {paths[1]}")
  for name, path in zip(names, checkpoints):
    results = all_results[name]
    if "step" in results["checkpoint"]:  # a workdir: scalars next to the training curves
      from mim_refiner_jax import metrics  # pylint: disable=g-import-not-at-top
      with metrics.MetricWriter(results["checkpoint"]["path"]) as writer:
        writer.write(results["checkpoint"]["step"],
                     {f"eval/{k}": v for k, v in scalars(results).items()})
  log(table(all_results))
  log(f"results: {paths_lib.join(out_dir, 'results.json')}")
  return all_results


def _short_name(path: str) -> str:
  path = paths_lib.as_path(os.fspath(path).rstrip("/"))
  parent = path.parent.name
  return f"{parent}/{path.name}" if parent else path.name
