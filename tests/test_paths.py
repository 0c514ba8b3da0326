"""Local halves of issue 19: output file modes and unwritable workdirs (gs:// ones: test_gcs.py).

- safetensors exports were created 0600 (the safetensors writer's mode) while every other output
  is 0644: now all follow `open()`'s 0644 less the umask.
- A workdir that cannot be written was an OSError traceback from run.lock; now it is one line
  naming --workdir, exit status 2, before anything is read or compiled.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_refiner_jax import errors
from mim_refiner_jax import paths
from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.models.vit import ViT, vit_kwargs
from tests.test_train import CONFIG, ROOT


@pytest.fixture(scope="module")
def variables():
  kwargs = vit_kwargs("mu", 4, image_size=16)
  params = ViT(**kwargs).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return jax.tree.map(np.asarray, params), kwargs


@pytest.mark.parametrize("layout", ["safetensors", "refined"])
def test_exports_are_readable_by_all(variables, tmp_path, layout):
  umask = os.umask(0o022)  # the usual umask: 0644 files
  try:
    path = tmp_path / f"out.{layout}"
    checkpoints.save_torch(path, *variables, layout=layout)
    checkpoints.save_flax(tmp_path / "flax", *variables)
  finally:
    os.umask(umask)
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)
  assert oct((tmp_path / "flax" / "vit_kwargs.json").stat().st_mode & 0o777) == oct(0o644)


def test_check_writable(tmp_path):
  (tmp_path / "a_file").write_text("x")
  for bad in (tmp_path / "a_file", tmp_path / "a_file" / "workdir"):
    with pytest.raises(errors.UserError, match=f"--workdir={bad}"):
      paths.check_writable(str(bad), "--workdir")
  paths.check_writable(str(tmp_path / "new" / "workdir"), "--workdir")  # made, left empty
  assert os.listdir(tmp_path / "new" / "workdir") == []
  assert paths.resolve("gs://bucket/w") == "gs://bucket/w"  # never "<cwd>/gs:/bucket/w"
  assert paths.join("gs://bucket/w", "run.json") == "gs://bucket/w/run.json"


def test_unwritable_workdir_is_one_line_before_compiling(tmp_path):
  (tmp_path / "a_file").write_text("x")
  workdir = tmp_path / "a_file" / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "mim_refiner_jax.train", f"--config={CONFIG}:stage=2",
       f"--workdir={workdir}", f"--config.init.pretrained={tmp_path}/missing"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"error: --workdir={workdir} cannot be written"), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and "compiled" not in proc.stdout
