"""timm `VisionTransformer` options (registers, no CLS, LayerScale, no_embed_class, qkv_bias,
fc_norm, patch sizes, non-square images) vs our converted Flax ViT, and the export round trip.

Each case builds one tiny timm model with every parameter random, saves its state dict as timm
does (flat), loads it with `load_pretrained` (options detected from the keys) and compares, in
fp32 at 1e-5: timm's `forward_features` (all tokens), `forward_head(pre_logits=True)` (the pooled
main output), and every block's CLS / mean-patch / mean-register token (forward hooks). The export
back to timm loads strictly into a fresh timm model with the same options, and converting that
file again gives the same variables bit for bit.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.models.vit import ViT

ATOL = RTOL = 1e-5
WIDTH, DEPTH, HEADS = 32, 2, 2  # the "mu" size: heads come from the size table

# name: (timm kwargs, image size). The first two are the combinations real models use.
CASES = {
    # DINOv2 with registers (timm's vit_*_reg4_dinov2): registers, LayerScale, patch 14.
    "reg4_ls_p14": (dict(patch_size=14, reg_tokens=4, init_values=1e-5, no_embed_class=True), 56),
    # I-JEPA / timm avg-pool models: no CLS token, mean of the patch tokens.
    "nocls_avg": (dict(patch_size=8, class_token=False, global_pool="avg"), 32),
    "nocls_avg_nofcnorm": (dict(patch_size=8, class_token=False, global_pool="avg",
                                fc_norm=False), 32),
    # Register position rows (no_embed_class=False), no qkv bias, an odd patch size.
    "reg2_rows_noqkvbias_p6": (dict(patch_size=6, reg_tokens=2, qkv_bias=False), 24),
    # CLS kept, fc_norm after avg pooling (BEiT / DeiT-style heads), LayerScale.
    "cls_avg_fcnorm_ls": (dict(patch_size=8, global_pool="avg", init_values=0.1), 32),
}


def make_timm(kwargs, img_size):
  kw = dict(dict(qkv_bias=True, class_token=True, global_pool="token"), **kwargs)
  return VisionTransformer(img_size=img_size, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                           num_classes=0,
                           norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                           **kw).eval()


def randomize(model, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = "norm" in name and "weight" in name
      p.copy_(1 + 0.1 * noise if is_norm else 0.1 * noise)
  return model


def run_timm(model, images):
  """forward_features, pre_logits and the raw tokens of every block."""
  blocks = {}
  hooks = [blk.register_forward_hook(lambda m, i, out, k=k: blocks.__setitem__(k, out.numpy()))
           for k, blk in enumerate(model.blocks)]
  with torch.no_grad():
    feats = model.forward_features(images)
    pooled = model.forward_head(feats, pre_logits=True).numpy()
  for h in hooks:
    h.remove()
  return feats.numpy(), pooled, blocks


def nhwc(images):
  return images.numpy().transpose(0, 2, 3, 1)


def check_against_timm(model, vit, variables, images):
  out, aux = jax.jit(functools.partial(vit.apply, blocks=tuple(range(DEPTH))))(
      variables, nhwc(images))
  feats, pooled, blocks = run_timm(model, images)
  np.testing.assert_allclose(out, feats, atol=ATOL, rtol=RTOL)
  main = "cls" if model.global_pool == "token" else "patch_mean"
  np.testing.assert_allclose(aux[main], pooled, atol=ATOL, rtol=RTOL)
  n_pre, cls = model.num_prefix_tokens, int(model.cls_token is not None)
  for i, tokens in blocks.items():
    np.testing.assert_allclose(aux["block_patch_mean"][i], tokens[:, n_pre:].mean(1),
                               atol=ATOL, rtol=RTOL)
    if cls:
      np.testing.assert_allclose(aux["block_cls"][i], tokens[:, 0], atol=ATOL, rtol=RTOL)
    else:
      assert i not in aux["block_cls"] and "cls" not in aux
    if model.reg_token is not None:  # registers: a pooling of their own, never in patch_mean
      np.testing.assert_allclose(aux["block_registers"][i], tokens[:, cls:n_pre].mean(1),
                                 atol=ATOL, rtol=RTOL)
    else:
      assert "block_registers" not in aux


@pytest.mark.parametrize("case", sorted(CASES))
def test_options_match_timm_and_export_round_trips(case, tmp_path):
  kwargs, img = CASES[case]
  model = randomize(make_timm(kwargs, img))
  torch.save(model.state_dict(), tmp_path / "timm.pth")
  pre = checkpoints.load_pretrained(tmp_path / "timm.pth")
  assert pre.info["format"] == "timm" and pre.info["size"] == "mu"
  kw = pre.vit_kwargs
  # global_pool is not in a file (only where there is no CLS token, timm's rule fixes it); the
  # main output has every pooling, and fc_norm shows by its keys.
  for key in ("reg_tokens", "class_token", "qkv_bias", "no_embed_class"):
    if key in kwargs:
      assert kw[key] == kwargs[key], key
  assert bool(kw.get("init_values")) == bool(kwargs.get("init_values"))
  images = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
  vit = ViT(**kw)
  check_against_timm(model, vit, pre.variables, images)

  # Export back: strict load into a fresh timm model with the same options, same forward; the
  # file converts to the same variables bit for bit.
  checkpoints.save_torch(tmp_path / "back.pth", pre.variables, kw, layout="timm")
  fresh = make_timm(kwargs, img)
  fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(fresh.forward_features(images).numpy(),
                               model.forward_features(images).numpy(), atol=ATOL, rtol=RTOL)
  again = checkpoints.load_pretrained(tmp_path / "back.pth")
  assert again.vit_kwargs == kw
  for a, b in zip(jax.tree.leaves(pre.variables), jax.tree.leaves(again.variables)):
    np.testing.assert_array_equal(a, b)


def test_non_square_images_resize_the_frozen_table():
  """A 40x48 image on a model stored for 32x32 (grid 4 -> 5x6), registers kept: timm built for
  that size with its table resized by torch's bicubic (no antialias: the reference's resize)."""
  kwargs = dict(patch_size=8, reg_tokens=2, init_values=1e-5, no_embed_class=True)
  model = randomize(make_timm(kwargs, 32))
  pre = checkpoints.mapping.from_torch_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()})
  variables, kw, _ = pre
  big = make_timm(kwargs, (40, 48))
  state = model.state_dict()
  pos = state["pos_embed"].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
  pos = F.interpolate(pos, size=(5, 6), mode="bicubic", align_corners=False)
  state["pos_embed"] = pos.permute(0, 2, 3, 1).reshape(1, 30, WIDTH)
  big.load_state_dict(state, strict=True)
  images = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(2))
  check_against_timm(big, ViT(**kw), variables, images)


def test_refined_layout_refuses_what_it_cannot_express():
  model = randomize(make_timm(CASES["reg4_ls_p14"][0], 56))
  variables, kw, _ = checkpoints.mapping.from_torch_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()})
  with pytest.raises(ValueError, match="refined layout cannot express.*reg_tokens=4.*init_values"):
    checkpoints.mapping.to_torch_state_dict(variables, kw, "refined")


def test_evaluation_poolings_follow_the_token_layout():
  """Feature keys on a ViT without CLS token and with registers: the raw-token path
  (encoder_apply_fn) and the pooled-aux path (plain apply) agree with the ViT's own pooling;
  'cls' is refused in one line naming the fix."""
  from mim_refiner_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  vit = ViT(patch_size=8, width=WIDTH, depth=DEPTH, num_heads=HEADS, pos_grid=4, reg_tokens=2,
            class_token=False, global_pool="avg")
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(vit.init)(jax.random.key(0), images)
  keys = ("block1_registers", "block0_patch_mean", "patch_mean", "registers")
  raw_fn = features.encoder_apply_fn(vit, keys)

  @jax.jit
  def both(variables, images):
    out, aux = vit.apply(variables, images, blocks=(0, 1))
    raw_out, raw_aux = raw_fn(variables, images)
    return (aux, features.select_features(out, aux, keys, DEPTH), raw_aux["block_tokens"],
            features.select_features(raw_out, raw_aux, keys, DEPTH))

  aux, plain, raw_tokens, raw = both(variables, images)
  expected = {"block1_registers": aux["block_registers"][1],
              "block0_patch_mean": aux["block_patch_mean"][0],
              "patch_mean": aux["patch_mean"], "registers": aux["registers"]}
  for key in keys:
    np.testing.assert_allclose(plain[key], expected[key], atol=1e-6)
    np.testing.assert_allclose(raw[key], expected[key], atol=1e-6)
  np.testing.assert_allclose(aux["block_registers"][1], raw_tokens[1][:, :2].mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="without a CLS token.*use 'patch_mean'"):
    jax.eval_shape(lambda v, x: features.select_features(*raw_fn(v, x), ("block1_cls",), DEPTH),
                   variables, images)
