"""The trainer and tools as a user meets them (issue 9 items 2-7).

Source spec strings, the real command line on an image folder (training, k-NN monitor, warmup
clipping, knn_eval with the checkpoint's image size), one-line errors with exit status 2, Ctrl-C,
stage 2 -> 3 and resume field checks, and a failed start leaving the workdir as it was.
Subprocesses run the real commands; everything that can run in-process does (no compiles).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mim_refiner_jax import checkpoint as checkpoint_lib
from mim_refiner_jax import errors
from mim_refiner_jax import train as train_lib
from mim_refiner_jax.data import sources
from mim_refiner_jax.models.vit import vit_kwargs
from tests import tiny_config
from tests.test_train import CONFIG, ROOT, pretrained  # noqa: F401  (a module-scoped fixture)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _trainer(args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "mim_refiner_jax.train", *args], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


# ----------------------------------------------------------------------------- source specs
def test_source_specs(tmp_path):
  parse = sources.parse_source_spec
  assert parse("tfds:imagenet2012:train[:10%],data_dir=/d") == dict(
      name="tfds", dataset="imagenet2012", split="train[:10%]", data_dir="/d")
  assert parse("image_folder:gs://bucket/a:b/train") == dict(name="image_folder",
                                                             root="gs://bucket/a:b/train")
  assert parse("folder:/x") == dict(name="image_folder", root="/x")  # knn_eval's old spelling
  assert parse("mnist:val,image_size=28,method=resize") == dict(
      name="mnist", split="val", image_size=28, method="resize")
  assert parse("synthetic:8,num_classes=2,seed=3,fail_fast=true") == dict(
      name="synthetic", num_examples=8, num_classes=2, seed=3, fail_fast=True)
  for bad, message in [("foo:/x", "unknown data source kind 'foo'"),
                       ("synthetic:many", "num_examples='many' must be an integer"),
                       ("mnist:train,size=3", "mnist has no option 'size'"),
                       ("tfds:imagenet2012", "lacks split"),
                       ("image_folder:/a,b", "option 'b' is not key=value")]:
    with pytest.raises(errors.UserError, match=message):
      parse(bad)
  # A spec, a dict and a ConfigDict build the same source.
  assert len(sources.make_source("synthetic:8,num_classes=2")) == 8
  assert len(sources.make_source({"name": "synthetic", "num_examples": 8})) == 8
  with pytest.raises(errors.UserError, match=r"config.data.train='image_folder:/nope': .*not a "
                     "directory"):
    sources.make_source("image_folder:/nope", where="config.data.train")
  # A tfds dataset that is not prepared: said so, and nothing is downloaded into data_dir.
  with pytest.raises(errors.UserError, match="tfds dataset imagenet2012 is not prepared in"):
    sources.make_source(f"tfds:imagenet2012:train,data_dir={tmp_path}/tfds")
  assert not os.path.exists(tmp_path / "tfds")
  # "auto" k-NN sets follow the training source (refiner_facts section 10.1 for ImageNet).
  bank, test = sources.default_eval_sources("tfds:imagenet2012:train,data_dir=/d")
  assert sources.describe_source(bank) == "tfds:imagenet2012_subset/10pct:train,data_dir=/d"
  assert sources.describe_source(test) == "tfds:imagenet2012:validation,data_dir=/d"
  (tmp_path / "train").mkdir()
  (tmp_path / "val").mkdir()
  bank, test = sources.default_eval_sources(f"image_folder:{tmp_path}/train")
  assert (bank["root"], test["root"]) == (f"{tmp_path}/train", f"{tmp_path}/val")
  assert sources.default_eval_sources(f"image_folder:{tmp_path}/val")[1] is None


def test_auto_eval_sets_need_a_test_set(pretrained, tmp_path):
  config = tiny_config.get_config("stage=2")
  config.init.pretrained = pretrained
  config.data.train = "image_folder:/data/mine"
  config.evals.knn.train = config.evals.knn.test = "auto"
  with pytest.raises(errors.UserError, match="config.evals.knn.test is 'auto'"):
    train_lib.train(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


# ------------------------------------------------------- the real command line, image folder
def _image_folder(root, per_class):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
    os.makedirs(os.path.join(root, f"class{label}"))
    for i in range(per_class):
      pixels = np.clip(rng.normal(colour, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, f"class{label}", f"{i}.png"))


def test_cli_image_folder_train_knn_and_knn_eval(pretrained, tmp_path, capsys):
  """Training and the k-NN monitor on a generated image folder, from the command line only.

  One epoch of 2 steps with warmup_epochs=1: the warmup is clipped (it used to fail with
  "total_steps (2) must exceed warmup_steps (2)"). The k-NN sets are "auto": the training folder
  and its sibling val/. Then tools/knn_eval.py evaluates the export at the checkpoint's 16 px.
  """
  data = tmp_path / "data"
  _image_folder(str(data / "train"), 16)
  _image_folder(str(data / "val"), 4)
  workdir = tmp_path / "run"
  proc = _trainer([f"--config={CONFIG}:stage=2,epochs=1", f"--workdir={workdir}",
                   f"--config.init.pretrained={pretrained}",
                   f"--config.data.train=image_folder:{data}/train",
                   "--config.evals.knn.train=auto", "--config.evals.knn.test=auto",
                   "--config.evals.final.protocols=knn,cluster"])
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, out + err
  assert "warmup clipped to 1 steps" in out, out
  assert f"k-NN sets: bank image_folder:{data}/train (32 images), test image_folder:{data}/val " \
         "(8 images)" in out, out
  # The training source is named at the start too, and recorded (issue 22 item 6).
  assert f"training on image_folder:{data}/train (32 images); k-NN monitor: bank" in out, out
  with open(workdir / "run.json") as f:
    info = json.load(f)
  recorded = info["config"]
  assert info["training_source"] == f"image_folder:{data}/train"
  assert info["knn_sets"] == {"train": f"image_folder:{data}/train",
                              "test": f"image_folder:{data}/val"}
  assert recorded["data"]["train"] == f"image_folder:{data}/train"
  assert recorded["evals"]["knn"]["test"] == f"image_folder:{data}/val"  # what really ran
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert 0.0 <= [r for r in rows if "knn/cls" in r][-1]["knn/cls"] <= 1.0
  # evals.final.protocols: the suite on the finished run, trained on data.train, tested on val.
  with open(workdir / "evaluation" / "results.json") as f:
    final = json.load(f)["run"]
  assert set(final["protocols"]) == {"knn", "cluster"}
  assert final["num_train"] == 32 and final["num_test"] == 8
  assert "eval/cluster/lowest_inertia/nmi" in rows[-1] and rows[-1]["step"] == 2
  assert "k-NN monitor eval view: resize" in out and "preset default" in out

  from mim_refiner_jax.tools import knn_eval  # pylint: disable=g-import-not-at-top
  export = str(workdir / "export" / "encoder_flax")
  args = ["--checkpoint", export, "--train", f"image_folder:{data}/train", "--test",
          f"image_folder:{data}/val", "--features", "cls", "--batch-size", "8"]
  results = knn_eval.main(args)
  assert "images: resize 18, crop 16 px (the checkpoint's size is 16 px)" in capsys.readouterr().out
  assert 0.0 <= results["cls"]["10"] <= 1.0
  # 1024 px through a patch-4 model: refused up front, with the sizes.
  with pytest.raises(SystemExit) as exit_info:
    knn_eval.main(args + ["--crop", "1024", "--batch-size", "64"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: batch 64 (8 per device) of 1024x1024 px = 65537 tokens at patch 4")
  assert "GiB per device" in err and "lower --batch-size or --crop" in err and len(
      err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- one-line errors
def test_cli_errors_are_one_line(pretrained, tmp_path):
  """Each bad input: exit status 2, one line on stderr naming the field or file, no traceback."""
  damaged = tmp_path / "damaged.pth"
  damaged.write_bytes(b"PK\x03\x04 this is not a whole zip file")
  base = [f"--config={CONFIG}", f"--config.init.pretrained={pretrained}"]
  cases = {
      "typo": (base + ["--config.batch_sizee=3"],
               "--config.batch_sizee: config has no field 'batch_sizee'; did you mean "
               "config.batch_size?"),
      "type": (base + ["--config.batch_size=abc"], "config.batch_size must be an int"),
      "source_field": (base + ["--config.data.train.root=/x"],
                       "config.data.train is a str"),
      "source_kind": (base + ["--config.data.train=foo:/x"], "unknown data source kind 'foo'"),
      "config_file": ([f"--config={tmp_path}/nope.py"], "config file"),
      "config_arg": ([f"--config={CONFIG}:stagee=3"], "unknown config argument 'stagee'"),
      "pretrained": ([f"--config={CONFIG}", f"--config.init.pretrained={damaged}"],
                     str(damaged)),
  }
  procs = {name: _trainer(args + [f"--workdir={tmp_path / name}"])
           for name, (args, _) in cases.items()}
  help_proc = _trainer(["--help"])
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, (name, out, err)
    assert "Traceback" not in out + err and len(lines) == 1, (name, err)
    assert lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, err)
    assert not os.path.exists(tmp_path / name), name  # the workdir is not even created
  out, _ = help_proc.communicate(timeout=300)
  assert help_proc.returncode == 0 and "--config" in out


# -------------------------------------------------------------------------------------- Ctrl-C
def test_second_ctrl_c_exits_at_once():
  """First SIGINT: the flag is set (the trainer saves, then stops); second: the process ends."""
  script = ("import sys, time\n"
            "from mim_refiner_jax import checkpoint\n"
            "flag = checkpoint.PreemptionFlag().install()\n"
            "print('ready', flush=True)\n"
            "while not flag.is_set(): time.sleep(0.01)\n"
            "print('flag set', flush=True)\n"
            "time.sleep(60)  # a long save\n")
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(signal.SIGINT)
  assert proc.stdout.readline().strip() == "flag set"
  start = time.time()
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGINT and time.time() - start < 10
  assert "Press Ctrl-C again to quit at once" in proc.stderr.read()


# ----------------------------------------------------------------- stage 2 -> 3 and resume
def _fake_run(workdir, config, step=None):
  """A workdir as the trainer leaves it: run.json (and a checkpoint at `step`)."""
  os.makedirs(workdir)
  kwargs = vit_kwargs("mu", 4, image_size=16)
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"config": config.to_dict(), "vit_kwargs": kwargs, "steps_per_epoch": 4,
               "total_steps": 8}, f)
  if step is not None:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1,
                                       keep=1)
    ckpt.save(step, {"step": np.int32(step)}, None, {"step": step}, force=True)
    ckpt.close()


def test_stage3_and_resume_check_state_fields(pretrained, tmp_path):
  s2 = str(tmp_path / "s2")
  _fake_run(s2, tiny_config.get_config("stage=2"))
  config = tiny_config.get_config("stage=3,knn=false")
  config.init.stage2_workdir = s2
  for field, value, message in [
      ("queue.size", 128, "config.queue.size=128 but the stage-2 state in "
                          f"config.init.stage2_workdir={s2} has queue.size=64"),
      ("heads.out_dim", 8, "config.heads.out_dim=8 but the stage-2 state"),
      ("model.size", "tiny", f"config.model.size='tiny' does not match the weights in the "
                             f"stage-2 workdir {s2}"),
      ("heads.names", "nnclr_temp02_cls5", r"heads \['nnclr_temp02_cls5'\] are not in the "
                                           "stage-2 workdir")]:
    changed = tiny_config.get_config("stage=3,knn=false")
    changed.init.stage2_workdir = s2
    section, name = field.split(".")
    changed[section][name] = value
    with pytest.raises(errors.UserError, match=message):
      train_lib.train(changed, str(tmp_path / "s3"))
    assert not os.path.exists(tmp_path / "s3")

  # A run resumed with a field that shapes the state changed: named, with both values.
  run = str(tmp_path / "run")
  _fake_run(run, config, step=4)
  config.queue.size = 128
  with pytest.raises(errors.UserError, match=f"config.queue.size=128 but the run in {run} has "
                     "queue.size=64; resume with --config.queue.size=64, or start a new run"):
    train_lib.train(config, run)
  assert sorted(os.listdir(run)) == ["checkpoints", "run.json"]
  # ... or with a field that shapes the sample order (issue 19: never silently another order).
  config.queue.size = 64
  config.seed = 7
  with pytest.raises(errors.UserError, match=r"config.seed=7 but the run in .* has seed=0; the "
                     r"sample order is a function of \(seed, batch_size, step\)"):
    train_lib.train(config, run)


# ----------------------------------------------------------------------------- failed starts
def test_failed_start_leaves_workdir_as_found(pretrained, tmp_path):
  config = tiny_config.get_config("stage=2,knn=false")
  config.init.pretrained = pretrained
  config.model.size = "tiny"  # the weights are a "mu" ViT: fails after the workdir is set up
  fresh, existing = tmp_path / "fresh", tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  for workdir in (fresh, existing):
    with pytest.raises(errors.UserError, match="config.model.size='tiny'"):
      train_lib.train(config, str(workdir))
  assert not fresh.exists()
  assert os.listdir(existing) == ["notes.txt"]


def test_ctrl_c_during_the_step_compile_exits_cleanly(pretrained, tmp_path):
  """Issue 19: Ctrl-C while XLA compiles the step printed `error: interrupted`, then the
  interpreter's teardown crashed (`Fatal Python error: Segmentation fault`, status -11)."""
  env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # a real compile
  proc = subprocess.Popen(
      [sys.executable, "-m", "mim_refiner_jax.train", f"--config={CONFIG}:stage=2,knn=false",
       f"--workdir={tmp_path / 'run'}", f"--config.init.pretrained={pretrained}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "compiling the train step" in line:
      os.killpg(proc.pid, signal.SIGINT)  # the compile takes seconds without the cache
      break
  out = "".join(lines) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 130, out
  assert out.strip().splitlines()[-1] == "error: interrupted", out
  assert "SIGINT received: stopping once the train step is compiled" in out, out
  assert "Fatal Python error" not in out and "Traceback" not in out, out
  assert not (tmp_path / "run").exists()  # nothing was started: nothing left behind
