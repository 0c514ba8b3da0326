"""tools/demo.py (the refine command per seed, plus baselines) and the shipped demo MAE
(tools/pretrain_mae.py)."""

import importlib
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "mim_refiner_jax", "data", "demo_mae", "mae_mnist.safetensors")


def _tool(name):
  return importlib.import_module(f"mim_refiner_jax.tools.{name}")


@pytest.fixture(scope="module")
def demo():
  return _tool("demo")


def test_demo_is_the_refine_command_per_seed(demo, tmp_path):
  """The demo's refinement is mim-refiner-refine on the shipped MAE and the digits (the
  orchestration is tested in test_refine.py); its arguments parse and name what they should."""
  from mim_refiner_jax import refine
  args = demo.parse_args(["--seeds", "0,2", "--stage3-epochs", "2", "--batch-size", "64"])
  argv = demo.refine_argv(2, args, str(tmp_path))
  parsed = refine.parse_args(argv)
  assert parsed.pretrained == SHIPPED and parsed.train == "mnist:train,image_size=32"
  assert parsed.workdir == str(tmp_path / "seed2") and parsed.config.endswith("demo_config.py:seed=2")
  changes = refine.parse_overrides(parsed.overrides)
  assert changes[3]["num_epochs"] == 2.0 and changes[3]["warmup_epochs"] == 1.0
  assert "num_epochs" not in changes[2] and changes[2]["batch_size"] == 64


def test_demo_rejects_bad_seeds_with_a_message(demo, capsys):
  with pytest.raises(SystemExit):
    demo.parse_args(["--seeds", "a,b"])
  assert "--seeds 'a,b'" in capsys.readouterr().err


def test_shipped_mae_matches_its_record():
  """The shipped checkpoint is the file pretrain_mae.py wrote (sha256) and reproduces its k-NN."""
  pretrain = _tool("pretrain_mae")
  from mim_refiner_jax.convert import checkpoints
  from mim_refiner_jax.models import vit
  with open(SHIPPED[:-len(".safetensors")] + ".json") as f:
    record = json.load(f)
  assert pretrain.sha256(SHIPPED) == record["sha256"]
  assert "--out mim_refiner_jax/data/demo_mae/mae_mnist.safetensors" in record["command"]
  mae = checkpoints.load_pretrained(SHIPPED)
  assert mae.vit_kwargs == record["vit_kwargs"]
  accuracy = pretrain.knn_subset(vit.ViT(**mae.vit_kwargs), mae.variables, 32)
  # 500 test digits: allow one digit of difference for other CPUs' float rounding.
  assert abs(accuracy - record["knn_subset_block_last_cls"]) <= 1 / 500 + 1e-9


def test_demo_user_mistakes_are_one_line(demo, tmp_path, capsys):
  """A damaged --mae (found while loading) and a negative length are one `error:` line, exit 2."""
  damaged = tmp_path / "mae.safetensors"
  with open(SHIPPED, "rb") as f:
    damaged.write_bytes(f.read()[:500_000])
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--mae", str(damaged), "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: --mae={damaged} cannot be read: truncated file"), err
  assert not workdir.exists()  # nothing written before the MAE was read
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--stage3-epochs", "-3"])
  assert exit_info.value.code == 2
  assert "--stage3-epochs must be positive (0: the default), got -3" in capsys.readouterr().err
