"""The CPU demo's config (tools/demo.py); it lives in the package, mim_refiner_jax/demo_config.py,
so that the installed demo finds it. For the trainer, e.g.:

  python -m mim_refiner_jax.train --config configs/demo.py:stage=2 --workdir workdirs/demo/s2
  python -m mim_refiner_jax.train --config configs/demo.py:stage=3 --workdir workdirs/demo/s3
"""

from mim_refiner_jax.demo_config import get_config  # noqa: F401
