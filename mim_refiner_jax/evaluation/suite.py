"""Every evaluation protocol on any checkpoint: the logic behind tools/evaluate.py.

Protocols (refiner_facts.md section 10; names as on the command line):
  knn        weighted k-NN, several k from one similarity pass (10.1); default features are the
             paper's: the last block's CLS and mean patch token without the final norm.
  per_block  k-NN (optionally also the probe grid) of every block: JSON + PNG (Fig. 3b).
  probe      DINOv2 linear-probe grid (10.2) on {last1_cls, last1_cls+patch, last4_cls,
             last4_cls+patch}; "last 1" includes the final norm, "last 4" is raw (the reference's
             4 CLS || 4 mean patch); on cached no-aug features, fixed augmented copies, or a
             fresh augmented view every epoch (probe_stream.py); optionally the
             selective-aggregation probe on the last block's patch tokens (beyond_cls_facts 1-2).
  lowshot    1/2/5-shot and 1% logistic regression on the last block's CLS, no norm (10.3).
  cluster    k-means clustering metrics and the class separation on the test split (10.3).
Every setting comes from a preset (evaluation/presets.py: "default" fast, "paper" the paper's
runs), any of them overridden: `Options.from_preset("paper", train=..., test=..., k=(20,))`.
probe / lowshot / cluster live in evaluation/{probe,lowshot,cluster}.py and are imported only when
asked for. For each checkpoint, the features every chosen protocol needs are extracted in one pass
per split (dataset_features), cached in one place (DEFAULT_CACHE, printed; never next to the
model unless cache_dir says so) and shared.
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
from mim_refiner_jax.evaluation import presets

PROTOCOLS = ("knn", "per_block", "probe", "lowshot", "cluster")
# The one feature-cache location: $MIM_REFINER_CACHE, else ~/.cache/mim_refiner_jax/features.
DEFAULT_CACHE = os.environ.get("MIM_REFINER_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "mim_refiner_jax", "features")
_DEFAULT = presets.values("default")


@dataclasses.dataclass
class Options:
  """Every setting of an evaluation; field defaults are the "default" preset (presets.py)."""
  train: str                       # source specs (dataset_features.source_config)
  test: str
  protocols: tuple = ("knn",)
  preset: str = "default"          # the preset these values started from (reported)
  features: str = _DEFAULT["features"]  # knn keys: "last" (the paper's), "all_blocks", key,key
  k: tuple = _DEFAULT["k"]
  tau: float = _DEFAULT["tau"]
  knn_dtype: str = _DEFAULT["knn_dtype"]  # similarity dtype (the reference: fp32)
  per_block_pooling: str = "cls"
  per_block_k: int = knn_lib.DEFAULT_K
  per_block_probe: bool = False
  selective_aggregation: bool = False
  probe_lrs: tuple = _DEFAULT["probe_lrs"]
  probe_last4_pooling: str = _DEFAULT["probe_last4_pooling"]  # "reference" or "dinov2"
  probe_epochs: int = _DEFAULT["probe_epochs"]
  probe_batch_size: int = _DEFAULT["probe_batch_size"]
  # "none": cached no-aug features; "copies": probe_augment fixed augmented copies of the train
  # set (epoch e on copy e mod A, each extracted and cached once); "fresh": a new train_minaug
  # view every epoch, extracted on the fly (probe_stream.py), encoder in probe_dtype.
  probe_augmentation: str = _DEFAULT["probe_augmentation"]
  probe_augment: int = 0
  probe_dtype: str = _DEFAULT["probe_dtype"]
  lowshot_features: str = ""       # "" = last block CLS, no norm (section 10.3)
  lowshot_shots: tuple = _DEFAULT["lowshot_shots"]
  lowshot_percents: tuple = _DEFAULT["lowshot_percents"]
  lowshot_seeds: tuple = _DEFAULT["lowshot_seeds"]
  lowshot_split_dir: str = _DEFAULT["lowshot_split_dir"]  # MSN split files ("" = seeded)
  cluster_features: str = ""       # "" = last block CLS, no norm
  cluster_algorithm: str = _DEFAULT["cluster_algorithm"]
  cluster_restarts: int = _DEFAULT["cluster_restarts"]
  separation_sample: int = _DEFAULT["separation_sample"]
  image_size: int = 0              # 0 = a workdir's k-NN monitor view, else patch x grid
  resize: int = 0                  # 0 = as the crop: the monitor's, else image_size * 256/224
  batch_size: int = 256
  dtype: str = _DEFAULT["dtype"]   # encoder compute dtype of the cached features
  weights: str = "auto"            # workdir: ema / live
  step: int | None = None
  cache_dir: str | None = None     # None: DEFAULT_CACHE; "" = off
  allow_label_mismatch: bool = False  # test classes missing from the train set: refused if False
  progress: bool = True
  probe_kwargs: dict = dataclasses.field(default_factory=dict)
  lowshot_kwargs: dict = dataclasses.field(default_factory=dict)
  cluster_kwargs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_preset(cls, name: str, **overrides) -> "Options":
    """The options of preset `name` (presets.py), then `overrides` (any field, train and test
    included). For callers such as a refine command's --eval-preset."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"unknown evaluation settings {unknown}; choose from {sorted(fields)}")
    return cls(**{**presets.values(name), "preset": name, **overrides})

  def settings(self) -> dict:
    """Every value (results.json and the console name them)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


PROBE_FEATURES = {  # probe feature-set name -> feature key (section 10.2)
    "last1_cls": "cls", "last1_cls+patch": "cls_patch_mean",
    "last4_cls": "last4_cls", "last4_cls+patch": "last4_cls_patch_mean"}


def knn_keys(spec: str, depth: int) -> tuple[str, ...]:
  if spec == "last":
    return (f"block{depth - 1}_cls", f"block{depth - 1}_patch_mean")
  if spec == "all_blocks":
    return per_block_lib.block_keys(depth, "cls")
  return tuple(k for k in spec.split(",") if k)


def probe_sets(depth: int, last4_pooling: str = "reference", has_cls: bool = True) -> dict:
  """Probe set name -> feature key; last4_pooling "reference" (4 CLS || 4 mean patch, section
  10.2) or "dinov2" (4 CLS || the last block's mean patch, DINOv2's create_linear_input). An
  encoder without CLS token (I-JEPA): the mean patch token of the last block and of the last 4."""
  if last4_pooling not in ("reference", "dinov2"):
    raise ValueError(f"probe last-4 pooling must be 'reference' or 'dinov2', got "
                     f"{last4_pooling!r}")
  n = min(4, depth)
  if not has_cls:
    return {"last1_patch": "patch_mean", f"last{n}_patch": f"last{n}_patch_mean"}
  suffix = "_dinov2" if last4_pooling == "dinov2" else ""
  return {name.replace("last4", f"last{n}"):
          key.replace("last4", f"last{n}") + (suffix if key == "last4_cls_patch_mean" else "")
          for name, key in PROBE_FEATURES.items()}


def for_encoder_without_cls(opts: Options, depth: int) -> tuple[Options, list[str]]:
  """The options with every CLS-token default replaced by the mean patch token (encoders without
  CLS token, e.g. I-JEPA), and what was replaced; settings given explicitly stay (a "cls" key
  there is then a one-line error naming the fix)."""
  last = f"block{depth - 1}_patch_mean"
  changes = {}
  if opts.features in ("last", "all_blocks"):
    changes["features"] = (last if opts.features == "last"
                           else ",".join(per_block_lib.block_keys(depth, "patch_mean")))
  if opts.per_block_pooling == "cls":
    changes["per_block_pooling"] = "patch_mean"
  if not opts.lowshot_features:
    changes["lowshot_features"] = last
  if not opts.cluster_features:
    changes["cluster_features"] = last
  return dataclasses.replace(opts, **changes), [f"{k}={v}" for k, v in changes.items()]


def needed_keys(opts: Options, depth: int, has_cls: bool = True) -> tuple[set, set]:
  """(train keys, test keys) the chosen protocols read."""
  last_cls = f"block{depth - 1}_{'cls' if has_cls else 'patch_mean'}"
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
      keys = set(probe_sets(depth, opts.probe_last4_pooling, has_cls).values())
      if opts.probe_augmentation not in ("none", "copies", "fresh"):
        raise ValueError(f"probe augmentation must be none, copies or fresh, got "
                         f"{opts.probe_augmentation!r}")
      if opts.probe_augmentation == "fresh":  # train views come on the fly; labels from here
        test |= keys
        keys = {last_cls}
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


def eval_view(encoder, opts: Options) -> tuple[dict, str]:
  """(transform, where it comes from): the one definition of the evaluation view. A training
  workdir is evaluated at its k-NN monitor's view (config.evals.knn resize/crop in run.json), so
  the monitor and the tools score the same images; otherwise the checkpoint's resolution with
  the reference's resize 256/224 x crop (section 10). Flags override either."""
  monitor = {}
  run_json = paths_lib.as_path(paths_lib.join(encoder.identity["path"], "run.json"))
  if encoders_lib.is_workdir(encoder.identity["path"]) and run_json.exists():
    monitor = json.loads(run_json.read_text()).get("config", {}).get("evals", {}).get(
        "knn", {}) or {}
  if not opts.image_size and monitor.get("crop_size"):
    crop, where = int(monitor["crop_size"]), "the run's k-NN monitor (config.evals.knn)"
    resize = opts.resize or int(monitor.get("resize_size") or 0)
  else:
    crop = opts.image_size or encoder.image_size
    where = "--image-size" if opts.image_size else "the checkpoint's resolution"
    resize = opts.resize
  if opts.resize:
    where += ", --resize"
  return dataset_lib.eval_transform(crop, resize or None), where


def check_label_sets(train_labels, test_labels, allow: bool):
  """Refuses a train/test pair whose test classes the train set lacks (e.g. 3 shape classes
  against MNIST: every score would be near chance), unless allowed."""
  train_set, test_set = set(np.unique(train_labels).tolist()), set(np.unique(test_labels).tolist())
  missing = sorted(test_set - train_set)
  if missing and not allow:
    show = lambda xs: ",".join(map(str, sorted(xs)[:12])) + (" ..." if len(xs) > 12 else "")
    raise ValueError(f"the test set has classes the train set lacks ({show(missing)}; train "
                     f"classes {show(train_set)}): train and test must label the same classes. "
                     "Give a matching pair, or allow_label_mismatch / --allow-label-mismatch")
  return missing


def resolve_cache_dir(opts: Options) -> str:
  """"" when caching is off."""
  return DEFAULT_CACHE if opts.cache_dir is None else opts.cache_dir


def _lowshot_train_names(spec: str, image_size: int):
  """File names of the train rows, for MSN split files (image folders only)."""
  cfg = dataset_lib.source_config(spec, image_size)
  if cfg["name"] != "image_folder":
    return None  # split files must then list row indices
  from mim_refiner_jax.data import sources  # pylint: disable=g-import-not-at-top
  return [os.path.basename(f) for f in sources.ImageFolderSource(cfg["root"]).files]


def evaluate_checkpoint(path: str, opts: Options, mesh=None, log=print) -> dict:
  """Runs the chosen protocols on one checkpoint; returns its results dict."""
  encoder = encoders_lib.load_encoder(path, weights=opts.weights, step=opts.step)
  depth = encoder.vit_kwargs["depth"]
  transform, view_from = eval_view(encoder, opts)
  image_size = transform["crop_size"]
  cache_dir = resolve_cache_dir(opts)
  log(f"{encoder.description}: depth {depth}; eval view: {dataset_lib.describe_view(transform)} "
      f"(from {view_from}); preset {opts.preset}")
  has_cls = encoder.vit_kwargs.get("class_token", True)
  if not has_cls:
    opts, replaced = for_encoder_without_cls(opts, depth)
    log(f"  no CLS token: the mean patch token instead ({', '.join(replaced) or 'as given'})")
  train_keys, test_keys = needed_keys(opts, depth, has_cls)

  def extract(split, spec, keys, view, dtype=opts.dtype):
    start = time.time()
    out = dataset_lib.dataset_features(
        encoder, dataset_lib.source_config(spec, image_size), sorted(keys), transform=view,
        batch_size=opts.batch_size, dtype=dtype, mesh=mesh, cache_dir=cache_dir or None,
        progress=f"features {split}" if opts.progress else None)
    log(f"  {split} features ({spec}): {len(out['label'])} images, {time.time() - start:.1f} s")
    return out

  feats = {split: extract(split, spec, keys, transform)
           for split, spec, keys in (("train", opts.train, train_keys),
                                     ("test", opts.test, test_keys)) if keys}
  train, test = feats.get("train"), feats["test"]
  label_mismatch = []
  if train is not None:
    label_mismatch = check_label_sets(train["label"], test["label"], opts.allow_label_mismatch)
    if label_mismatch:
      log(f"  WARNING: test classes {label_mismatch} are not in the train set (allowed)")
  results = dict(checkpoint=encoder.identity, description=encoder.description,
                 transform=transform, eval_view=dataset_lib.describe_view(transform),
                 eval_view_from=view_from,
                 train=opts.train, test=opts.test, preset=opts.preset,
                 settings=opts.settings(), label_mismatch=label_mismatch,
                 num_train=None if train is None else int(len(train["label"])),
                 num_test=int(len(test["label"])), protocols={})
  last_cls = f"block{depth - 1}_{'cls' if has_cls else 'patch_mean'}"
  for p in opts.protocols:
    start = time.time()
    if p == "knn":
      res = dict(k=list(opts.k), tau=opts.tau, similarity_dtype=opts.knn_dtype,
                 encoder_dtype=opts.dtype, accuracy=_run_knn(opts, train, test, depth, mesh))
    elif p == "per_block":
      res = per_block_lib.per_block_knn(train, test, depth, pooling=opts.per_block_pooling,
                                        k=opts.per_block_k, tau=opts.tau,
                                        similarity_dtype=opts.knn_dtype, mesh=mesh)
      if opts.per_block_probe:
        res["probe_blocks"] = per_block_lib.per_block_probe(
            train, test, depth, pooling=opts.per_block_pooling, mesh=mesh,
            progress=opts.progress, **_probe_kwargs(opts))
    elif p == "probe":
      res = _run_probe(opts, encoder, train, test, depth, transform, image_size, extract, mesh,
                       has_cls)
      seconds = res.get("grid", res).get("epoch_seconds")
      if seconds:
        log(f"  probe: {np.mean(seconds):.2f} s per epoch over {len(seconds)} epochs "
            f"({res.get('grid', res).get('augmentation', '')})")
    elif p == "lowshot":
      from mim_refiner_jax.evaluation import lowshot  # pylint: disable=g-import-not-at-top
      key = opts.lowshot_features or last_cls
      split_dir = opts.lowshot_split_dir or None
      kwargs = dict(shots=tuple(opts.lowshot_shots), percents=tuple(opts.lowshot_percents),
                    seeds=tuple(opts.lowshot_seeds), split_dir=split_dir,
                    train_names=(_lowshot_train_names(opts.train, image_size) if split_dir
                                 else None), **opts.lowshot_kwargs)
      res = dict(features=key, **lowshot.lowshot_eval(
          train[key], train["label"], test[key], test["label"], progress=opts.progress,
          mesh=mesh, **kwargs))
      log(f"  low-shot splits: {res['splits_from']}")
    elif p == "cluster":
      from mim_refiner_jax.evaluation import cluster  # pylint: disable=g-import-not-at-top
      key = opts.cluster_features or last_cls
      res = dict(features=key, **cluster.clustering_eval(
          test[key], test["label"], mesh=mesh, progress=opts.progress,
          algorithm=opts.cluster_algorithm, restarts=opts.cluster_restarts,
          separation_sample=opts.separation_sample, **opts.cluster_kwargs))
    else:
      raise ValueError(f"unknown protocol {p!r}; choose from {PROTOCOLS}")
    res["seconds"] = time.time() - start
    results["protocols"][p] = res
  return results


def _probe_kwargs(opts: Options) -> dict:
  return dict(dict(lrs=tuple(opts.probe_lrs), epochs=opts.probe_epochs,
                   batch_size=opts.probe_batch_size), **opts.probe_kwargs)


def _run_probe(opts, encoder, train, test, depth, transform, image_size, extract, mesh,
               has_cls=True) -> dict:
  from mim_refiner_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  sets = probe_sets(depth, opts.probe_last4_pooling, has_cls)
  test_sets = {n: test[k] for n, k in sets.items()}
  if opts.probe_augmentation == "fresh":
    from mim_refiner_jax.evaluation import probe_stream  # pylint: disable=g-import-not-at-top
    res = probe_stream.fresh_augmentation_probe(
        encoder, dataset_lib.source_config(opts.train, image_size), transform, sets,
        train["label"], test_sets, test["label"], dtype=opts.probe_dtype, mesh=mesh,
        progress=opts.progress, **_probe_kwargs(opts))
  else:
    probe_train = {n: train[k] for n, k in sets.items()}
    if opts.probe_augmentation == "copies":  # [A, N, D]: augmented copies of the train set
      if opts.probe_augment < 1:
        raise ValueError("probe augmentation 'copies' needs the number of copies "
                         "(--probe-augment A)")
      copies = [extract(f"train, augmented copy {a}", opts.train, set(sets.values()),
                        dict(transform, augment_seed=a)) for a in range(opts.probe_augment)]
      probe_train = {n: np.stack([c[k] for c in copies]) for n, k in sets.items()}
    res = probe.linear_probe_grid(probe_train, train["label"], test_sets, test["label"],
                                  mesh=mesh, progress=opts.progress, **_probe_kwargs(opts))
    res["encoder_dtype"] = opts.dtype
  res["feature_keys"] = sets
  if opts.selective_aggregation:
    key = f"block{depth - 1}_patch_tokens"
    res = dict(grid=res, selective_aggregation=probe.selective_aggregation_probe(
        train[key], train["label"], test[key], test["label"], mesh=mesh,
        progress=opts.progress, **_probe_kwargs(opts)))
  return res


def scalars(results: dict) -> dict:
  """Flat {name: value} of the headline numbers (console table, TensorBoard). One unit: every
  accuracy and agreement score (k-NN, probe, low-shot, k-means ACC / NMI / AMI / ARI, silhouette)
  is in percent (the paper's tables; silhouette x100 as the paper); Davies-Bouldin and inertia
  are raw. Low-shot gives the mean and the std over its splits."""
  out = {}
  pct = lambda x: 100.0 * float(x)
  protocols = results["protocols"]
  for key, accs in protocols.get("knn", {}).get("accuracy", {}).items():
    for k, a in accs.items():
      out[f"knn/{key}/k{k}"] = pct(a)
  if "per_block" in protocols:
    res = protocols["per_block"]
    for i, a in enumerate(res["blocks"]):
      out[f"per_block/knn/block{i}"] = pct(a)
    out["per_block/knn/main"] = pct(res["main"])
    for i, a in enumerate(res.get("probe_blocks") or []):
      out[f"per_block/probe/block{i}"] = pct(a)
  if "probe" in protocols:
    res = protocols["probe"]
    grid = res.get("grid", res)
    out["probe/best"] = pct(grid["best"]["accuracy"])
    for name, feature in grid.get("features", {}).items():
      out[f"probe/{name}"] = pct(feature["best"]["accuracy"])
    if "selective_aggregation" in res:
      out["probe/selective_aggregation"] = pct(res["selective_aggregation"]["best"]["accuracy"])
  if "lowshot" in protocols:
    for setting, entry in protocols["lowshot"]["settings"].items():
      out[f"lowshot/{setting}/mean"] = pct(entry["mean"])
      out[f"lowshot/{setting}/std"] = pct(entry["std"])
  if "cluster" in protocols:
    res = protocols["cluster"]
    for group in ("lowest_inertia", "mean"):
      for metric in ("acc", "nmi", "ami", "ari"):
        out[f"cluster/{group}/{metric}"] = pct(res[group][metric])
    sep = res["class_separation"]
    out["cluster/class_separation/silhouette"] = pct(sep["silhouette"])
    out["cluster/class_separation/davies_bouldin"] = float(sep["davies_bouldin"])
  return out


def _unit(metric: str) -> str:
  if metric.endswith("silhouette"):
    return "x100"  # as the paper's tables
  return "" if metric.endswith(("davies_bouldin", "inertia")) else "%"


def table(all_results: dict) -> str:
  """A plain text table: one row per (checkpoint, metric), the unit in a column of its own; a
  mean over splits shows "mean +- std" and the number of splits."""
  rows = []
  for name, results in all_results.items():
    values, notes = scalars(results), _notes(results)
    for metric, value in values.items():
      if metric.endswith("/std") and metric[:-4] + "/mean" in values:
        continue  # shown with its mean
      shown = f"{value:.2f}" if _unit(metric) else f"{value:.3f}"
      std = values.get(metric[:-5] + "/std") if metric.endswith("/mean") else None
      if std is not None:
        shown += f" +- {std:.2f}"
      note = next((n for prefix, n in notes.items() if metric.startswith(prefix)), "")
      rows.append((name, metric + note, shown, _unit(metric)))
  if not rows:
    return "(no results)"
  head = ("checkpoint", "metric", "value", "unit")
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
  fmt = lambda r: (f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  "
                   f"{r[3]:<{widths[3]}}").rstrip()
  return "\n".join([fmt(head), "-" * (sum(widths) + 6)] + [fmt(r) for r in rows])


def _notes(results: dict) -> dict:
  """Metric prefix -> note appended to its name: the splits / runs / rows behind it."""
  protocols, notes = results["protocols"], {}
  if "lowshot" in protocols:
    notes["lowshot/"] = f" [{protocols['lowshot'].get('num_splits', '?')} splits]"
  if "cluster" in protocols:
    res = protocols["cluster"]
    notes["cluster/lowest_inertia/"] = f" [of {res['restarts']} runs]"
    notes["cluster/mean/"] = f" [{res['restarts']} runs]"
    sep = res.get("class_separation", {})
    if "rows" in sep:
      notes["cluster/class_separation/"] = f" [true classes, {sep['rows']} rows]"
  return notes


def describe_settings(opts: Options) -> str:
  """One line per protocol with the settings it runs under (printed before the run)."""
  lines = [f"preset {opts.preset}: encoder {opts.dtype}, batch {opts.batch_size}"]
  for p in opts.protocols:
    if p in ("knn", "per_block"):
      lines.append(f"  {p}: features {opts.features}, k {','.join(map(str, opts.k))}, "
                   f"tau {opts.tau}, similarity {opts.knn_dtype}")
    elif p == "probe":
      aug = {"none": "cached no-aug features",
             "copies": f"{opts.probe_augment} fixed augmented copies",
             "fresh": f"a fresh train_minaug view every epoch (encoder {opts.probe_dtype})"}
      lines.append(f"  probe: {len(opts.probe_lrs)} LRs x 4 feature sets (last-4 pooling "
                   f"{opts.probe_last4_pooling}), {opts.probe_epochs} epochs, batch "
                   f"{opts.probe_batch_size}, {aug.get(opts.probe_augmentation, '?')}")
    elif p == "lowshot":
      splits = (f"MSN split files in {opts.lowshot_split_dir}" if opts.lowshot_split_dir
                else f"seeded splits {','.join(map(str, opts.lowshot_seeds))}")
      lines.append(f"  lowshot: shots {','.join(map(str, opts.lowshot_shots))}, percents "
                   f"{','.join(f'{x:g}' for x in opts.lowshot_percents)}, {splits}")
    elif p == "cluster":
      lines.append(f"  cluster: {opts.cluster_algorithm} k-means, {opts.cluster_restarts} runs "
                   "(reported: the lowest-inertia run and the mean), class separation of the "
                   f"true labels on up to {opts.separation_sample} rows")
  return "\n".join(lines)


def run(checkpoints: list, opts: Options, *, names: list | None = None, out_dir: str | None = None,
        mesh=None, log=print, tensorboard: bool | None = None) -> dict:
  """Evaluates every checkpoint; writes OUT_DIR/results.json (+ per_block.{json,png}). TensorBoard
  scalars ("eval/...") go into a workdir checkpoint's event files only when `tensorboard` is True,
  or None and no out_dir was given (the results then live in WORKDIR/evaluation anyway): an
  evaluation with its own out_dir writes nothing next to the model it reads."""
  import jax  # pylint: disable=g-import-not-at-top
  unknown = [p for p in opts.protocols if p not in PROTOCOLS]
  if unknown:
    raise ValueError(f"unknown protocols {unknown}; choose from {PROTOCOLS}")
  if tensorboard is None:
    tensorboard = out_dir is None
  names = names or [_short_name(c) for c in checkpoints]
  if len(set(names)) != len(names):
    names = [f"{i}:{n}" for i, n in enumerate(names)]
  out_dir = out_dir or default_out_dir(checkpoints[0])
  cache_dir = resolve_cache_dir(opts)
  log(describe_settings(opts))
  log(f"feature cache: {cache_dir or 'off'} (--cache-dir DIR moves it, --no-cache turns it off)")
  all_results = {}
  start = time.time()
  for name, path in zip(names, checkpoints):
    all_results[name] = evaluate_checkpoint(path, opts, mesh=mesh, log=log)
  is_main = jax.process_index() == 0
  if is_main:
    paths_lib.makedirs(out_dir)
    paths_lib.as_path(out_dir).joinpath("results.json").write_text(
        json.dumps(all_results, indent=1, default=_json_default))
  if "per_block" in opts.protocols and is_main:
    first = next(iter(all_results.values()))
    combined = dict(k=opts.per_block_k, tau=opts.tau, pooling=opts.per_block_pooling,
                    test=opts.test, num_test=first["num_test"],
                    checkpoints={n: r["protocols"]["per_block"] for n, r in all_results.items()})
    paths = per_block_lib.write(combined, out_dir)
    log(f"per-block plot: {paths[1]}")
  for name, path in zip(names, checkpoints):
    results = all_results[name]
    if tensorboard and "step" in results["checkpoint"]:  # scalars next to the training curves
      from mim_refiner_jax import metrics  # pylint: disable=g-import-not-at-top
      with metrics.MetricWriter(results["checkpoint"]["path"]) as writer:
        writer.write(results["checkpoint"]["step"],
                     {f"eval/{k}": v for k, v in scalars(results).items()})
  log(table(all_results))
  log(f"results: {paths_lib.join(out_dir, 'results.json')} (preset {opts.preset}, every setting "
      f"under 'settings'); {time.time() - start:.0f} s")
  return all_results


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _short_name(path: str) -> str:
  path = paths_lib.as_path(os.fspath(path).rstrip("/"))
  parent = path.parent.name
  return f"{parent}/{path.name}" if parent else path.name
