"""DINOv2 hub and I-JEPA checkpoint layouts, written by the test in the released files' exact key
layout (facebookresearch/dinov2 models/vision_transformer.py; facebookresearch/ijepa
src/models/vision_transformer.py and the save in src/train.py), loaded and compared with the torch
forward; export back to each layout; parts this ViT lacks refused by name; the trainer's face of
a file that does not fit names the keys and the fix.

The torch forward is timm's `VisionTransformer`: for DINOv2 after timm's own DINOv2 converter
(`checkpoint_filter_fn`), for I-JEPA with `class_token=False, global_pool="avg", fc_norm=False`
(I-JEPA's encoder: no CLS, `norm` on all tokens, no LayerScale). fp32, 1e-5.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from timm.models import vision_transformer as timm_vit

from mim_refiner_jax import errors
from mim_refiner_jax import train
from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.models.vit import ViT, sincos_pos_embed

ATOL = RTOL = 1e-5
WIDTH, DEPTH, HEADS, PATCH, IMG = 32, 2, 2, 14, 56  # grid 4: 1 + 16 position rows (1370 at 518)


def make_timm(**kwargs):
  return timm_vit.VisionTransformer(
      img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      num_classes=0, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kwargs).eval()


def random_tensors(shapes: dict, seed: int) -> dict:
  gen = torch.Generator().manual_seed(seed)
  return {k: (1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in k and "weight" in k
          else 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}


def dinov2_shapes(reg: int) -> dict:
  """DinoVisionTransformer's state dict (block_chunks=0, as the hub models): key -> shape."""
  d, n = WIDTH, (IMG // PATCH) ** 2
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, PATCH, PATCH), "patch_embed.proj.bias": (d,)}
  if reg:
    shapes["register_tokens"] = (1, reg, d)
  for i in range(DEPTH):
    shapes.update({f"blocks.{i}.{k}": s for k, s in {
        "norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "ls1.gamma": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d),
        "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}.items()})
  shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
  return shapes


def ijepa_encoder(seed: int) -> dict:
  """I-JEPA VisionTransformer state dict: no CLS, fixed sin-cos pos_embed (1, N, D), norm."""
  shapes = {k: s for k, s in dinov2_shapes(0).items()
            if k not in ("cls_token", "mask_token") and ".ls" not in k}
  shapes["pos_embed"] = (1, (IMG // PATCH) ** 2, WIDTH)
  sd = random_tensors(shapes, seed)
  sd["pos_embed"] = torch.from_numpy(sincos_pos_embed(IMG // PATCH, WIDTH).reshape(1, -1, WIDTH))
  return sd


def forward_both(model, pre, images):
  out, aux = jax.jit(functools.partial(ViT(**pre.vit_kwargs).apply, blocks=tuple(range(DEPTH))))(
      pre.variables, images.numpy().transpose(0, 2, 3, 1))
  with torch.no_grad():
    ref = model.forward_features(images).numpy()
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
  return aux


@pytest.fixture(scope="module")
def images():
  return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def test_dinov2_hub_file_loads_matches_torch_and_exports_back(tmp_path, images):
  sd = random_tensors(dinov2_shapes(reg=4), seed=0)
  torch.save(sd, tmp_path / "dinov2_vitmu14_reg4_pretrain.pth")
  pre = checkpoints.load_pretrained(tmp_path / "dinov2_vitmu14_reg4_pretrain.pth")
  assert pre.info["format"] == "dinov2" and pre.info["dropped_keys"] == ["mask_token"]
  assert pre.vit_kwargs["reg_tokens"] == 4 and pre.vit_kwargs["init_values"]
  assert pre.vit_kwargs["pos_grid"] == IMG // PATCH
  # timm's own DINOv2 converter (registers -> no_embed_class, the CLS row folded into cls_token).
  model = make_timm(reg_tokens=4, init_values=1e-5, no_embed_class=True)
  model.load_state_dict(timm_vit.checkpoint_filter_fn(dict(sd), model), strict=True)
  forward_both(model, pre, images)
  info = checkpoints.detect(tmp_path / "dinov2_vitmu14_reg4_pretrain.pth")
  assert info["layout"] == "dinov2" and info["family"] == "prenorm"

  checkpoints.save_torch(tmp_path / "back.pth", pre.variables, pre.vit_kwargs, layout="dinov2")
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert {k: tuple(v.shape) for k, v in back.items()} == dinov2_shapes(reg=4)
  again = checkpoints.load_pretrained(tmp_path / "back.pth")
  for a, b in zip(jax.tree.leaves(pre.variables), jax.tree.leaves(again.variables)):
    np.testing.assert_array_equal(a, b)


def test_ijepa_checkpoint_loads_either_encoder_and_exports_back(tmp_path, images):
  target, online = ijepa_encoder(seed=1), ijepa_encoder(seed=2)
  module = lambda sd: {f"module.{k}": v for k, v in sd.items()}  # DDP-wrapped, as saved
  ckpt = {"encoder": module(online), "target_encoder": module(target),
          "predictor": module({"predictor_embed.weight": torch.zeros(16, WIDTH)}),
          "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
          "scaler": None, "epoch": 3, "loss": 0.25, "batch_size": 8, "world_size": 1, "lr": 1e-3}
  torch.save(ckpt, tmp_path / "IN1K-vit.h.14-300e.pth.tar")
  pre = checkpoints.load_pretrained(tmp_path / "IN1K-vit.h.14-300e.pth.tar")
  assert pre.info["format"] == "ijepa" and pre.info["containers"] == ["target_encoder"]
  assert pre.vit_kwargs["class_token"] is False and pre.vit_kwargs["global_pool"] == "avg"
  model = make_timm(class_token=False, global_pool="avg", fc_norm=False)
  model.load_state_dict(target, strict=True)
  aux = forward_both(model, pre, images)
  assert "cls" not in aux and not aux["block_cls"]
  online_pre = checkpoints.load_pretrained(tmp_path / "IN1K-vit.h.14-300e.pth.tar",
                                           ijepa_encoder="encoder")
  model.load_state_dict(online, strict=True)
  forward_both(model, online_pre, images)

  checkpoints.save_torch(tmp_path / "back.pth.tar", pre.variables, pre.vit_kwargs, layout="ijepa")
  back = torch.load(tmp_path / "back.pth.tar", weights_only=True)
  assert {k: tuple(v.shape) for k, v in back["target_encoder"].items()} == {
      k: tuple(v.shape) for k, v in module(target).items()}
  again = checkpoints.load_pretrained(tmp_path / "back.pth.tar")
  for a, b in zip(jax.tree.leaves(pre.variables), jax.tree.leaves(again.variables)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="ijepa layout cannot express.*class_token"):
    checkpoints.save_torch(tmp_path / "x.pth", *_dinov2_like(), layout="ijepa")


def _dinov2_like():
  pre = checkpoints.mapping.from_torch_state_dict(
      {k: v.numpy() for k, v in random_tensors(dinov2_shapes(reg=2), seed=3).items()})
  return pre[0], pre[1]


@pytest.mark.parametrize("key,shape,what", [
    ("blocks.0.attn.relative_position_bias_table", (49, 2), "relative position bias"),
    ("rope.freqs", (8,), "rotary position embedding"),
    ("blocks.1.mlp.w12.weight", (64, 32), "SwiGLU"),
])
def test_parts_this_vit_lacks_are_refused_by_name(tmp_path, key, shape, what):
  sd = random_tensors(dinov2_shapes(reg=0), seed=4)
  sd[key] = torch.zeros(shape)
  torch.save(sd, tmp_path / "other.pth")
  with pytest.raises(ValueError) as e:
    checkpoints.load_pretrained(tmp_path / "other.pth")
  line = str(e.value)
  assert "\n" not in line and key in line and str(shape) in line and what in line


def test_trainer_error_for_a_file_that_does_not_fit_names_keys_and_fix(tmp_path):
  sd = random_tensors(dinov2_shapes(reg=0), seed=4)
  sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, WIDTH)
  del sd["blocks.0.attn.proj.bias"]
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(errors.UserError) as e:
    train.load_pretrained(str(tmp_path / "bad.pth"))
  line = str(e.value)
  assert "\n" not in line and "config.init.pretrained=" in line
  assert "missing blocks.0.attn.proj.bias (32,)" in line
  assert "blocks.1.mlp.fc1.weight is (100, 32), expected (128, 32)" in line
  assert "--family/--size/--num-heads" in line and "point it at a checkpoint" not in line
