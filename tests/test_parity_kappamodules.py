"""Post-norm (data2vec 2.0) and kappamodules pre-norm parity with the converted Flax ViT.

The torch reference is assembled from the installed kappamodules 0.1.112 blocks the way
MIM-Refiner's hub `PostnormVit` / `PrenormVit` do (refiner_facts.md sections 1.2, 1.3, 3.6):
VitPatchEmbed -> VitPosEmbed2d (buffer; bicubic resize for other grids) -> flatten ->
VitClassTokens -> [embed_norm] -> PostnormBlock / VitBlock x depth -> [norm]. (The hub's
PostnormVit passes `num_attn_heads`, which PostnormBlock 0.1.112 no longer accepts, so the
classes are rebuilt here.) All weights and the position buffer are random.

The post-norm model is saved with fairseq data2vec 2.0 keys (section 3.3: flat position table
without CLS row, decoder.* and _ema entries that must be dropped, cfg/args/optimizer history)
and in the official refined layout; both convert to the same variables. Compared: final output
and the raw CLS token of every block (forward hooks). fp32 tolerance atol 1e-5 + rtol 1e-5
(measured max abs diff about 2e-6 on post-norm activations of size ~4).
"""

import argparse
import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from kappamodules.transformer import PostnormBlock
from kappamodules.vit import VitBlock, VitClassTokens, VitPatchEmbed, VitPosEmbed2d
from torch import nn

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.models.vit import ViT

IMG, SMALL, PATCH, WIDTH, DEPTH, HEADS = 32, 16, 8, 64, 3, 4  # grid 4 (2 when small)
ATOL = RTOL = 1e-5
FS = "modality_encoders.IMAGE."


class KappaVit(nn.Module):
  """MIM-Refiner's hub PrenormVit (prenorm=True) / PostnormVit (prenorm=False) from kappamodules."""

  def __init__(self, prenorm, img=IMG, patch=PATCH, dim=WIDTH, depth=DEPTH, heads=HEADS):
    super().__init__()
    self.patch_embed = VitPatchEmbed(dim=dim, num_channels=3, resolution=(img, img),
                                     patch_size=patch)
    self.pos_embed = VitPosEmbed2d(seqlens=self.patch_embed.seqlens, dim=dim)
    self.cls_tokens = VitClassTokens(dim=dim, num_tokens=1)
    block = VitBlock if prenorm else PostnormBlock
    self.embed_norm = None if prenorm else nn.LayerNorm(dim, eps=1e-6)
    self.blocks = nn.ModuleList([block(dim=dim, num_heads=heads, eps=1e-6) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6) if prenorm else None

  def forward(self, x):
    x = self.pos_embed(self.patch_embed(x))
    x = self.cls_tokens(einops.rearrange(x, "b ... d -> b (...) d"))
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x) if self.norm is not None else x


def randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      noise = torch.randn(p.shape, generator=gen)
      is_norm = "norm" in name and name.endswith("weight")
      p.copy_(1 + 0.1 * noise if is_norm else 0.1 * noise)
  return model.eval()


def run_torch(model, images):
  cls = {}
  hooks = [blk.register_forward_hook(lambda m, i, out, k=k: cls.__setitem__(k, out[:, 0].numpy()))
           for k, blk in enumerate(model.blocks)]
  with torch.no_grad():
    out = model(images).numpy()
  for h in hooks:
    h.remove()
  return out, cls


def nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


def fairseq_checkpoint(sd):
  """data2vec 2.0 fairseq checkpoint dict from a refined-named post-norm state dict."""
  renames = {"patch_embed.proj.weight": FS + "local_encoder.proj.weight",
             "patch_embed.proj.bias": FS + "local_encoder.proj.bias",
             "cls_tokens.tokens": FS + "extra_tokens",
             "embed_norm.weight": FS + "context_encoder.norm.weight",
             "embed_norm.bias": FS + "context_encoder.norm.bias"}
  model = {renames.get(k, k): v for k, v in sd.items() if k != "pos_embed.embed"}
  pos = sd["pos_embed.embed"]
  model[FS + "fixed_positional_encoder.positions"] = pos.reshape(1, -1, pos.shape[-1])  # no CLS row
  model[FS + "decoder.blocks.0.0.weight"] = torch.randn(WIDTH, WIDTH // 4, 3, 3)  # conv decoder
  model[FS + "decoder.proj.weight"] = torch.randn(PATCH * PATCH * 3, WIDTH)
  model["_ema"] = {k: v.clone() for k, v in list(sd.items())[:3]}  # EMA teacher, dropped
  return {"model": model, "args": argparse.Namespace(arch="data2vec_multi"),
          "cfg": {"model": {"_name": "data2vec_multi", "embed_dim": WIDTH, "depth": DEPTH,
                            "num_heads": HEADS}},
          "optimizer_history": [{"optimizer_name": "adam", "num_updates": 10}],
          "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}},
          "extra_state": {"epoch": 3}}


def refined_checkpoint(sd):
  return {"state_dict": sd, "ctor_kwargs": dict(patch_size=PATCH, dim=WIDTH, depth=DEPTH,
                                                num_heads=HEADS), "abs_ckpt": {"epoch": 20}}


@pytest.fixture(scope="module")
def post(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("d2v2")
  model = randomize(KappaVit(prenorm=False), seed=0)
  sd = model.state_dict()
  torch.save(fairseq_checkpoint(sd), tmp / "data2vec2_base8.pt")
  torch.save(refined_checkpoint(sd), tmp / "d2v2refined.th")
  pre = checkpoints.load_pretrained(tmp / "data2vec2_base8.pt")
  apply = jax.jit(functools.partial(ViT(**pre.vit_kwargs).apply, blocks=tuple(range(DEPTH))))
  gen = torch.Generator().manual_seed(1)
  return dict(tmp=tmp, model=model, pre=pre, apply=apply,
              images=torch.randn(4, 3, IMG, IMG, generator=gen),
              small=torch.randn(4, 3, SMALL, SMALL, generator=gen))


def assert_matches(apply, variables, model, images):
  ref, ref_cls = run_torch(model, images)
  out, aux = apply(variables, nhwc(images))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=RTOL)
  for i in range(DEPTH):
    np.testing.assert_allclose(np.asarray(aux["block_cls"][i]), ref_cls[i], atol=ATOL, rtol=RTOL)


def test_fairseq_and_refined_layouts_convert_identically(post):
  fairseq, refined = post["pre"], checkpoints.load_pretrained(post["tmp"] / "d2v2refined.th")
  assert fairseq.info["format"] == "data2vec2" and refined.info["format"] == "refined"
  assert fairseq.info["family"] == refined.info["family"] == "postnorm"
  assert fairseq.vit_kwargs == refined.vit_kwargs == dict(
      patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, prenorm=False,
      pos_grid=IMG // PATCH)
  assert sorted(fairseq.info["dropped_keys"]) == sorted(
      ["_ema", FS + "decoder.blocks.0.0.weight", FS + "decoder.proj.weight"])
  for a, b in zip(jax.tree.leaves(fairseq.variables), jax.tree.leaves(refined.variables)):
    np.testing.assert_array_equal(a, b)


def test_postnorm_matches_kappamodules(post):
  assert_matches(post["apply"], post["pre"].variables, post["model"], post["images"])


def test_postnorm_non_native_grid_matches_kappamodules(post):
  # kappamodules' VitPosEmbed2d resizes its buffer with F.interpolate(bicubic), as the reference.
  assert_matches(post["apply"], post["pre"].variables, post["model"], post["small"])


@pytest.mark.parametrize("layout", ["refined", "safetensors"])
def test_exports_load_strictly_into_kappamodules(post, layout):
  path = post["tmp"] / f"export.{'safetensors' if layout == 'safetensors' else 'th'}"
  checkpoints.save_torch(path, post["pre"].variables, post["pre"].vit_kwargs, layout=layout)
  if layout == "safetensors":
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(str(path))
  else:
    sd = torch.load(path, weights_only=True)["state_dict"]
  fresh = KappaVit(prenorm=False).eval()
  fresh.load_state_dict(sd, strict=True)
  for name, value in post["model"].state_dict().items():  # exactly the original weights
    torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
  out, _ = run_torch(fresh, post["images"])
  ref, _ = run_torch(post["model"], post["images"])
  np.testing.assert_array_equal(out, ref)


def test_prenorm_kappamodules_refined_layout(tmp_path):
  model = randomize(KappaVit(prenorm=True), seed=2)
  torch.save(refined_checkpoint(model.state_dict()), tmp_path / "maerefined.th")
  pre = checkpoints.load_pretrained(tmp_path / "maerefined.th")
  assert pre.info["format"] == "refined" and pre.info["family"] == "prenorm"
  assert pre.info["num_heads_from"] == "file"
  apply = jax.jit(functools.partial(ViT(**pre.vit_kwargs).apply, blocks=tuple(range(DEPTH))))
  gen = torch.Generator().manual_seed(3)
  assert_matches(apply, pre.variables, model, torch.randn(2, 3, IMG, IMG, generator=gen))
