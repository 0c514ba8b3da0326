"""Evaluation presets: every setting of every protocol, by name.

"default" is fast (MNIST-sized checks in seconds to minutes); "paper" is what the paper's runs
used, each value with its source (refiner_facts.md section 10, ml-jku/MIM-Refiner yamls).
`suite.Options.from_preset(name, train=..., test=..., **overrides)` builds the options of a
preset with any value overridden; tools/evaluate.py --preset NAME does the same from flags.
"""

from mim_refiner_jax.evaluation import probe as probe_defaults

PRESET_NAMES = ("default", "paper")

# setting -> (default, paper, source of the paper value)
TABLE = {
    # k-NN (section 10.1; yamls/eval/knn/template_tracked.yaml, offline_knn_metrics_callback.py)
    "features": ("last", "last", "10.1: last block, no final norm (use_next_norm: false), CLS "
                 "and mean patch separately"),
    "k": ((10,), (10,), "10.1: knns default [10] (offline_knn_metrics_callback.py)"),
    "tau": (0.07, 0.07, "10.1: metrics/knn.py default"),
    "knn_dtype": ("float32", "float32", "offline_knn_metrics_callback.py: autocast wraps only the "
                  "forward; multiclass_knn runs outside it"),
    "dtype": ("float32", "bfloat16", "template_tracked.yaml: trainer precision bfloat16 "
              "(encoder forward under autocast)"),
    # linear probe (section 10.2; yamls/eval/probe/template_tracked_dinov2grid.yaml,
    # utils/processors/probe_processor.py)
    "probe_lrs": (probe_defaults.DINOV2_LRS, probe_defaults.DINOV2_LRS,
                  "probe_processor.py grid 'dinov2': 13 LRs x batch/256"),
    "probe_last4_pooling": ("reference", "reference", "probe_processor.py: vit_block_extractor "
                            "num_last_blocks=4 + concat_finalizer(dim=-1), then "
                            "concat_class_average: 4 CLS || 4 mean patch"),
    "probe_epochs": (probe_defaults.DEFAULT_EPOCHS, probe_defaults.PAPER_EPOCHS,
                     "template_tracked_dinov2grid.yaml: max_epochs 50 (7mzhpufg.yaml vars)"),
    "probe_batch_size": (probe_defaults.DEFAULT_BATCH_SIZE, probe_defaults.PAPER_BATCH_SIZE,
                         "template_tracked_dinov2grid.yaml: effective_batch_size 1024"),
    "probe_augmentation": ("none", "fresh", "template_tracked_dinov2grid.yaml: train "
                           "datasets/imagenet/train_minaug (RandomResizedCrop 0.08-1 bicubic + "
                           "flip), drawn every epoch"),
    "probe_dtype": ("float32", "bfloat16", "template_tracked_dinov2grid.yaml: precision "
                    "bfloat16 (encoder forward; heads fp32 here)"),
    # low-shot (section 10.3; offline_logreg_callback.py, MSN's splits)
    "lowshot_shots": ((1, 2, 5), (1, 2, 5), "10.3: 1/2/5 images per class"),
    "lowshot_percents": ((1.0,), (1.0,), "10.3 / MSN: 1percent.txt"),
    "lowshot_seeds": ((0, 1, 2), (0, 1, 2), "10.3: 3 MSN splits (seeded splits when no "
                      "--lowshot-split-dir)"),
    "lowshot_split_dir": ("", "", "10.3: MSN imagenet_subsets{1,2,3} (give the directory)"),
    # clustering (section 10.3; paper section 5.3, App. C.12: no code in the reference repo)
    "cluster_algorithm": ("lloyd", "minibatch", "paper 5.3: scikit-learn mini-batch k-means"),
    "cluster_restarts": (10, 100, "paper 5.3: 100 runs, the lowest k-means loss reported"),
    "separation_sample": (50_000, 50_000, "silhouette / Davies-Bouldin on the ground-truth "
                          "classes, all rows up to this many (IN-1k val: 50,000, all)"),
}


def values(name: str) -> dict:
  """{setting: value} of preset `name`."""
  if name not in PRESET_NAMES:
    raise ValueError(f"unknown preset {name!r}; choose from {PRESET_NAMES}")
  column = PRESET_NAMES.index(name)
  return {key: row[column] for key, row in TABLE.items()}


def markdown_table() -> str:
  """The README's table: setting, default, paper, source."""
  def show(v):
    if isinstance(v, tuple) and len(v) > 5:
      return f"{len(v)} values, {v[0]:g} ... {v[-1]:g}"
    if isinstance(v, tuple):
      return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return str(v) if v != "" else "-"
  rows = ["| setting | default | paper | source of the paper value |", "|---|---|---|---|"]
  rows += [f"| {key} | {show(d)} | {show(p)} | {src} |" for key, (d, p, src) in TABLE.items()]
  return "\n".join(rows)
