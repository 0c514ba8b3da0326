"""Checkpoints as real trainers write them, head counts, and damaged files.

* A data2vec 2.0 file as fairseq writes it (checkpoint_utils.save_state -> torch.save): `args` a
  real `argparse.Namespace`, `cfg` a real omegaconf `DictConfig` built from dataclasses (pickled
  with omegaconf's Metadata/ContainerMetadata, defaultdict, typing.Any, enum members, nodes),
  numpy values in `extra_state` and fp16 weights. The dataclasses live in stand-in `fairseq.*`
  modules so the pickle names them as a real file does; the reader must not need them.
* Official reference training checkpoints: ctor_kwargs spell `num_attn_heads` (refiner_facts 3.5).
* Widths outside the size table: the head count from the file (our own timm / MAE exports carry
  it in an extra zip record), or `num_heads` / the trainer's `model.num_heads`; contradictions are
  errors naming both values.
* Truncated torch files and damaged Flax checkpoints: one error naming the file, in the API and
  in tools/convert_weights.py (exit 2, no traceback).
"""

import argparse
import collections
import dataclasses
import enum
import functools
import importlib.util
import os
import sys
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import omegaconf
import pytest
import torch

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.convert import mapping
from mim_refiner_jax.convert import torch_files
from mim_refiner_jax.models.vit import ViT
from tests import test_parity_kappamodules as kappa

WIDTH, DEPTH, HEADS, PATCH, IMG = 48, 2, 3, 4, 16  # width 48 is not in the size table
FS = kappa.FS


def _kappa_model(prenorm):
  model = kappa.KappaVit(prenorm=prenorm, img=IMG, patch=PATCH, dim=WIDTH, depth=DEPTH,
                         heads=HEADS)
  return kappa.randomize(model, seed=7)


def _load_tool(name):
  return importlib.import_module(f"mim_refiner_jax.tools.{name}")


@pytest.fixture(scope="module")
def convert_weights():
  return _load_tool("convert_weights")


# --------------------------------------------------------------------------- fairseq data2vec 2.0
def _fairseq_modules(monkeypatch):
  """Stand-in fairseq modules holding the config dataclasses and enums, so that pickle records
  them under fairseq.* names as in a real checkpoint (the reader never imports them)."""
  mods = {}
  for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.constants",
               "fairseq.models", "fairseq.models.data2vec", "fairseq.models.data2vec.data2vec2",
               "fairseq.dataclass.configs"):
    mods[name] = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, mods[name])

  def place(obj, module):
    obj.__module__ = module
    setattr(mods[module], obj.__qualname__, obj)
    return obj

  modality = place(enum.Enum("Modality", {"AUDIO": 1, "IMAGE": 2, "TEXT": 3}),
                   "fairseq.models.data2vec.data2vec2")
  log_format_enum = place(enum.Enum("LogFormat", {"json": "json", "tqdm": "tqdm"}),
                     "fairseq.dataclass.constants")

  @dataclasses.dataclass
  class D2vImageConfig:
    type: modality = modality.IMAGE
    patch_size: int = 16
    embed_dim: int = 768
    prenet_depth: int = 0

  @dataclasses.dataclass
  class D2vModalitiesConfig:
    image: D2vImageConfig = dataclasses.field(default_factory=D2vImageConfig)

  @dataclasses.dataclass
  class Data2VecMultiConfig:
    _name: str = "data2vec_multi"
    depth: int = 8
    num_heads: int = 12
    embed_dim: int = 768
    norm_eps: float = 1e-6
    layer_norm_first: bool = False
    modalities: D2vModalitiesConfig = dataclasses.field(default_factory=D2vModalitiesConfig)
    loss_beta: float = 0.0
    ema_decay: float = 0.999
    supported_modality: Optional[modality] = None

  @dataclasses.dataclass
  class CommonConfig:
    fp16: bool = True
    log_format: Optional[log_format_enum] = log_format_enum.json
    seed: int = 1
    user_dir: Optional[str] = None

  @dataclasses.dataclass
  class FairseqConfig:
    common: CommonConfig = dataclasses.field(default_factory=CommonConfig)
    model: Any = None
    task: Any = None

  for cls, module in ((D2vImageConfig, "fairseq.models.data2vec.data2vec2"),
                      (D2vModalitiesConfig, "fairseq.models.data2vec.data2vec2"),
                      (Data2VecMultiConfig, "fairseq.models.data2vec.data2vec2"),
                      (CommonConfig, "fairseq.dataclass.configs"),
                      (FairseqConfig, "fairseq.dataclass.configs")):
    cls.__qualname__ = cls.__name__
    place(cls, module)
  return Data2VecMultiConfig, FairseqConfig, modality


def _fairseq_file(path, monkeypatch, refined_sd):
  model_cfg_cls, cfg_cls, modality = _fairseq_modules(monkeypatch)
  cfg = omegaconf.OmegaConf.structured(cfg_cls)
  cfg.model = omegaconf.OmegaConf.structured(model_cfg_cls(
      depth=DEPTH, num_heads=HEADS, embed_dim=WIDTH, supported_modality=modality.IMAGE))
  cfg.model.modalities.image.patch_size = PATCH
  cfg.model.modalities.image.embed_dim = WIDTH
  cfg.task = {"_name": "mae_image_pretraining", "data": "/datasets/imagenet", "input_size": 224}
  model = kappa.fairseq_checkpoint(refined_sd)["model"]  # fairseq names, decoder, _ema
  state = {
      "args": argparse.Namespace(arch="data2vec_multi", lr=[0.001], fp16=True),
      "cfg": cfg,
      "model": {k: (v.half() if torch.is_tensor(v) else v) for k, v in model.items()},
      "criterion": {},
      "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                             "lr_scheduler_state": {"best": None}, "num_updates": np.int64(500)}],
      "task_state": {},
      "extra_state": {"epoch": 3, "previous_training_time": np.float64(12.5),
                      "train_iterator": {"epoch": 3, "iterations_in_epoch": np.int64(7)},
                      "metrics": {"loss_scale": np.array([128.0], np.float32)}},
      "last_optimizer_state": {"state": {}},
  }
  torch.save(state, path)  # fairseq's torch_persistent_save
  monkeypatch.undo()  # the reader must not need (or find) the fairseq modules


def test_real_fairseq_data2vec2_file(tmp_path, monkeypatch):
  model = _kappa_model(prenorm=False)
  sd16 = {k: v.half() for k, v in model.state_dict().items()}
  _fairseq_file(tmp_path / "d2v2.pt", monkeypatch, sd16)
  assert "fairseq" not in sys.modules
  raw = torch_files.load(tmp_path / "d2v2.pt")
  cfg = torch_files.config_to_python(raw["cfg"])
  assert cfg["model"]["num_heads"] == HEADS and cfg["model"]["depth"] == DEPTH
  assert cfg["model"]["modalities"]["image"]["patch_size"] == PATCH
  assert cfg["model"]["supported_modality"] == 2 and cfg["common"]["log_format"] == "json"
  assert cfg["task"]["data"] == "/datasets/imagenet"
  assert torch_files.config_to_python(raw["args"]) == {"arch": "data2vec_multi", "lr": [0.001],
                                                       "fp16": True}

  pre = checkpoints.load_pretrained(tmp_path / "d2v2.pt")
  assert pre.info["format"] == "data2vec2" and pre.info["num_heads_from"] == "file"
  assert pre.vit_kwargs == dict(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                                mlp_ratio=4.0, prenorm=False, pos_grid=IMG // PATCH)
  torch.save(sd16, tmp_path / "plain.pth")  # the same weights, saved plainly
  plain = checkpoints.load_pretrained(tmp_path / "plain.pth", family="d2v2", num_heads=HEADS)
  assert plain.vit_kwargs == pre.vit_kwargs
  apply = jax.jit(functools.partial(ViT(**pre.vit_kwargs).apply, blocks=tuple(range(DEPTH))))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, IMG, IMG, 3)), jnp.float32)
  out, aux = apply(pre.variables, images)
  want, want_aux = apply(plain.variables, images)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(aux["block_cls"][1]), np.asarray(want_aux["block_cls"][1]))
  # ... and that forward is the kappamodules PostnormVit's on the fp16-rounded weights.
  ref = kappa.KappaVit(prenorm=False, img=IMG, patch=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS)
  ref.load_state_dict({k: v.float() for k, v in sd16.items()})
  ref_out, _ = kappa.run_torch(ref.eval(), torch.from_numpy(np.array(images).transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)

  with pytest.raises(ValueError, match=r"num_heads=4 \(override\) contradicts the file, which "
                     r"records num_heads=3"):
    checkpoints.load_pretrained(tmp_path / "d2v2.pt", num_heads=4)


def _raw_pickle(path, body: bytes):
  path.write_bytes(b"\x80\x02" + body)
  return path


def test_unpickler_allows_only_inert_forms_of_the_new_globals(tmp_path):
  # defaultdict whose factory is anything but a plain container type is refused ...
  evil = _raw_pickle(tmp_path / "dd.pth", b"ccollections\ndefaultdict\nctorch._utils\n"
                     b"_rebuild_tensor_v2\n\x85R.")
  with pytest.raises(torch_files.UnsafePickleError, match="defaultdict with factory"):
    torch_files.load(evil)
  ok = _raw_pickle(tmp_path / "dd_ok.pth", b"ccollections\ndefaultdict\nc__builtin__\ndict\n\x85R.")
  with pytest.raises(torch_files.CheckpointFormatError, match="bad magic"):  # read, then rejected
    torch_files.load(ok)
  # ... getattr only names a member of a recorded (stub) class, never a real attribute ...
  evil = _raw_pickle(tmp_path / "ga.pth", b"c__builtin__\ngetattr\ncbuiltins\nset\n"
                     b"X\x03\x00\x00\x00pop\x86R.")
  with pytest.raises(torch_files.UnsafePickleError, match="getattr"):
    torch_files.load(evil)
  # ... and an enum member pickled as getattr(Enum, name) is an inert record.
  member = torch_files._stub_getattr(torch_files._stub_class("fairseq.x.Modality"), "IMAGE")  # pylint: disable=protected-access
  assert torch_files.config_to_python(member) == "IMAGE"


# --------------------------------------------------------------------------- head counts
def test_official_training_checkpoint_num_attn_heads(tmp_path):
  sd = _kappa_model(prenorm=False).state_dict()
  ctor = dict(kind="vit.postnorm_vit", dim=WIDTH, depth=DEPTH, num_attn_heads=HEADS,
              patch_size=PATCH, input_shape=(3, IMG, IMG))
  torch.save({"state_dict": sd, "ctor_kwargs": ctor, "ckpt": "last", "abs_ckpt": {"epoch": 20},
              "stage_id": "abc"}, tmp_path / "encoder cp=last model.th")
  pre = checkpoints.load_pretrained(tmp_path / "encoder cp=last model.th")
  assert pre.vit_kwargs["num_heads"] == HEADS and pre.info["num_heads_from"] == "file"
  assert pre.info["family"] == "postnorm"
  with pytest.raises(ValueError, match=r"num_heads=6 \(override\) contradicts the file, which "
                     r"records num_attn_heads=3: drop the override or set it to 3"):
    checkpoints.load_pretrained(tmp_path / "encoder cp=last model.th", num_heads=6)
  torch.save({"state_dict": sd, "ctor_kwargs": dict(ctor, patch_size=8)}, tmp_path / "bad.th")
  with pytest.raises(ValueError, match="records patch_size=8 but its patch embedding has patch "
                     "size 4"):
    checkpoints.load_pretrained(tmp_path / "bad.th")


@pytest.mark.parametrize("layout", ["timm", "mae"])
def test_own_timm_export_of_unknown_width_reads_back(tmp_path, layout):
  pre = checkpoints.load_pretrained(_write_refined(tmp_path, prenorm=True))
  checkpoints.save_torch(tmp_path / "w.pth", pre.variables, pre.vit_kwargs, layout=layout)
  back = checkpoints.load_pretrained(tmp_path / "w.pth")  # heads from our extra zip record
  assert back.vit_kwargs == pre.vit_kwargs and back.info["num_heads_from"] == "file"
  with pytest.raises(ValueError, match="contradicts the file, which records num_heads=3"):
    checkpoints.load_pretrained(tmp_path / "w.pth", num_heads=4)
  # Re-saved by torch, the state dict has no place for the head count: the error says how.
  torch.save(torch.load(tmp_path / "w.pth", weights_only=True), tmp_path / "resaved.pth")
  with pytest.raises(ValueError, match=r"cannot tell the number of attention heads.*width 48.*"
                     r"--num-heads N.*--config.model.num_heads=N"):
    checkpoints.load_pretrained(tmp_path / "resaved.pth")
  again = checkpoints.load_pretrained(tmp_path / "resaved.pth", num_heads=HEADS)
  assert again.vit_kwargs == pre.vit_kwargs
  for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(pre.variables)):
    np.testing.assert_array_equal(a, b)


def _write_refined(tmp_path, prenorm):
  path = tmp_path / f"refined_{prenorm}.th"
  torch.save({"state_dict": _kappa_model(prenorm).state_dict(),
              "ctor_kwargs": dict(dim=WIDTH, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)},
             path)
  return path


def test_trainer_passes_model_num_heads(tmp_path, monkeypatch):
  from mim_refiner_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  pre = checkpoints.load_pretrained(_write_refined(tmp_path, prenorm=True))
  checkpoints.save_torch(tmp_path / "ours.pth", pre.variables, pre.vit_kwargs, layout="mae")
  # As torch re-saves it: no record of the head count left.
  torch.save(torch.load(tmp_path / "ours.pth", weights_only=True), tmp_path / "mae.pth")
  seen = []

  class Reached(Exception):
    pass

  def stop(config, vit_kwargs, where):  # stop right after the weights are read
    seen.append(vit_kwargs)
    raise Reached

  monkeypatch.setattr(train_lib, "check_architecture", stop)
  config = tiny_config.get_config()
  config.model.size = ""
  config.init.pretrained = str(tmp_path / "mae.pth")
  config.model.num_heads = 0
  with pytest.raises(ValueError, match="model.num_heads"):
    train_lib.train(config, str(tmp_path / "wd0"))
  config.model.num_heads = HEADS
  with pytest.raises(Reached):
    train_lib.train(config, str(tmp_path / "wd1"))
  assert seen[0]["num_heads"] == HEADS and seen[0]["width"] == WIDTH


# --------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.98])
def test_truncated_torch_file_is_one_clear_error(tmp_path, keep, convert_weights, capsys):
  path = _write_refined(tmp_path, prenorm=True)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(torch_files.CheckpointFormatError,
                     match=f"{path}.* is damaged or truncated .*copy or download it again"):
    checkpoints.load_pretrained(path)
  assert convert_weights.main(["--input", str(path), "--output", str(tmp_path / "o"),
                               "--to", "flax"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {path}") and "damaged or truncated" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_damaged_flax_checkpoint_is_one_clear_error(tmp_path, convert_weights, capsys):
  pre = checkpoints.load_pretrained(_write_refined(tmp_path, prenorm=True))
  checkpoints.save_flax(tmp_path / "flax", pre.variables, pre.vit_kwargs)
  files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "flax" / "variables")
           for f in names if os.sep + "d" + os.sep in os.path.join(root, f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  with pytest.raises(torch_files.CheckpointFormatError,
                     match=r"flax/variables: the Flax checkpoint's arrays cannot be read.*"
                     r"re-create it"):
    checkpoints.load_pretrained(tmp_path / "flax")
  assert convert_weights.main(["--input", str(tmp_path / "flax"), "--output",
                               str(tmp_path / "o.th"), "--to", "refined"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  (tmp_path / "flax" / "vit_kwargs.json").write_text("{not json")
  with pytest.raises(torch_files.CheckpointFormatError, match="vit_kwargs.json is damaged"):
    checkpoints.load_pretrained(tmp_path / "flax")


def test_convert_weights_user_mistakes_are_one_line(tmp_path, convert_weights, capsys):
  path = _write_refined(tmp_path, prenorm=True)
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  cases = [
      (["--input", str(tmp_path / "missing.pth")], "does not exist"),
      (["--input", str(tmp_path / "junk.pth")], "unknown file format"),
      (["--input", str(path), "--num-heads", "4"], "contradicts the file"),
      (["--input", str(path), "--patch-size", "8"], "patch_size=8"),
  ]
  for args, words in cases:
    code = convert_weights.main(args + ["--output", str(tmp_path / "out.th"), "--to", "refined"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err, (args, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
