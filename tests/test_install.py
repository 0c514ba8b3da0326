"""Installing: the dependency lists agree (pyproject.toml, what `pip install .` reads, vs
requirements*.txt, what the Quick start and CI install), torch is a test dependency only, and the
installed package and its tools work from any directory."""

import glob
import os
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name):
  lines = []
  with open(os.path.join(ROOT, name)) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line and not line.startswith("-r"):
        lines.append(line)
  return lines


def _name(requirement):
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_and_requirements_agree():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["dependencies"] == _requirements("requirements.txt")
  extras = project["optional-dependencies"]
  assert extras["test"] == _requirements("requirements-test.txt")
  runtime = {_name(r) for r in project["dependencies"]}
  assert not runtime & {"torch", "torchvision", "timm", "kappamodules"}
  assert "torch==2.13.0" in extras["test"] and "torchvision==0.28.0" in extras["test"]
  jax_pin = next(r for r in project["dependencies"] if _name(r) == "jax").split("==")[1]
  assert extras["cuda12"] == [f"jax[cuda12]=={jax_pin}"] and extras["tpu"] == [f"jax[tpu]=={jax_pin}"]


def test_installed_package_and_tools_work_from_any_directory(tmp_path):
  """`pip install .` (here into a target dir, without dependencies: the test venv has them)
  gives the package, the console scripts and the demo's shipped MAE; the tools and a config file
  given by path work from a directory outside the checkout."""
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--target", str(site), ROOT], check=True)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")

  def run(*cmd):
    return subprocess.run([str(c) for c in cmd], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=300, check=False)

  for name in ("train", "refine", "convert", "evaluate", "knn-eval", "plan-memory", "demo",
               "pretrain-mae", "show-views"):
    assert (site / "bin" / f"mim-refiner-{name}").exists(), name
  proc = run(site / "bin" / "mim-refiner-convert", "--help")
  assert proc.returncode == 0 and "--input" in proc.stdout, proc.stderr
  proc = run(site / "bin" / "mim-refiner-convert", "--input", "missing.pth", "--output", "out",
             "--to", "flax")  # a user error: one line and a failing exit status
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == "error: checkpoint missing.pth does not exist"
  proc = run(sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), "--input",
             "missing.pth", "--output", "out", "--to", "flax")  # the checkout's wrapper too
  assert proc.returncode == 2, proc.stderr
  proc = run(site / "bin" / "mim-refiner-refine", "--help")
  assert proc.returncode == 0 and "--pretrained" in proc.stdout, proc.stderr
  proc = run(sys.executable, "-m", "mim_refiner_jax.tools.evaluate", "--help")
  assert proc.returncode == 0 and "--protocols" in proc.stdout, proc.stderr
  # The package imported is the installed one, and a config loads by path from elsewhere (the
  # typo is reported after the config file was imported, so its imports resolved).
  proc = run(sys.executable, "-m", "mim_refiner_jax.train",
             f"--config={os.path.join(ROOT, 'configs', 'mae_l16.py')}:stage=3",
             "--workdir=wd", "--config.batch_sizee=8")
  assert proc.returncode == 2, proc.stderr
  assert "did you mean config.batch_size" in proc.stderr
  assert glob.glob(str(site / "mim_refiner_jax" / "data" / "demo_mae" / "*.safetensors"))
