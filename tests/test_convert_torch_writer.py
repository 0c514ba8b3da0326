"""PyTorch files written without torch (convert/torch_writer.py) vs files written by torch.save.

Third-party truth: torch 2.13 itself (`torch.load(weights_only=True)`, also with mmap) and the
models the files are meant for, timm's VisionTransformer (MAE / MAWS layouts) and the kappamodules
PrenormVit / PostnormVit of the hub (refined layout), loaded with `load_state_dict(strict=True)`.
For each layout and dtype the test starts from a torch model whose state dict torch.save writes
in that dtype, converts that file with our reader, writes it back with our writer, and requires:
the same keys, dtypes and bits as the torch-written file, the same forward (exactly: same weights,
same torch model), and our reader reading our file bit for bit. The MAE CLS position row is zero,
as in the released files (refiner_facts.md 3.1), so the timm layouts can be compared bit for bit.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.convert import torch_files
from tests import test_parity_kappamodules as kappa
from tests import test_parity_timm as timm_parity

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _torch_model(layout, prenorm=True):
  if layout == "refined":
    return kappa.randomize(kappa.KappaVit(prenorm=prenorm), seed=4)
  model = timm_parity.randomize(timm_parity.make_timm(timm_parity.IMG), seed=5)
  with torch.no_grad():
    model.pos_embed[:, 0].zero_()  # MAE / MAWS files have a zero CLS position row
  return model


def _fresh(layout, prenorm=True):
  if layout == "refined":
    return kappa.KappaVit(prenorm=prenorm).eval()
  return timm_parity.make_timm(timm_parity.IMG)


def _wrap(layout, sd, heads):
  if layout == "refined":
    return {"state_dict": sd, "ctor_kwargs": dict(patch_size=kappa.PATCH, dim=kappa.WIDTH,
                                                  depth=kappa.DEPTH, num_heads=heads)}
  return {"model": sd} if layout == "mae" else sd


def _unwrap(layout, obj):
  return obj["state_dict"] if layout == "refined" else obj["model"] if layout == "mae" else obj


def _forward(model, sd, images):
  model.load_state_dict(sd, strict=True)
  with torch.no_grad():
    return (model(images) if isinstance(model, kappa.KappaVit)
            else model.forward_features(images)).numpy()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout,prenorm", [("refined", True), ("refined", False), ("timm", True),
                                            ("mae", True)],
                         ids=["refined-pre", "refined-post", "timm", "mae"])
def test_written_without_torch_equals_torch_save(tmp_path, layout, prenorm, dtype):
  model = _torch_model(layout, prenorm)
  sd = {k: v.to(DTYPES[dtype]) for k, v in model.state_dict().items()}
  torch.save(_wrap(layout, sd, kappa.HEADS), tmp_path / "torch.pth")
  pre = checkpoints.load_pretrained(tmp_path / "torch.pth")
  checkpoints.save_torch(tmp_path / "ours.pth", pre.variables, pre.vit_kwargs, layout=layout,
                         dtype=dtype)

  theirs = _unwrap(layout, torch.load(tmp_path / "torch.pth", weights_only=True))
  ours_obj = torch.load(tmp_path / "ours.pth", weights_only=True)
  ours = _unwrap(layout, ours_obj)
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
    assert torch.equal(ours[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
  if layout == "refined":
    assert ours_obj["ctor_kwargs"]["num_heads"] == kappa.HEADS
  mmapped = _unwrap(layout, torch.load(tmp_path / "ours.pth", weights_only=True, mmap=True))
  assert all(torch.equal(mmapped[k], v) for k, v in ours.items())  # 64-byte aligned storages

  images = torch.randn(2, 3, kappa.IMG, kappa.IMG, generator=torch.Generator().manual_seed(0))
  np.testing.assert_array_equal(_forward(_fresh(layout, prenorm), ours, images),
                                _forward(_fresh(layout, prenorm), theirs, images))

  back = _unwrap(layout, torch_files.load(tmp_path / "ours.pth"))  # our reader, bit for bit
  for k, v in theirs.items():
    got = np.asarray(back[k])
    assert got.dtype.itemsize == v.element_size() and got.shape == tuple(v.shape), k
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8),
                                  v.reshape(-1).view(torch.uint8).numpy(), err_msg=k)


def test_writer_handles_odd_values(tmp_path):
  from mim_refiner_jax.convert import torch_writer  # pylint: disable=g-import-not-at-top
  base = np.arange(12, dtype=np.float32).reshape(3, 4)
  obj = {"t": base.T, "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float16),
         "i": np.arange(3), "b": np.array([True, False]), "meta": {"k": (1, 2.0, "x", None)}}
  torch_writer.save(obj, tmp_path / "o.pth")
  got = torch.load(tmp_path / "o.pth", weights_only=True)
  np.testing.assert_array_equal(got["t"].numpy(), base.T)
  assert got["scalar"].shape == () and float(got["scalar"]) == 2.5
  assert got["empty"].shape == (0, 3) and got["empty"].dtype == torch.float16
  assert got["i"].dtype == torch.int64 and got["b"].dtype == torch.bool
  assert got["meta"] == {"k": (1, 2.0, "x", None)}
  with pytest.raises(TypeError, match="cannot write a object"):
    torch_writer.save({"x": object()}, tmp_path / "bad.pth")
  assert not os.path.exists(tmp_path / "bad.pth") and not os.path.exists(tmp_path / "bad.pth.tmp")


def test_package_imports_and_converts_without_torch(tmp_path):
  """Every module of the package imports, and a conversion to each torch layout runs, with
  torch (and torchvision, timm) made unimportable; torch then reads what was written."""
  src = tmp_path / "mae.pth"
  model = _torch_model("mae")
  torch.save({"model": model.state_dict()}, src)
  code = f"""
import sys
class BlockTorch:  # any import of these fails; sys.modules stays free of them (scipy checks it)
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "torchvision", "timm", "kappamodules"):
      raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
import importlib, pkgutil
import mim_refiner_jax
for m in pkgutil.walk_packages(mim_refiner_jax.__path__, "mim_refiner_jax."):
  importlib.import_module(m.name)
from mim_refiner_jax.tools import convert_weights
for to, dtype in (("refined", "bfloat16"), ("timm", "float16"), ("mae", "float32")):
  out = {str(tmp_path)!r} + "/out_" + to + ".pth"
  assert convert_weights.main(["--input", {str(src)!r}, "--output", out, "--to", to,
                               "--dtype", dtype]) == 0
assert "torch" not in sys.modules and "kappamodules" not in sys.modules
print("torch-free ok")
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root), check=False,
                        timeout=300)
  assert proc.returncode == 0 and "torch-free ok" in proc.stdout, proc.stderr[-3000:]
  images = torch.randn(2, 3, kappa.IMG, kappa.IMG, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = model.forward_features(images).numpy()
  for to, tol in (("refined", None), ("timm", 1e-2), ("mae", 1e-5)):
    obj = torch.load(tmp_path / f"out_{to}.pth", weights_only=True)
    if to == "refined":
      assert {v.dtype for v in obj["state_dict"].values()} == {torch.bfloat16}
      continue  # refined naming: loaded into kappamodules in the test above
    got = _forward(_fresh(to), {k: v.float() for k, v in _unwrap(to, obj).items()}, images)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
