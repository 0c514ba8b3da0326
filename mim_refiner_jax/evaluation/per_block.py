"""Accuracy of every block of one or several encoders (the paper's Fig. 3b): JSON and one PNG.

k-NN (section 10.1: standardise, L2, exp(s/tau) votes) on the raw output of each block, pooled by
`pooling` ("cls" as in the paper; "patch_mean" or "cls_patch_mean" also work), plus the main
output (after the final LayerNorm for pre-norm models), and optionally the linear-probe grid per
block (evaluation/probe.py, when present). All blocks come from one feature pass per split
(dataset_features), which the cache shares with other protocols.
"""

import json
import os

import numpy as np

from mim_refiner_jax import paths
from mim_refiner_jax.evaluation import knn as knn_lib


def block_keys(depth: int, pooling: str = "cls") -> tuple[str, ...]:
  return tuple(f"block{i}_{pooling}" for i in range(depth)) + (pooling,)


def per_block_knn(train: dict, test: dict, depth: int, *, pooling: str = "cls", k: int = 10,
                  tau: float = knn_lib.DEFAULT_TAU, similarity_dtype: str = "float32",
                  mesh=None) -> dict:
  """k-NN accuracy per block from extracted features (`dataset_features` dicts holding
  `block_keys(depth, pooling)`): {"blocks": [acc of block 0..depth-1], "main": acc, ...}."""
  accs = {}
  for key in block_keys(depth, pooling):
    res = knn_lib.knn_accuracy(train[key], train["label"], test[key], test["label"], k=k, tau=tau,
                               mesh=mesh, similarity_dtype=similarity_dtype)
    accs[key] = res["accuracy"]
  return dict(blocks=[accs[f"block{i}_{pooling}"] for i in range(depth)], main=accs[pooling],
              num_test=int(len(test["label"])), num_train=int(len(train["label"])))


def per_block_probe(train: dict, test: dict, depth: int, *, pooling: str = "cls",
                    **probe_kwargs) -> list[float]:
  """Best linear-probe accuracy (DINOv2 grid, evaluation/probe.py) of each block's features."""
  from mim_refiner_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(depth):
    key = f"block{i}_{pooling}"
    res = probe.linear_probe_grid({key: train[key]}, train["label"], {key: test[key]},
                                  test["label"], **probe_kwargs)
    out.append(float(res["best"]["accuracy"]))
  return out


def plot(results: dict, path: str):
  """One PNG: accuracy (%) against block index, one line per checkpoint (and protocol).

  `results` = {"checkpoints": {name: {"blocks": [...], "probe_blocks": [...]?}}, "k", "tau",
  "pooling", "num_test", "test"}. The y-axis starts at 0 and says what it measures.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  max_depth = max(len(res["blocks"]) for res in results["checkpoints"].values())
  for n, (name, res) in enumerate(results["checkpoints"].items()):
    colour = f"C{n}"
    blocks = np.arange(len(res["blocks"]))
    ax.plot(blocks, 100 * np.asarray(res["blocks"]), "o-", color=colour, label=f"{name}: k-NN")
    if "main" in res:  # the main output (after the final norm of pre-norm models), apart
      ax.plot([max_depth], [100 * res["main"]], "o", color=colour, markerfacecolor="none")
    if res.get("probe_blocks"):
      ax.plot(blocks, 100 * np.asarray(res["probe_blocks"]), "s--", color=colour,
              label=f"{name}: linear probe")
  ax.set_xlabel(f"block (0-based; raw block output, {results['pooling']} pooling, no final norm)")
  ax.set_ylabel(f"top-1 accuracy (%) on {results['num_test']:,} test images")
  ax.set_ylim(0, 100)
  ax.set_xticks(np.arange(max_depth + 1),
                [str(i) for i in range(max_depth)] + ["main\n(final norm)"])
  ax.set_title(f"Accuracy per block: {results['test']}\n(k-NN k={results['k']}, "
               f"tau={results['tau']})", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: dict, out_dir: str, stem: str = "per_block") -> tuple[str, str]:
  """Writes OUT_DIR/STEM.json and OUT_DIR/STEM.png; returns their paths."""
  paths.makedirs(out_dir)
  json_path, png_path = (paths.join(out_dir, f"{stem}.{ext}") for ext in ("json", "png"))
  paths.as_path(json_path).write_text(json.dumps(results, indent=1))
  with paths.upload_via_local(png_path) as local:  # gs://...: drawn here, then uploaded
    plot(results, local)
  return json_path, png_path
