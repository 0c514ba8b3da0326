"""`python tools/convert_weights.py` from a checkout: the same as `python -m mim_refiner_jax.tools.convert_weights`
and, after `pip install .`, the console script `mim-refiner-convert-weights`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mim_refiner_jax.tools.convert_weights import main  # noqa: E402

if __name__ == "__main__":
  status = main()  # an exit status, or a result (a dict) for callers in Python
  sys.exit(status if isinstance(status, int) else 0)
