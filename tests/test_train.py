"""The trainer end to end on a tiny config: resume equivalence, Ctrl-C, config errors, 2 hosts.

Runs in-process (8 simulated CPU devices from conftest) where possible; Ctrl-C, command-line
errors and the two-process jax.distributed run use subprocesses of the real command.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from mim_refiner_jax import checkpoint as checkpoint_lib
from mim_refiner_jax import metrics as metrics_lib
from mim_refiner_jax import sharding
from mim_refiner_jax import train as train_lib
from mim_refiner_jax.convert.checkpoints import save_flax
from mim_refiner_jax.models.vit import ViT, vit_kwargs
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A random tiny pre-norm ViT saved as a Flax checkpoint (stands in for converted MAE weights)."""
  kwargs = vit_kwargs("mu", 4, image_size=16)
  variables = ViT(**kwargs).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  path = str(tmp_path_factory.mktemp("pretrained") / "mu")
  save_flax(path, jax.tree.map(np.asarray, variables), kwargs)
  return path


def _config(pretrained, arg="stage=3,knn=false", **overrides):
  config = tiny_config.get_config(arg)
  config.init.pretrained = pretrained
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: {k: v for k, v in r.items() if k != "wall_time" and not k.startswith("perf/")}
          for r in rows if "loss" in r}


def test_resume_equivalence(pretrained, tmp_path):
  """6 steps straight == 3 steps, stop (checkpoint), 3 resumed steps: bitwise equal state."""
  # Stage 3 (everything trains, EMA, top-k sampling) for 6 steps: 64 examples / batch 16 = 4
  # steps per epoch, 1.5 epochs.
  config = _config(pretrained, num_epochs=1.5, **{"checkpoint.every_steps": 100})
  straight, _ = train_lib.train(config, str(tmp_path / "straight"))
  first, _ = train_lib.train(config, str(tmp_path / "resumed"), stop_after=3)
  assert int(first["step"]) == 3
  del first
  resumed, _ = train_lib.train(config, str(tmp_path / "resumed"))
  assert int(resumed["step"]) == int(straight["step"]) == 6
  as_numpy = lambda tree: jax.tree.map(lambda x: np.asarray(
      jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x), tree)
  flat_a = jax.tree_util.tree_leaves_with_path(as_numpy(straight))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(as_numpy(resumed)))
  for path, a in flat_a:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_b[path]),
                                  err_msg=jax.tree_util.keystr(path))
  a, b = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in range(1, 7):
    assert a[step] == b[step], step
  # The checkpoint (written from 8 devices) restores onto a 2-device mesh with equal values.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints"), every_steps=1,
                                     keep=1)
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  shapes = jax.eval_shape(lambda: straight)
  target = checkpoint_lib.abstract_with_shardings(
      shapes, sharding.infer_shardings(mesh, shapes, sharding.state_rules("fsdp", 1)))
  restored, meta = ckpt.restore(ckpt.latest_step(), target)
  ckpt.close()
  assert meta["step"] == 6
  for path, a in jax.tree_util.tree_leaves_with_path(as_numpy(restored)):
    np.testing.assert_array_equal(a, flat_b[path], err_msg=jax.tree_util.keystr(path))
  queue_x = restored["queues"]["nnclr_temp02_cls"]["x"]
  assert len(queue_x.sharding.device_set) == 2
  # The exports are the EMA encoder in Flax and the official PyTorch layout.
  export = tmp_path / "resumed" / "export"
  assert (export / "encoder_flax").is_dir() and (export / "encoder_refined.th").is_file()


def _run(args, env_extra=None, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, "-m", "mim_refiner_jax.train", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          **kwargs)


def test_ctrl_c_saves_and_resumes(pretrained, tmp_path):
  """Ctrl-C as a terminal sends it: SIGINT to the whole process group, the Grain worker included.

  The trainer saves and exits 0 with the resume hint (the worker ignores SIGINT, so the last
  batch still arrives); SIGTERM takes the same path (PreemptionFlag handles both).
  """
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:stage=2,epochs=500,knn=false", f"--workdir={workdir}",
          f"--config.init.pretrained={pretrained}", "--config.data.worker_count=1"]
  proc = _run(args, start_new_session=True)
  lines = []
  for line in proc.stdout:  # wait until it is stepping, then press "Ctrl-C"
    lines.append(line)
    if line.split(" ", 1)[-1].startswith("step 3/"):
      os.killpg(proc.pid, signal.SIGINT)
      break
  out = "".join(lines) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  assert "SIGINT received: saving a checkpoint" in out, out
  assert "stopping at step" in out and "rerun the same command" in out, out
  assert "Traceback" not in out, out
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps and 3 <= steps[-1] < 2000, (steps, out)
  # The same command resumes from that checkpoint.
  proc = _run(args + ["--stop_after_steps=1"])
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out
  assert f"at step {steps[-1]}" in out and f"step {steps[-1] + 1}/2000" in out, out


def test_config_errors(pretrained, tmp_path):
  proc = _run([f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.batch_sizee=3"])
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode != 0 and "batch_sizee" in out, out
  proc = _run([f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.batch_size=abc"])
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode != 0 and "batch_size" in out, out

  cases = [
      (dict(**{"init.pretrained": ""}), "init.pretrained"),  # stage 2 without weights
      (dict(**{"loss.local_view_indexing": "sideways"}), "local_view_indexing"),
      (dict(batch_size=12), "divide by the number of devices"),
      (dict(**{"heads.names": "nnclr_temp02_cls,projector7"}), "projector7"),
      (dict(**{"init.pretrained": str(tmp_path / "missing.pth")}), "does not exist"),
      (dict(**{"model.size": "tiny"}), "model.size"),  # the weights are a "mu" ViT
  ]
  for overrides, message in cases:
    config = _config(pretrained, arg="stage=2,knn=false", **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      train_lib.train(config, str(tmp_path / "bad"))


def test_two_processes(pretrained, tmp_path):
  """Two local processes through jax.distributed (2 CPU devices each) train and export."""
  port = portpicker.pick_unused_port()
  workdir = str(tmp_path / "run")
  procs = [_run([f"--config={CONFIG}:stage=3,epochs=2", f"--workdir={workdir}",
                 f"--config.init.pretrained={pretrained}", "--num_processes=2",
                 f"--process_id={i}", f"--coordinator_address=127.0.0.1:{port}"])
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "devices: 4 x cpu, processes: 2" in outs[0], outs[0]
  records = _records(workdir)
  assert sorted(records) == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in records.values())
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    knn = [json.loads(line) for line in f if "knn/cls" in line]
  assert knn and 0.0 <= knn[-1]["knn/cls"] <= 1.0
  assert os.path.isfile(os.path.join(workdir, "export", "encoder_refined.th"))


def test_non_finite_loss_stops_without_saving(tmp_path):
  """NaN weights: the run stops with a clear error at the first fetched loss, saving nothing."""
  kwargs = vit_kwargs("mu", 4, image_size=16)
  variables = ViT(**kwargs).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32), variables)
  path = str(tmp_path / "nan_weights")
  save_flax(path, variables, kwargs)
  config = _config(path, arg="stage=2,knn=false", **{"checkpoint.every_steps": 1})
  workdir = tmp_path / "run"
  with pytest.raises(metrics_lib.NonFiniteLossError, match="loss"):
    train_lib.train(config, str(workdir))
  assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
