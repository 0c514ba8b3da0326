"""gs:// everywhere (issue 19, items 1-2), against a real GCS API: fake-gcs-server on 127.0.0.1
(tests/gcs_emulator.py), started once for the module.

Through the real command lines, each with its working directory an empty folder that must stay
empty: weights converted to gs://, a stage-2 run on a gs:// workdir starting from them, stopped
(--stop_after_steps, as a preemption) and resumed, the same run uninterrupted (the losses must
match), its stage-3 continuation from the gs:// stage-2 workdir, the export evaluated (k-NN) from
gs:// with the feature cache and results in the bucket, and the export converted back out of the
bucket; stage 3 is stopped by SIGTERM and resumed. Then every artifact is looked up object by
object in the emulator.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mim_refiner_jax.convert.checkpoints import save_flax
from tests import gcs_emulator
from tests.test_train import CONFIG, ROOT

BUCKET = "mim-refiner-test"


@pytest.fixture(scope="module")
def gcs():
  emulator = gcs_emulator.GcsEmulator()
  try:
    emulator.create_bucket(BUCKET)
    yield emulator
  finally:
    emulator.stop()


def _env(gcs):
  # (The session's persistent compilation cache, tests/conftest.py, comes with os.environ: the
  # resumed and repeated runs reuse the first one's compiled step.)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **gcs.env())
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _run(gcs, cwd, *args, timeout=300):
  start = time.time()
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(gcs),
                        capture_output=True, text=True, timeout=timeout, check=False)
  print(f"{time.time() - start:.1f} s: {' '.join(args[:3])}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _losses(gcs, workdir: str) -> dict:
  """{step: loss} from the metrics.jsonl object, read straight from the emulator."""
  text = gcs.read(BUCKET, workdir + "/metrics.jsonl")
  rows = [json.loads(line) for line in text.splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_gs_workdirs_end_to_end(gcs, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.models.vit import ViT, vit_kwargs  # pylint: disable=g-import-not-at-top
  kwargs = vit_kwargs("mu", 4, image_size=16)
  local_weights = str(tmp_path / "mu")
  save_flax(local_weights, jax.tree.map(np.asarray, ViT(**kwargs).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))), kwargs)
  cwd = tmp_path / "cwd"  # every command runs here: nothing may appear in it
  cwd.mkdir()
  gs = f"gs://{BUCKET}"
  tool = lambda name: os.path.join(ROOT, "tools", f"{name}.py")
  trainer = ["-m", "mim_refiner_jax.train"]

  # Weights into the bucket (the safetensors file is written locally, then uploaded).
  _run(gcs, cwd, tool("convert_weights"), "--input", local_weights, "--output",
       f"{gs}/weights/mu.safetensors", "--to", "safetensors")

  # Stage 2: stopped after 3 of 8 steps, resumed; and the same run uninterrupted.
  s2 = [*trainer, f"--config={CONFIG}:stage=2,knn=false",
        f"--config.init.pretrained={gs}/weights/mu.safetensors"]
  out = _run(gcs, cwd, *s2, f"--workdir={gs}/s2", "--stop_after_steps=3")
  assert "stopping at step 3" in out, out
  out = _run(gcs, cwd, *s2, f"--workdir={gs}/s2")
  assert f"resumed {gs}/s2 at step 3" in out and f"exported the encoder to {gs}/s2/export" \
      in out, out
  _run(gcs, cwd, *s2, f"--workdir={gs}/s2_whole")
  resumed, whole = _losses(gcs, "s2"), _losses(gcs, "s2_whole")
  assert sorted(resumed) == list(range(1, 9)) and sorted(whole) == list(range(1, 9))
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [whole[s] for s in range(1, 9)],
                             rtol=1e-6)  # same devices, same order: equal up to float noise

  # Stage 3 from the gs:// stage-2 workdir, stopped by SIGTERM (as a preempted VM is) once it
  # steps, and resumed by the same command.
  s3 = [*trainer, f"--config={CONFIG}:stage=3,knn=false", f"--config.init.stage2_workdir={gs}/s2",
        f"--workdir={gs}/s3"]
  proc = subprocess.Popen([sys.executable, *s3], cwd=cwd, env=_env(gcs), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.split(" ", 1)[-1].startswith("step 1/"):
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert f"stage 3 starts from {gs}/s2 step 8" in out and "SIGTERM received" in out, out[-3000:]
  assert "exported" not in out, out[-3000:]  # it stopped before the end
  out = _run(gcs, cwd, *s3)
  assert f"resumed {gs}/s3 at step" in out and "exported the EMA encoder" in out, out
  assert sorted(_losses(gcs, "s3")) == list(range(1, 9))

  # A k-NN evaluation of the export from the bucket, cache and results there too.
  _run(gcs, cwd, tool("evaluate"), "--checkpoint", f"{gs}/s3/export/encoder_flax",
       "--protocols", "knn", "--train", "synthetic:64,num_classes=4,image_size=24",
       "--test", "synthetic:32,num_classes=4,image_size=24,seed=1", "--features", "block1_cls,cls",
       "--k", "5", "--batch-size", "16", "--cache-dir", f"{gs}/feature_cache",
       "--out", f"{gs}/eval", "--no-progress")
  results = json.loads(gcs.read(BUCKET, "eval/results.json"))
  assert 0.0 <= next(iter(results.values()))["protocols"]["knn"]["accuracy"]["cls"]["5"] <= 1.0

  # And out of the bucket again: the exported .th to a local safetensors file.
  back = tmp_path / "refined.safetensors"
  _run(gcs, cwd, tool("convert_weights"), "--input", f"{gs}/s3/export/encoder_refined.th",
       "--output", str(back), "--to", "safetensors")
  assert back.stat().st_size > 0

  objects = gcs.objects(BUCKET)
  for workdir in ("s2", "s2_whole", "s3"):
    for name in ("run.json", "metrics.jsonl", "export/encoder_refined.th",
                 "export/encoder_flax/vit_kwargs.json"):
      assert f"{workdir}/{name}" in objects, (workdir, name)
    assert any(o.startswith(f"{workdir}/tb/events.out.tfevents.") for o in objects), workdir
    assert any(o.startswith(f"{workdir}/checkpoints/8/state/") for o in objects), workdir
    assert any(o.startswith(f"{workdir}/export/encoder_flax/variables/") for o in objects)
    assert f"{workdir}/run.lock" not in objects  # the lease is given back
  assert any(o.startswith("feature_cache/") and o.endswith(".npz") for o in objects)
  assert os.listdir(cwd) == []  # no local folder named gs: (or anything else)


@pytest.fixture
def gcs_here(gcs, monkeypatch):
  """The emulator for this process's own clients (gcsfs through etils.epath)."""
  for name, value in gcs.env().items():
    monkeypatch.setenv(name, value)
  return gcs


def test_remote_workdir_lease(gcs_here):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = f"gs://{BUCKET}/leased"
  first = checkpoint.WorkdirLock(workdir).acquire()
  record = json.loads(gcs_here.read(BUCKET, "leased/run.lock"))
  assert record["holder"] == f"pid {os.getpid()}" and {"host", "started", "renewed"} <= set(record)
  with pytest.raises(checkpoint.WorkdirInUseError,
                     match=r"in use by another run \(pid .* its lease expires at"):
    checkpoint.WorkdirLock(workdir).acquire()  # refused while fresh
  first.release()
  assert "leased/run.lock" not in gcs_here.objects(BUCKET)
  # A lease not renewed for longer than its TTL (a run killed with -9) is taken over.
  epath.Path(workdir, "run.lock").write_text(json.dumps(
      dict(record, holder="pid 1", renewed=time.time() - 2 * checkpoint.RemoteLease.TTL_S)))
  second = checkpoint.WorkdirLock(workdir).acquire()
  assert json.loads(gcs_here.read(BUCKET, "leased/run.lock"))["holder"] == f"pid {os.getpid()}"
  second.release()


def test_unwritable_bucket_is_one_line(gcs_here):
  from mim_refiner_jax import errors  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import paths  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match=r"^--workdir=gs://no-such-bucket-here/w cannot be "
                     r"written \(.*\); make it writable"):
    paths.check_writable("gs://no-such-bucket-here/w", "--workdir")
  assert gcs_here.buckets() == [BUCKET]  # (gcsfs's makedirs would have created it)
  paths.check_writable(f"gs://{BUCKET}/writable", "--workdir")
  assert not [o for o in gcs_here.objects(BUCKET) if o.startswith("writable/")]  # probe removed


def test_image_folder_in_a_bucket(gcs_here, tmp_path):
  """image_folder: roots on gs:// list, label and decode like local ones (and find val/)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.data import sources  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 255, (3, 6, 6, 3), np.uint8)
  for split in ("train", "val"):
    for name, image in zip(("a/0.png", "a/sub/1.png", "b/2.png"), pixels):
      local = tmp_path / "image.png"
      Image.fromarray(image).save(local)
      epath.Path(f"gs://{BUCKET}/images/{split}/{name}").write_bytes(local.read_bytes())
  root = f"gs://{BUCKET}/images/train"
  folder = sources.ImageFolderSource(root)
  assert folder.classes == ["a", "b"] and folder.files == ["a/0.png", "a/sub/1.png", "b/2.png"]
  assert list(folder.labels) == [0, 0, 1]
  np.testing.assert_array_equal(folder[1]["image"], pixels[1])  # PNG: lossless
  _, test = sources.default_eval_sources(f"image_folder:{root}")
  assert test["root"] == f"gs://{BUCKET}/images/val"


def test_tfds_data_dir_in_a_bucket(gcs_here, tmp_path, monkeypatch):
  """A tfds dataset prepared as ArrayRecords, copied into the bucket, read with data_dir=gs://:
  ArrayRecord's reader opens local files only (a URL hangs it), so the dataset's folder is
  mirrored to this host's disk once, then read there; a second source copies nothing."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import errors  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.data import sources  # pylint: disable=g-import-not-at-top
  from tests.test_data_sources import _make_tfds_builder  # pylint: disable=g-import-not-at-top
  prepared = tmp_path / "prepared"
  builder = _make_tfds_builder()(data_dir=str(prepared), file_format="array_record")
  builder.download_and_prepare()
  remote = epath.Path(f"gs://{BUCKET}/tfds")
  for local in prepared.rglob("*"):
    if local.is_file():
      (remote / local.relative_to(prepared)).write_bytes(local.read_bytes())
  monkeypatch.setenv("MIM_REFINER_TFDS_CACHE", str(tmp_path / "cache"))
  spec = {"name": "tfds", "dataset": builder.name, "split": "train", "data_dir": str(remote),
          "image_key": "img", "label_key": "cls"}
  src = sources.make_source(spec)
  assert len(src) == 6
  assert sorted(int(src[i]["label"]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
  mirrored = tmp_path / "cache" / BUCKET / "tfds" / builder.name
  assert any(p.name.startswith(f"{builder.name}-train.array_record") for p in mirrored.rglob("*"))
  stamp = {p: p.stat().st_mtime_ns for p in mirrored.rglob("*") if p.is_file()}
  sources.make_source(dict(spec, split="test"))  # everything is there: nothing copied again
  assert stamp == {p: p.stat().st_mtime_ns for p in mirrored.rglob("*") if p.is_file()}
  with pytest.raises(errors.UserError, match="not prepared in"):
    sources.make_source(dict(spec, dataset="imagenet2012"))
