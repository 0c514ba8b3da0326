"""The dependency lists agree: pyproject.toml (what `pip install .` reads) vs requirements*.txt
(what the Quick start and CI install), and torch is a test dependency only."""

import os
import re
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
