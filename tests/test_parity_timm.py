"""Pre-norm parity: timm's VisionTransformer (the MAE / MAWS encoder) vs our converted Flax ViT.

A timm model with random weights (LayerNorms, biases, CLS token and the CLS position row
randomised too) is saved in the MAE layout ({"model": sd} .pth) and the MAWS layout (flat .pt),
converted with `load_pretrained` (torch-free reader), and run in Flax. Compared: final features
(after the final norm) and the raw CLS token of every block (timm forward hooks on blocks[i];
refiner_facts.md section 2). fp32 tolerance: atol 1e-5 + rtol 1e-5 (measured max abs diff about
4e-6 on activations of size ~5).

Non-native grid: timm's own `dynamic_img_size` resizes with antialias=True, which is not what
MIM-Refiner does (section 1.1: torch bicubic, align_corners=False, no antialias). So the torch side
here is a second timm model built for the small image whose pos table we resize ourselves with
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`; our ViT resizes internally.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.models.vit import ViT

IMG, SMALL, PATCH, WIDTH, DEPTH, HEADS = 32, 16, 4, 32, 2, 2  # "mu" size, grid 8 (4 when small)
ATOL = RTOL = 1e-5


def make_timm(img_size):
  return VisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                           num_heads=HEADS, qkv_bias=True, class_token=True, global_pool="token",
                           num_classes=0,
                           norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()


def randomize(model, seed=0):
  """Every parameter random, so no name or transpose mix-up can hide behind an init value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = ".norm" in f".{name}" and "weight" in name
      p.copy_(1 + 0.1 * noise if is_norm else 0.1 * noise)
  return model


def run_torch(model, images):
  """Final features and the CLS token of every block (forward hooks on blocks[i])."""
  cls = {}
  hooks = [blk.register_forward_hook(lambda m, i, out, k=k: cls.__setitem__(k, out[:, 0].numpy()))
           for k, blk in enumerate(model.blocks)]
  with torch.no_grad():
    out = model.forward_features(images).numpy()
  for h in hooks:
    h.remove()
  return out, cls


def nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("timm")
  model = randomize(make_timm(IMG))
  sd = model.state_dict()
  torch.save({"model": sd}, tmp / "mae_mu4.pth")  # MAE layout (section 3.1)
  torch.save(sd, tmp / "maws_mu4.pt")  # MAWS layout: flat timm dict (section 3.2)
  gen = torch.Generator().manual_seed(1)
  images = torch.randn(4, 3, IMG, IMG, generator=gen)
  small = torch.randn(4, 3, SMALL, SMALL, generator=gen)
  pre = checkpoints.load_pretrained(tmp / "mae_mu4.pth")
  vit = ViT(**pre.vit_kwargs)
  apply = jax.jit(functools.partial(vit.apply, blocks=tuple(range(DEPTH))))
  return dict(tmp=tmp, model=model, sd=sd, images=images, small=small, pre=pre, apply=apply)


def test_mae_and_maws_layouts_convert_identically(setup):
  mae = setup["pre"]
  maws = checkpoints.load_pretrained(setup["tmp"] / "maws_mu4.pt")
  assert mae.info["format"] == "mae" and maws.info["format"] == "timm"
  assert mae.vit_kwargs == maws.vit_kwargs == dict(
      patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, prenorm=True,
      pos_grid=IMG // PATCH)
  assert mae.info["size"] == "mu" and mae.info["family"] == "prenorm"
  assert any("folded" in n for n in mae.info["notes"])  # the random CLS position row
  for a, b in zip(jax.tree.leaves(mae.variables), jax.tree.leaves(maws.variables)):
    np.testing.assert_array_equal(a, b)


def test_features_and_block_cls_match_timm(setup):
  ref, ref_cls = run_torch(setup["model"], setup["images"])
  out, aux = setup["apply"](setup["pre"].variables, nhwc(setup["images"]))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(np.asarray(aux["cls"]), ref[:, 0], atol=ATOL, rtol=RTOL)
  for i in range(DEPTH):
    np.testing.assert_allclose(np.asarray(aux["block_cls"][i]), ref_cls[i], atol=ATOL, rtol=RTOL)


def test_non_native_grid_matches_torch_bicubic(setup):
  small_model = make_timm(SMALL)
  sd = dict(setup["sd"])
  pos = sd["pos_embed"]
  g, d = IMG // PATCH, WIDTH
  grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(SMALL // PATCH,) * 2, mode="bicubic", align_corners=False)
  sd["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
  small_model.load_state_dict(sd, strict=True)
  ref, ref_cls = run_torch(small_model, setup["small"])
  out, aux = setup["apply"](setup["pre"].variables, nhwc(setup["small"]))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=RTOL)
  for i in range(DEPTH):
    np.testing.assert_allclose(np.asarray(aux["block_cls"][i]), ref_cls[i], atol=ATOL, rtol=RTOL)


def test_timm_export_loads_strictly_and_agrees(setup):
  path = setup["tmp"] / "export_timm.pth"
  checkpoints.save_torch(path, setup["pre"].variables, setup["pre"].vit_kwargs, layout="timm")
  fresh = make_timm(IMG)
  fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
  ref, ref_cls = run_torch(setup["model"], setup["images"])
  out, out_cls = run_torch(fresh, setup["images"])
  # Same weights up to the CLS position row, which moved into cls_token: (cls + row) + 0 vs
  # cls + row is the same single rounding, so the models agree to float precision.
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
  for i in range(DEPTH):
    np.testing.assert_allclose(out_cls[i], ref_cls[i], atol=1e-6, rtol=1e-6)


def test_bf16_compute_is_close_to_fp32(setup):
  # Sanity only: bf16 linears/attention (section 1.5) vs torch fp32. bf16 has 8 mantissa bits,
  # so allow 5% of the activation scale.
  ref, _ = run_torch(setup["model"], setup["images"])
  vit = ViT(**setup["pre"].vit_kwargs, dtype=jnp.bfloat16)
  out, aux = jax.jit(vit.apply)(setup["pre"].variables, nhwc(setup["images"]))
  assert out.dtype == jnp.float32 and aux["cls"].dtype == jnp.float32
  err = np.abs(np.asarray(out) - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err
  assert err > 0  # it really ran in bf16


@pytest.mark.slow
def test_full_size_l16_matches_timm(tmp_path):
  """ViT-L/16 at 224 px (MAE layout), timm's own init with LayerNorms randomised; ~1 min."""
  torch.manual_seed(0)
  model = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                            qkv_bias=True, class_token=True, global_pool="token", num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.pos_embed[:, 0].zero_()  # MAE's zero CLS row
  torch.save({"model": model.state_dict()}, tmp_path / "mae_large16.pth")
  pre = checkpoints.load_pretrained(tmp_path / "mae_large16.pth")
  (tmp_path / "mae_large16.pth").unlink()  # 1.2 GB; the variables are already in memory
  assert pre.info["size"] == "large" and pre.info["format"] == "mae" and not pre.info["notes"]
  images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
  ref, ref_cls = run_torch(model, images)
  out, aux = jax.jit(functools.partial(ViT(**pre.vit_kwargs).apply, blocks=(16, 23)))(
      pre.variables, nhwc(images))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
  for i in (16, 23):
    np.testing.assert_allclose(np.asarray(aux["block_cls"][i]), ref_cls[i], atol=1e-4, rtol=1e-4)
