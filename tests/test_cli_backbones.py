"""Stage 2 -> stage 3 through the real command line on the backbones of issue 21, and the config
checks that run before anything compiles.

Two tiny timm-built encoders (mu size, patch 4, 16 px): a DINOv2-style one with registers and
LayerScale saved as a flat timm state dict, and an I-JEPA checkpoint without CLS token
({"encoder", "target_encoder"} with `module.` keys). Each runs 2 steps of stage 2 and 2 of stage 3
with its heads' pooling (`cls` + `registers`; `mean_patch`), stage 3 with the k-NN monitor on the
same poolings; the export is the timm layout (the official .th cannot hold registers or a
missing CLS).
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mim_refiner_jax import config as config_lib
from mim_refiner_jax import errors
from mim_refiner_jax import train as train_lib
from mim_refiner_jax.convert import checkpoints
from tests import tiny_config
from tests.test_train import CONFIG, ROOT


def _timm(**kwargs):
  return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                           num_classes=0,
                           norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                           **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("backbones")
  torch.manual_seed(0)
  reg = _timm(reg_tokens=2, init_values=1e-5, no_embed_class=True)
  torch.save(reg.state_dict(), tmp / "reg2_ls.pth")
  jepa = {f"module.{k}": v for k, v in
          _timm(class_token=False, global_pool="avg", fc_norm=False).state_dict().items()}
  torch.save({"encoder": jepa, "target_encoder": jepa, "epoch": 1}, tmp / "ijepa.pth.tar")
  return tmp


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen([sys.executable, "-m", "mim_refiner_jax.train", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


RUNS = {  # name: (file, extra flags)
    "registers": ("reg2_ls.pth", ["--config.heads.pooling=cls,registers",
                                  "--config.evals.knn.features=block1_registers,cls"]),
    "no_cls": ("ijepa.pth.tar", ["--config.heads.pooling=mean_patch",
                                 "--config.evals.knn.features=block1_patch_mean,patch_mean"]),
}


def test_stage2_then_stage3_on_registers_and_no_cls_encoders(files, tmp_path):
  common = ["--config.num_epochs=0.5", "--config.warmup_epochs=0", "--config.data.num_local=1"]
  # Stage 2 without the k-NN monitor (one compile less); stage 3 monitors the heads' poolings.
  procs = {name: _run([f"--config={CONFIG}:stage=2,knn=false", f"--workdir={tmp_path / name}_s2",
                       f"--config.init.pretrained={files / file}", *common, extra[0]])
           for name, (file, extra) in RUNS.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (name, err[-3000:])
  procs = {name: _run([f"--config={CONFIG}:stage=3", f"--workdir={tmp_path / name}_s3",
                       f"--config.init.stage2_workdir={tmp_path / name}_s2", *common, *extra])
           for name, (_, extra) in RUNS.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (name, err[-3000:])
  for name, (_, extra) in RUNS.items():
    metrics = [json.loads(line) for line in open(tmp_path / f"{name}_s3" / "metrics.jsonl")]
    keys = set().union(*metrics)
    feature = extra[1].split("=")[1].split(",")[0]
    assert f"knn/{feature}" in keys and any(k.startswith("knn/head/") for k in keys), keys
    export = tmp_path / f"{name}_s3" / "export"
    assert not (export / "encoder_refined.th").exists()
    back = checkpoints.load_pretrained(export / "encoder_timm.pth")
    assert back.vit_kwargs == checkpoints.load_pretrained(files / RUNS[name][0]).vit_kwargs


def _config(**fields):
  config = tiny_config.get_config("stage=2,knn=false")
  config.init.pretrained = "unused"
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


KW = dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_ratio=4.0, prenorm=True, pos_grid=4)


@pytest.mark.parametrize("fields,kwargs,words", [
    (dict(**{"heads.names": "nnclr_temp02_cls,nnclr_temp02_cls99"}), {},
     "reads block 99, but the encoder has 2 blocks"),
    ({}, dict(class_token=False, global_pool="avg"), "--config.heads.pooling=mean_patch"),
    (dict(**{"heads.pooling": "registers"}), {}, "register tokens, but the encoder has none"),
    (dict(**{"data.local_size": 10}), {}, "config.data.local_size=10 is not a multiple of the "
     "patch size 4: use 8 or 12"),
    (dict(**{"model.vit_options": {"reg_tokens": 4}}), dict(reg_tokens=2),
     "config.model.vit_options.reg_tokens=4 but the weights have reg_tokens=2"),
])
def test_heads_and_crops_against_the_model_are_one_line(fields, kwargs, words):
  with pytest.raises(errors.UserError) as e:
    config_lib.check_model_fit(_config(**fields), dict(KW, **kwargs))
  assert words in str(e.value) and "\n" not in str(e.value)


def test_queue_and_derived_crop_sizes():
  with pytest.raises(errors.UserError, match="queue.size=8 is smaller than the global batch"):
    train_lib.validate_config(_config(**{"queue.size": 8}))
  for patch, sizes in ((14, (224, 98)), (16, (224, 96)), (8, (224, 96))):
    config = _config(**{"data.global_size": 0, "data.local_size": 0, "model.patch_size": patch})
    config = config_lib.resolve_crop_sizes(config)
    assert (config.data.global_size, config.data.local_size) == sizes
  with pytest.raises(errors.UserError, match="config.model.patch_size is 0"):
    config_lib.resolve_crop_sizes(_config(**{"data.global_size": 0, "model.patch_size": 0}))
