"""Test-wide setup. Runs before any test module imports jax."""
import os

# 8 simulated CPU devices for the multi-device tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: full-size checks, deselected in CI (-m 'not slow')")
  # Grain's multiprocessing reads absl flags; parse them once (ENGINEERING.md, Grain section).
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"], known_only=True)
  from mim_refiner_jax.torchvision_compat import ensure_torchvision_importable  # noqa: E402
  ensure_torchvision_importable()


@pytest.fixture
def rng_np():
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0)
