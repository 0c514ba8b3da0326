"""mim-refiner-refine end to end on a tiny model (a few steps per stage), through its command line:
a stop in every phase and the rerun, the report's HTML, the memory plan, bad input."""

import base64
import html.parser
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mim_refiner_jax import memory
from mim_refiner_jax import refine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "synthetic:64,num_classes=4,image_size=24"
PHASES = ("setup", "plan", "stage2", "stage3", "evaluate", "export", "report")


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory):
  """A random ViT-mu (width 32, depth 2, patch 4, 16 px) in safetensors: what tests/tiny_config.py
  expects; refinement does not care how good it is."""
  from mim_refiner_jax.convert import checkpoints
  from mim_refiner_jax.models import vit
  kwargs = dict(width=32, depth=2, num_heads=2, patch_size=4, mlp_ratio=4.0, prenorm=True,
                pos_grid=4)
  variables = vit.ViT(**kwargs).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  path = str(tmp_path_factory.mktemp("mae") / "tiny.safetensors")
  checkpoints.save_torch(path, jax.tree.map(np.asarray, dict(variables)), kwargs,
                         layout="safetensors")
  return path


def _argv(mae, workdir, *extra):
  # 2 steps of 16 per stage (64 images, half an epoch); the monitor at the end of each stage.
  return ["--pretrained", mae, "--train", TRAIN, "--workdir", str(workdir), "--config",
          os.path.join(REPO, "tests", "tiny_config.py"), "--config.num_epochs=0.5",
          *extra]


def _phases(workdir):
  with open(os.path.join(workdir, "refine.json")) as f:
    return json.load(f)["phases"]


def _interrupt(*args, **kwargs):
  raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a phase


@pytest.fixture(scope="module")
def stopped_everywhere(tiny_mae, tmp_path_factory):
  """The command stopped once in every phase, rerun each time, then run twice more: returns
  (workdir, [captured output of each run], summary of the run that finished, of the rerun)."""
  workdir = tmp_path_factory.mktemp("refine") / "run"
  outputs, mp = [], pytest.MonkeyPatch()
  capture = io.StringIO()

  def call(*extra, status=0):
    import contextlib
    capture.seek(0)
    capture.truncate()
    with contextlib.redirect_stdout(capture):
      try:
        result = refine.main(_argv(tiny_mae, workdir, *extra))
      except SystemExit as e:
        result = e.code
    outputs.append(capture.getvalue())
    assert result == status or (status == "summary" and isinstance(result, dict)), (
        result, outputs[-1][-2000:])
    return result

  # Stages: the trainer's own stop (as SIGTERM / Ctrl-C do), one step into each stage.
  call("--stop-after-steps", "1")      # stage 2 stops at step 1
  call("--stop-after-steps", "1")      # stage 2 resumes and finishes, stage 3 stops at step 1
  from mim_refiner_jax import report as report_lib
  from mim_refiner_jax.convert import checkpoints
  from mim_refiner_jax.evaluation import suite
  for target, name in ((suite, "run"), (checkpoints, "save_torch"), (report_lib, "write")):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(target, name, _interrupt)
      call(status=130)                 # Ctrl-C in evaluate, export, report
  finished = call(status="summary")
  rerun = call(status="summary")
  del mp
  return workdir, outputs, finished, rerun


def test_stop_in_every_phase_then_rerun_redoes_nothing(stopped_everywhere):
  workdir, out, finished, rerun = stopped_everywhere
  assert "stopped: stage 2 stopped at a checkpoint" in out[0]
  assert "resuming stage 2" in out[1] and "stopped: stage 3 stopped at a checkpoint" in out[1]
  assert "resuming stage 3" in out[2] and "reusing stage2" in out[2]
  # Each stopped phase is rerun, the ones before it reused; nothing half-written is trusted.
  for run_output, stopped in zip(out[2:5], ("evaluate", "export", "report")):
    for before in PHASES[PHASES.index(stopped) + 1:]:
      assert f"{before} ..." not in run_output
  assert "reusing evaluate" in out[4] and "reusing export" in out[5]
  assert not os.path.exists(os.path.join(workdir, "export.partial"))
  # The last run reuses every phase and gives the same results and files.
  for phase in PHASES[1:]:
    assert f"reusing {phase}" in out[6], phase
    assert rerun["phases"][phase]["reused"]
  assert rerun["evaluation"] == finished["evaluation"]
  assert rerun["exports"] == finished["exports"]
  records = _phases(workdir)
  assert all("seconds" in records[p] for p in PHASES)


def test_run_names_data_plan_exports_and_progress(stopped_everywhere):
  workdir, out, finished, _ = stopped_everywhere
  text = out[5]
  assert f"training on {TRAIN} (64 images)" in text  # the refine command and the trainer
  assert "k-NN monitor: bank " + TRAIN in "".join(out)
  with open(os.path.join(workdir, "stage3", "run.json")) as f:
    info = json.load(f)
  assert info["training_source"] == TRAIN and info["knn_sets"]["test"].endswith("seed=1")
  assert "[refine " in text and "ETA" in text and "/7 " in "".join(out)
  assert finished["detected"]["family"] == "mae" and finished["detected"]["size"] == "mu"
  assert finished["plan"]["said"] == "fits as configured"
  names = {e["name"]: e for e in finished["exports"]}
  assert set(names) == {"Flax", "official refined .th", "safetensors", "timm"}
  from mim_refiner_jax.convert import checkpoints
  flax = checkpoints.load_flax(names["Flax"]["path"])
  for name in ("official refined .th", "safetensors", "timm"):
    assert names[name]["sha256"] == refine.sha256(names[name]["path"])
    other = checkpoints.load_pretrained(names[name]["path"])
    np.testing.assert_array_equal(other.variables["params"]["patch_embed"]["kernel"],
                                  flax.variables["params"]["patch_embed"]["kernel"])
  before = finished["evaluation"]["scalars"]["before"]
  assert set(before) >= {"knn/block1_cls/k5", "per_block/knn/block0", "per_block/knn/main"}


class _Html(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.images, self.headings, self.cells, self._in = [], [], [], None

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.images.append(dict(attrs)["src"])
    self._in = tag

  def handle_endtag(self, tag):
    self._in = None

  def handle_data(self, data):
    if self._in == "h2":
      self.headings.append(data)
    elif self._in == "td":
      self.cells.append(data)


def test_report_html_is_self_contained_and_complete(stopped_everywhere):
  workdir, _, finished, _ = stopped_everywhere
  parser = _Html()
  with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
    text = f.read()
  parser.feed(text)
  assert "http://" not in text and "https://" not in text  # nothing fetched from a network
  assert len(parser.images) == 2
  for src in parser.images:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    image.load()
    assert image.size[0] > 300 and image.size[1] > 300
  for heading in ("What was refined", "Config against the paper config", "Devices and memory plan",
                  "Wall time per phase", "Training curves",
                  "k-NN accuracy per block, before and after", "Exports",
                  "Warnings met during the run"):
    assert heading in parser.headings, heading
  assert any(h.startswith("Evaluation before / after") for h in parser.headings)
  cells = parser.cells
  for expected in (finished["detected"]["sha256"], "knn/block1_cls/k5", "per_block/knn/main",
                   "stage2", "stage3", "evaluate", "export", "Flax", "timm", "model.size",
                   "queue.size"):  # the config diff against configs/mae_l16.py
    assert expected in cells, expected
  for e in finished["exports"]:
    assert e["sha256"] in cells
  # The evaluation table is in percent: before, refined and delta of a k-NN accuracy.
  row = cells.index("knn/block1_cls/k5")
  before, refined, delta = (float(c) for c in cells[row + 1:row + 4])
  assert 0 <= before <= 100 and 0 <= refined <= 100
  assert abs(refined - before - delta) < 0.11
  # The warmup of this 2-step run is clipped: the trainer's warning is listed.
  assert any("warmup clipped" in c for c in cells)
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    md = f.read()
  assert "![training curves" in md and os.path.exists(os.path.join(workdir, "report_curves.png"))


def test_memory_plan_applies_the_first_change_that_fits(tiny_mae, tmp_path):
  """Devices a hair too small for the run as configured: the planner's first candidate change
  (memory.candidate_changes: remat here, the temporaries dominate) fits and is applied."""
  from mim_refiner_jax import progress as progress_lib
  run = refine.Run(refine.parse_args(_argv(tiny_mae, tmp_path / "w")),
                   progress_lib.Progress([]))
  setup = run.setup()  # the configs of the run above: its plan compile is in the cache
  configs, kwargs = setup["configs"], setup["detected"]["vit_kwargs"]
  as_is = memory.plan(configs[3], vit_kwargs=kwargs)
  gib = as_is.total / memory.GIB / (1 - memory.HEADROOM) * 0.999
  result = refine.plan_memory(configs, kwargs, jax.devices(), gib, log=lambda *a: None)
  first = memory.candidate_changes(configs[3], jax.device_count(), as_is)[0]
  assert result["changes"] == first and result["changes"]
  assert f"applied {memory.describe(first)}" in result["said"]
  assert "does not fit as configured" in result["said"]


def _one_line_error(capsys, argv, status=2):
  with pytest.raises(SystemExit) as info:
    refine.main(argv)
  err = capsys.readouterr().err
  assert info.value.code == status and err.count("\n") == 1 and err.startswith("error: "), err
  return err


def test_bad_input_is_one_line_and_leaves_nothing_trusted(tiny_mae, tmp_path, capsys):
  damaged = tmp_path / "mae.safetensors"
  with open(tiny_mae, "rb") as f:
    damaged.write_bytes(f.read()[:5000])
  workdir = tmp_path / "w"
  err = _one_line_error(capsys, _argv(str(damaged), workdir))
  assert f"--pretrained={damaged} cannot be read" in err
  assert not workdir.exists()  # nothing written before the inputs were read
  empty = tmp_path / "empty" / "train"
  (empty / "a").mkdir(parents=True)
  err = _one_line_error(capsys, [a if a != TRAIN else f"image_folder:{empty}"
                                 for a in _argv(tiny_mae, workdir)])
  assert "no images" in err and "--train" in err
  assert not workdir.exists()
  # Nothing fits 1 KiB per device: the planner's table is printed, then one line; the plan is
  # not recorded and no stage started. (The config of the runs above: the plan as configured and
  # with remat come from the compilation cache.)
  err = _one_line_error(capsys, _argv(tiny_mae, workdir, "--device-memory-gib", "1e-6"))
  assert "no change the planner knows" in err
  assert set(_phases(workdir)) == {"setup"} and not (workdir / "stage2").exists()
  err = _one_line_error(capsys, _argv(tiny_mae, workdir, "--config.batch_sizee=8"))
  assert "has no field batch_sizee; did you mean batch_size?" in err


def test_stage3_trains_on_its_stage2_data_unless_given(tmp_path, capsys):
  """Item 6 of issue 22: stage 3 of configs/demo.py after a stage 2 on other data trained on
  MNIST without a word; now it takes the stage-2 data (and the auto k-NN sets follow), or warns
  when data.train was given and differs."""
  from mim_refiner_jax import demo_config
  from mim_refiner_jax import train
  s2 = tmp_path / "s2"
  s2.mkdir()
  folder = f"image_folder:{tmp_path / 'mine' / 'train'}"
  (s2 / "run.json").write_text(json.dumps({"config": {"data": {"train": folder}}}))
  config = demo_config.get_config("stage=3")
  config.unlock()
  config.init.stage2_workdir = str(s2)
  config.lock()
  assert config.data.train.startswith("mnist") and config.evals.knn.train == "auto"
  taken = train.adopt_stage2_data(config, data_train_given=False)
  assert taken.data.train == folder and config.data.train.startswith("mnist")
  assert "taken from the stage-2 workdir" in capsys.readouterr().out
  (tmp_path / "mine" / "val").mkdir(parents=True)
  follows = train.resolve_eval_sources(taken)  # the monitor follows the data it trains on
  assert follows.evals.knn.test == f"image_folder:{tmp_path / 'mine' / 'val'}"
  kept = train.adopt_stage2_data(config, data_train_given=True)
  assert kept.data.train == config.data.train
  assert "warning: stage 3 trains on config.data.train=mnist" in capsys.readouterr().out


def test_config_of_the_files_family_and_size():
  """The paper config of a family and size; for a size without one, the family's ViT-L config
  with the file's size and patch and the head blocks scaled to its depth, said so."""
  def detected(size, width, depth, heads, patch, grid, prenorm=True):
    return dict(family="mae" if prenorm else "d2v2", size=size, patch_size=patch,
                vit_kwargs=dict(width=width, depth=depth, num_heads=heads, patch_size=patch,
                                mlp_ratio=4.0, prenorm=prenorm, pos_grid=grid))
  configs, paper, chosen = refine.choose_configs("", detected("huge", 1280, 32, 16, 14, 16, False))
  assert chosen.startswith("configs/d2v2_h14.py") and configs[3].to_dict() == paper[3].to_dict()
  configs, paper, chosen = refine.choose_configs("", detected("base", 768, 12, 12, 16, 14))
  assert "derived from configs/mae_l16.py" in chosen
  assert configs[2].model.size == "base" and configs[3].model.patch_size == 16
  # L/16's heads on blocks 22..16 of 24 (1..7 before the last) -> 1..4 before the last of 12.
  assert configs[3].heads.names == ",".join(
      f"nnclr_temp02_cls{b}" for b in ["", 10, 9, 8, 7])
  assert [d[0] for d in refine.config_diff(configs[3], paper[3])] == [
      "heads.names", "model.num_heads", "model.size"]


def test_other_backbones_take_their_configs():
  """DINOv2 with 4 registers and I-JEPA files take their configs/; any other ViT with timm options
  takes configs/timm_vit.py at its size and patch, its heads and k-NN monitor on the mean patch
  token when it has no CLS token; the family comes from the file's format and options."""
  kw = dict(width=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0, prenorm=True,
            pos_grid=14)
  assert refine.family_of("timm", kw) == "mae"
  assert refine.family_of("dinov2", dict(kw, reg_tokens=4, init_values=1e-5)) == "dinov2_reg4"
  assert refine.family_of("ijepa", dict(kw, class_token=False, global_pool="avg")) == "ijepa"
  assert refine.family_of("timm", dict(kw, reg_tokens=2)) == "timm"
  assert refine.family_of("data2vec2", dict(kw, prenorm=False)) == "d2v2"
  _, _, chosen = refine.choose_configs("", dict(
      family="dinov2_reg4", size="large", patch_size=14, format="dinov2", path="f",
      vit_kwargs=dict(kw, width=1024, depth=24, num_heads=16, patch_size=14, reg_tokens=4)))
  assert chosen.startswith("configs/dinov2_l14_reg4.py")
  no_cls = dict(kw, class_token=False, global_pool="avg")
  configs, paper, chosen = refine.choose_configs("", dict(
      family="timm", size="base", patch_size=16, format="timm", path="f", vit_kwargs=no_cls))
  assert paper is None and "timm_vit.py:size=base,patch=16,pooling=mean_patch" in chosen
  assert configs[3].evals.knn.features == "block11_patch_mean,patch_mean"
  assert configs[3].model.size == "base" and configs[2].stage == 2
