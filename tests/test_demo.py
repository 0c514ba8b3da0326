"""tools/demo.py orchestration on a few steps, and the shipped demo MAE (tools/pretrain_mae.py)."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "mim_refiner_jax", "data", "demo_mae", "mae_mnist.safetensors")


def _tool(name):
  return importlib.import_module(f"mim_refiner_jax.tools.{name}")


@pytest.fixture(scope="module")
def demo():
  return _tool("demo")


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory):
  """A randomly initialised ViT with the demo's depth (configs/demo.py puts heads on blocks 1, 2,
  main) and patch/grid, but 32 wide: the orchestration does not care how good the MAE is."""
  from mim_refiner_jax.convert import checkpoints
  from mim_refiner_jax.models import vit
  kwargs = dict(width=32, depth=4, num_heads=2, patch_size=4, mlp_ratio=4.0, prenorm=True,
                pos_grid=8)
  variables = vit.ViT(**kwargs).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  path = str(tmp_path_factory.mktemp("mae") / "tiny.safetensors")
  checkpoints.save_torch(path, jax.tree.map(np.asarray, dict(variables)), kwargs,
                         layout="safetensors")
  return path


def test_demo_runs_reuses_and_keeps_every_run(demo, tiny_mae, tmp_path, capsys, monkeypatch):
  from mim_refiner_jax import train
  workdir = str(tmp_path / "demo")
  argv = ["--workdir", workdir, "--mae", tiny_mae, "--seeds", "0", "--stage2-epochs", "0.02",
          "--stage3-epochs", "0.02", "--batch-size", "32"]  # 2 steps of 32 per stage
  # Stage 3 stops at a checkpoint after its first step (what Ctrl-C does): the demo ends with
  # status 0 and says so; the rerun resumes it instead of starting over.
  real_train = train.train
  monkeypatch.setattr(train, "train", lambda config, workdir, stop_after=None: real_train(
      config, workdir, stop_after=1 if config.stage == 3 else stop_after))
  assert demo.main(argv) == 0
  captured = capsys.readouterr()
  assert "stopped: seed 0: stage 3 stopped at a checkpoint" in captured.out
  monkeypatch.setattr(train, "train", real_train)
  first = demo.main(argv)
  captured = capsys.readouterr()
  out = captured.out
  assert "reusing stage 2" in out and "resuming stage 3" in out
  assert "at step 1" in captured.out + captured.err  # the trainer's "resumed ... at step 1"
  assert "raw pixels" in out and "MAE (before)" in out and "refined, seed 0" in out
  # Every pooling of every block before and after, each scored by every protocol.
  for results in (first["mae"], first["refined"]["0"]):
    for key in ["block0_cls", "block3_mean", "block3_cls+mean", "ln_cls", "ln_mean",
                "ln_cls+mean"]:
      assert 0.0 <= results[key]["knn"] <= 1.0
  assert first["pixels"]["pixels"]["knn"] > 0.85  # raw pixels under the k-NN protocol: ~89%
  assert first["test_size"] == 1000 and first["train_size"] == 4000
  assert not first["times"]["seed0"]["stage3"]["reused"]
  for phase in ("stage2", "stage3"):
    assert os.path.exists(os.path.join(workdir, "seed0", phase, "export", "encoder_flax"))
  assert os.path.getsize(os.path.join(workdir, "knn_per_block.png")) > 0

  second = demo.main(argv)  # everything cached: no training, no evaluation
  out = capsys.readouterr().out
  assert out.count("reusing") == 4  # baselines, stage 2, stage 3, the refined evaluation
  assert "resuming" not in out
  assert second["refined"] == first["refined"] and second["mae"] == first["mae"]
  for part in ("stage2", "stage3", "evaluate"):
    assert second["times"]["seed0"][part]["reused"]
    assert second["times"]["seed0"][part]["seconds"] == first["times"]["seed0"][part]["seconds"]
  runs = sorted(os.listdir(os.path.join(workdir, "runs")))
  assert len(runs) == 2 or first["started"] == second["started"]  # one file per run
  with open(os.path.join(workdir, "demo_results.json")) as f:
    assert json.load(f)["started"] == second["started"]


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
