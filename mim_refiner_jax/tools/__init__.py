"""Command-line tools, installed as console scripts (pyproject.toml [project.scripts]).

Each tool is a module with `main(argv=None)`: `python -m mim_refiner_jax.tools.evaluate ...`, the
console script `mim-refiner-evaluate ...` (after `pip install .`), or, from a checkout,
`python tools/evaluate.py ...` (a thin wrapper). The functions below are the console-script
targets: they run a tool's `main` and exit with its status (an int), or 0 when it returns a
result (a dict, for callers in Python).
"""

import importlib
import sys


def _script(module: str):
  def run():
    status = importlib.import_module(f"mim_refiner_jax.tools.{module}").main()
    sys.exit(status if isinstance(status, int) else 0)
  run.__name__ = f"{module}_script"
  return run


convert_weights_script = _script("convert_weights")
evaluate_script = _script("evaluate")
knn_eval_script = _script("knn_eval")
plan_memory_script = _script("plan_memory")
show_views_script = _script("show_views")
demo_script = _script("demo")
pretrain_mae_script = _script("pretrain_mae")
