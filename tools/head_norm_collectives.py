"""`python tools/head_norm_collectives.py` from a checkout: the same as
`python -m mim_refiner_jax.tools.head_norm_collectives`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mim_refiner_jax.tools.head_norm_collectives import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
