"""Test-wide setup. Runs before any test module imports jax."""
import os

# 8 simulated CPU devices for the multi-device tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, subprocesses included: tests compile
# the same tiny functions many times, and compiles dominate the suite's time on 2 cores.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mim_refiner_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: full-size checks, deselected in CI (-m 'not slow')")
  # Grain's multiprocessing reads absl flags; parse them once (ENGINEERING.md, Grain section).
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"], known_only=True)
  from tests.torchvision_compat import ensure_torchvision_importable  # noqa: E402
  ensure_torchvision_importable()


@pytest.fixture
def rng_np():
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0)
