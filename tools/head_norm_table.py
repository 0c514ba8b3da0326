r"""The README's `heads.norm` results table from the demo's result files (issue 23).

  python tools/head_norm_table.py docs/head_norm/demo_*.json

Each file is a `demo_results.json` (or `runs/*.json`) written by `tools/demo.py`, named
`demo_{setting}_{heads.norm}_s{seeds}.json`: setting `1dev` (default budget, one device), `3x` (3x
the epochs of both stages) or `8dev` (8 simulated CPU devices); the seeds are the keys of its
"refined". Prints, per setting and mode, the mean ± sample std over all seeds found of the last
block's CLS (the paper's k-NN feature) under each protocol, in %, and the MAE before refinement.
"""

import argparse
import collections
import json
import os
import re
import statistics
import sys

NAME = re.compile(r"demo_(?P<setting>[^_]+)_(?P<mode>.+)_s\d+\.json")
ORDER = ("sync_batch", "local_batch", "async_stats", "batch_renorm", "none")  # models/heads.py
SETTINGS = {"1dev": "1 device", "3x": "1 device, 3x epochs", "8dev": "8 devices"}
METRICS = (("knn", "k-NN"), ("probe", "linear probe"), ("1shot", "1-shot"), ("5shot", "5-shot"),
           ("1percent", "1%"), ("cluster_acc", "k-means ACC"))
FEATURE = "block3_cls"  # the demo's last block (depth 4)


def mean_std(values: list[float]) -> str:
  values = [100 * v for v in values]
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("files", nargs="+")
  args = parser.parse_args(argv)
  runs = collections.defaultdict(dict)  # (setting, mode) -> {seed: metrics}
  mae = None
  for path in args.files:
    match = NAME.fullmatch(os.path.basename(path))
    if not match:
      print(f"error: {path}: expected a name demo_<setting>_<heads.norm>_s<seeds>.json",
            file=sys.stderr)
      return 2
    with open(path) as f:
      results = json.load(f)
    for seed, features in results["refined"].items():
      runs[match["setting"], match["mode"]][seed] = features[FEATURE]
    mae = mae or results["mae"][FEATURE]
  print("| setting | heads.norm | seeds | " + " | ".join(t for _, t in METRICS) + " |")
  print("|---|---|---|" + "---|" * len(METRICS))
  mae_cells = " | ".join(mean_std([mae[k]]) for k, _ in METRICS)
  print(f"| MAE before refinement | | | {mae_cells} |")
  rank = lambda key: (list(SETTINGS).index(key[0]) if key[0] in SETTINGS else len(SETTINGS),
                      ORDER.index(key[1]) if key[1] in ORDER else len(ORDER), key)
  for setting, mode in sorted(runs, key=rank):
    seeds = runs[setting, mode]
    cells = [mean_std([m[k] for m in seeds.values()]) for k, _ in METRICS]
    print(f"| {SETTINGS.get(setting, setting)} | `{mode}` | {len(seeds)} | " + " | ".join(cells)
          + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
