"""Tests of mim_refiner_jax/optim.py against torch.optim.AdamW and refiner_facts.md section 7.

The reference tables below are written independently of optim.py: they walk torch-style names
("blocks.3.attn.qkv.weight") with the rules of the reference code (layerwise_lr_decay_modifier.py,
ExcludeFromWdByNameModifier, VitBlockFreezer), and torch's AdamW does the updates.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mim_refiner_jax import optim
from mim_refiner_jax.models.vit import ViT, vit_kwargs

DEPTH = 2  # the "mu" ViT


# ---------------------------------------------------------------- independent reference rules


def ref_schedule(s, peak, warmup, total, end=1e-6):
  """Section 7 "Schedule", in float64; s past the end holds the value of update total-1."""
  s = min(s, total - 1)
  if s < warmup:
    return peak * (s + 1) / (warmup + 1)
  return peak + (end - peak) * (1 - math.cos(math.pi * (s - warmup) / (total - warmup))) / 2


def torch_name(path):
  """'encoder/blocks_1/attn/qkv/kernel' -> 'blocks.1.attn.qkv.weight' (heads keep a 'heads.')."""
  parts = path.split("/")
  if parts[0] == "heads":
    prefix, parts = "heads.", parts[1:]
  else:
    prefix, parts = "", parts[1:]
  out = []
  for p in parts:
    if p.startswith("blocks_"):
      out += ["blocks", p[len("blocks_"):]]
    elif p == "cls_token":
      out += ["cls_tokens", "tokens"]
    elif p == "patch_embed":
      out += ["patch_embed", "proj"]
    elif p in ("kernel", "scale"):
      out.append("weight")
    else:
      out.append(p)
  return prefix + ".".join(out)


def ref_hparams(name, ndim, *, depth, layer_decay, encoder_wd, head_wd, frozen_blocks=0,
                freeze_encoder=False):
  """(lr_scale, weight_decay, frozen) of a torch-style name, by the reference's rules."""
  is_head = name.startswith("heads.")
  # LayerwiseLrDecayModifier: num_layers = len(blocks) + 1, scales[i] = d ** (num_layers - i).
  d = layer_decay or 1.0
  scales = [d ** (depth + 1 - i) for i in range(depth + 1)]
  if is_head or name.startswith("norm."):
    scale = 1.0
  elif (name.startswith(("patch_embed", "cls_token", "pos_embed", "embed_norm"))
        or name == "mask_token"):
    scale = scales[0]
  elif name.startswith("block"):
    scale = scales[int(name.split(".")[1]) + 1]
  else:
    raise NotImplementedError(name)
  # Weight decay: none on *.bias, ndim <= 1 and cls_tokens.tokens.
  if name.endswith(".bias") or ndim <= 1 or name == "cls_tokens.tokens":
    wd = 0.0
  else:
    wd = head_wd if is_head else encoder_wd
  # Stage 2 freezes the encoder; VitBlockFreezer freezes blocks[:n], patch_embed and the CLS token.
  in_frozen_block = name.startswith("blocks.") and int(name.split(".")[1]) < frozen_blocks
  frozen = not is_head and (freeze_encoder or (frozen_blocks > 0 and (
      in_frozen_block or name.startswith(("patch_embed.", "cls_tokens.")))))
  return scale, wd, frozen


# ---------------------------------------------------------------- fixtures


def make_heads(rng):
  """Two hand-made heads with the real head's names: Dense kernels (no bias), BN scale/bias."""
  def linear_bn(n_in, n_out):
    return {"dense": {"kernel": rng.normal(0, 0.2, (n_in, n_out)).astype(np.float32)},
            "bn": {"scale": (1 + 0.1 * rng.normal(size=n_out)).astype(np.float32),
                   "bias": (0.1 * rng.normal(size=n_out)).astype(np.float32)}}
  return {f"h{i}": {"projector_0": linear_bn(32, 16), "projector_1": linear_bn(16, 8),
                    "predictor_0": linear_bn(8, 8)} for i in range(2)}


def tiny_params(prenorm):
  """Params of the "mu" ViT (pre- or post-norm) and two heads, with random values (the init's values
  do not matter here; shapes come from jax.eval_shape, which avoids compiling the init)."""
  model = ViT(**vit_kwargs("mu", 4, prenorm=prenorm, image_size=16))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert "pos_embed" not in variables["params"]  # a buffer, never seen by the optimizer
  rng = np.random.default_rng(0 if prenorm else 1)
  encoder = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                         variables["params"])
  return {"encoder": encoder, "heads": make_heads(rng)}


def flat(tree):
  """{'encoder/blocks_0/attn/qkv/kernel': leaf, ...} of a tree of nested dicts."""
  return {"/".join(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------- schedule


def test_peak_lr_linear_scaling():
  assert optim.peak_lr(4e-4, 1024) == pytest.approx(1.6e-3, rel=1e-12)
  assert optim.peak_lr(2e-4, 512) == pytest.approx(4e-4, rel=1e-12)


def test_lr_schedule_matches_formula():
  peak, w, t = 1e-2, 8, 40
  lr_fn = optim.lr_schedule(peak, w, t)
  steps = list(range(0, t + 10))  # includes 0, W-1, W, mid, T-1 and steps past the end
  ours = np.asarray(jax.jit(jax.vmap(lr_fn))(jnp.asarray(steps, jnp.int32)))
  ref = np.asarray([ref_schedule(s, peak, w, t) for s in steps])
  np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)
  for s in (0, w - 1, w, (w + t) // 2, t - 1):
    assert float(lr_fn(s)) == pytest.approx(ref_schedule(s, peak, w, t), rel=2e-6)
  assert float(lr_fn(w)) == pytest.approx(peak, rel=1e-7)


def test_lr_schedule_paper_l16_numbers():
  """MAE L/16 stage 3: peak 1.6e-3, W = 4*1251 = 5004, T = 30*1251 = 37530 (section 7)."""
  peak = optim.peak_lr(4e-4, 1024)
  lr_fn = optim.lr_schedule(peak, 5004, 37530)
  for s in (0, 1, 5003, 5004, 5005, 20000, 37529):
    assert float(lr_fn(s)) == pytest.approx(ref_schedule(s, peak, 5004, 37530), rel=1e-5)
  assert float(lr_fn(0)) == pytest.approx(1.6e-3 / 5005, rel=1e-6)
  assert 1e-6 < float(lr_fn(37529)) < 1.01e-6


def test_lr_schedule_matches_kappaschedules():
  """The reference's own schedule library (a test extra: requirements-test.txt, [test])."""
  import kappaschedules as ks  # pylint: disable=g-import-not-at-top  (a test extra: never skipped)
  from kappaschedules.schedules import (  # pylint: disable=g-import-not-at-top
      CosineDecreasingSchedule, LinearIncreasingSchedule, SequentialStepSchedule,
      SequentialStepScheduleConfig)
  del ks
  peak, w, t = 1e-2, 8, 40
  # wupcos_epoch as described in section 7: warmup excluding both ends, cosine excluding the end.
  schedule = SequentialStepSchedule([
      SequentialStepScheduleConfig(LinearIncreasingSchedule(
          max_value=peak, exclude_first=True, exclude_last=True), end_step=w),
      SequentialStepScheduleConfig(CosineDecreasingSchedule(
          max_value=peak, end_value=1e-6, exclude_last=True)),
  ])
  lr_fn = optim.lr_schedule(peak, w, t)
  for s in range(t):
    assert float(lr_fn(s)) == pytest.approx(schedule.get_value(s, t), rel=2e-6), s


def test_lr_schedule_rejects_bad_lengths():
  with pytest.raises(ValueError, match="must exceed warmup_steps"):
    optim.lr_schedule(1e-3, 10, 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.lr_schedule(1e-3, -1, 10)


# ---------------------------------------------------------------- groups


def test_llrd_worked_numbers_large16():
  """Section 7: L/16 stem 0.65^25 ~ 2.10e-5, block 0 0.65^24 ~ 3.24e-5, last block 0.65."""
  model = ViT(**vit_kwargs("large", 16, image_size=32))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = {"encoder": shapes, "heads": {"h": {"projector_0": {"dense": {
      "kernel": jax.ShapeDtypeStruct((1024, 8), jnp.float32)}}}}}
  scale, wd, _ = optim.param_groups(params, depth=24, layer_decay=0.65)
  scale, wd = flat(scale), flat(wd)
  assert scale["encoder/patch_embed/kernel"] == pytest.approx(2.10e-5, rel=3e-3)
  assert scale["encoder/cls_token"] == pytest.approx(0.65 ** 25, rel=1e-12)
  assert scale["encoder/blocks_0/attn/qkv/kernel"] == pytest.approx(3.24e-5, rel=3e-3)
  assert scale["encoder/blocks_23/mlp/fc2/bias"] == pytest.approx(0.65, rel=1e-12)
  assert scale["encoder/norm/scale"] == 1.0 and scale["heads/h/projector_0/dense/kernel"] == 1.0
  assert wd["encoder/patch_embed/kernel"] == 0.05 and wd["encoder/cls_token"] == 0.0
  assert wd["heads/h/projector_0/dense/kernel"] == 1e-5
  # H/14: stem 0.65^33 ~ 6.70e-7, block 0 0.65^32 ~ 1.03e-6.
  assert 0.65 ** (33 - optim.layer_id("encoder/patch_embed/kernel", 32)) == pytest.approx(
      6.70e-7, rel=3e-3)
  assert 0.65 ** (33 - optim.layer_id(("encoder", "blocks_0", "norm1", "scale"), 32)) == (
      pytest.approx(1.03e-6, rel=3e-3))

  # 2B-style freezing on the L/16 layout: blocks 0..5 + patch_embed + CLS (section 7 "Freezing").
  assert optim.blocks_to_freeze(24, 0.25) == 6
  _, _, trainable = optim.param_groups(params, depth=24, frozen_blocks=6)
  trainable = flat(trainable)
  frozen = {k for k, v in trainable.items() if not v}
  frozen_prefixes = ("encoder/patch_embed/", "encoder/cls_token") + tuple(
      f"encoder/blocks_{i}/" for i in range(6))
  assert frozen == {k for k in trainable if k.startswith(frozen_prefixes)}
  # The abstract state has moments only for trainable leaves, with the params' shapes.
  tx, _ = optim.make_optimizer(params, base_lr=4e-4, global_batch_size=512, warmup_steps=4,
                               total_steps=20, depth=24, frozen_blocks=6)
  state = jax.eval_shape(tx.init, params)
  moments = optax.tree_map_params(tx, lambda p: p, state, transform_non_params=lambda _: None)
  mu = flat(moments[0].inner_states["trainable"].inner_state.mu)
  assert set(mu) == {k for k, v in trainable.items() if v}
  assert all(mu[k].shape == flat(params)[k].shape for k in mu)


# Optimizer settings besides depth. Large, distinct weight decays and LR scales, so that a swapped
# or missing rule moves the parameters far beyond the tolerances.
CASES = {
    "llrd": dict(layer_decay=0.5, encoder_wd=0.3, head_wd=0.1),
    "frozen_blocks1": dict(layer_decay=0.5, encoder_wd=0.3, head_wd=0.1, frozen_blocks=1),
    "stage2_freeze_encoder": dict(layer_decay=None, encoder_wd=0.3, head_wd=0.1,
                                  freeze_encoder=True),
}


@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("case", list(CASES))
def test_param_groups_match_reference_table(prenorm, case):
  kwargs = CASES[case]
  params = tiny_params(prenorm)
  scale, wd, trainable = (flat(t) for t in optim.param_groups(params, depth=DEPTH, **kwargs))
  leaves = flat(params)
  assert set(scale) == set(wd) == set(trainable) == set(leaves)
  for path, x in leaves.items():
    ref_scale, ref_wd, ref_frozen = ref_hparams(torch_name(path), x.ndim, depth=DEPTH, **kwargs)
    assert trainable[path] == (not ref_frozen), path
    if ref_frozen:  # never updated: no lr, no decay
      assert scale[path] == 0.0 and wd[path] == 0.0, path
    else:
      assert scale[path] == pytest.approx(ref_scale, rel=1e-12), path
      assert wd[path] == ref_wd, path


# ---------------------------------------------------------------- updates vs torch.optim.AdamW

BASE_LR, BATCH, WARMUP, TOTAL, STEPS = 2.5e-3, 1024, 2, 5, 4  # peak 1e-2; s=0,1 warm, 2 peak, 3 cos
MEASURED = {}


# Block freezing is the case where the post-norm stem (embed_norm: trainable) differs.
@pytest.mark.parametrize("case, prenorm", [("llrd", True), ("frozen_blocks1", False),
                                           ("stage2_freeze_encoder", True)])
def test_updates_match_torch_adamw(case, prenorm):
  kwargs = CASES[case]
  tiny = tiny_params(prenorm)
  peak = BASE_LR * BATCH / 256
  tx, lr_fn = optim.make_optimizer(tiny, base_lr=BASE_LR, global_batch_size=BATCH,
                                   warmup_steps=WARMUP, total_steps=TOTAL, depth=DEPTH, **kwargs)
  leaves = flat(tiny)

  # torch: one param group per trainable leaf, lr = schedule * scale, wd from the reference table.
  tensors, groups = {}, []
  for path, x in leaves.items():
    ref_scale, ref_wd, ref_frozen = ref_hparams(torch_name(path), x.ndim, depth=DEPTH, **kwargs)
    tensors[path] = torch.nn.Parameter(torch.tensor(np.array(x)), requires_grad=not ref_frozen)
    if not ref_frozen:
      groups.append(dict(params=[tensors[path]], lr=0.0, weight_decay=ref_wd, lr_scale=ref_scale))
  torch_opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)

  params = jax.tree.map(jnp.asarray, tiny)
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(2)
  for s in range(STEPS):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tiny)
    assert int(optim.optimizer_step(state)) == s
    assert float(lr_fn(optim.optimizer_step(state))) == pytest.approx(
        ref_schedule(s, peak, WARMUP, TOTAL), rel=2e-6)
    # stage 2: the optimizer sees the heads subtree only (optim.optimized_params)
    sub = lambda t: optim.optimized_params(t, kwargs.get("freeze_encoder", False))
    updates, state = update(sub(jax.tree.map(jnp.asarray, grads)), state, params)
    params = dict(params, **optax.apply_updates(sub(params), updates))
    for group in torch_opt.param_groups:
      group["lr"] = ref_schedule(s, peak, WARMUP, TOTAL) * group["lr_scale"]
    for path, g in flat(grads).items():
      if tensors[path].requires_grad:
        tensors[path].grad = torch.tensor(g)
    torch_opt.step()
  assert int(optim.optimizer_step(state)) == STEPS

  ours = flat(jax.tree.map(np.asarray, params))
  err_param = err_delta = 0.0
  n_trainable = 0
  for path, x0 in leaves.items():
    if not tensors[path].requires_grad:
      # Frozen: bit-identical after updates with large random grads and wd 0.3 (no decay either).
      np.testing.assert_array_equal(ours[path], x0, err_msg=path)
      continue
    n_trainable += x0.size
    ref = tensors[path].detach().numpy()
    assert np.abs(ref - x0).max() > 0, path  # the parameter did move
    # Relative to the parameter (fp32 rounding of p) and to the parameter's own total update, so
    # that leaves with a tiny lr scale are checked as tightly as the others.
    err_param = max(err_param, np.abs(ours[path] - ref).max() / np.abs(ref).max())
    delta, ref_delta = ours[path] - x0, ref - x0
    err_delta = max(err_delta, np.abs(delta - ref_delta).max() / np.abs(ref_delta).max())
  MEASURED[case] = (err_param, err_delta)
  print(f"{case}: max rel err vs torch AdamW: params {err_param:.2e}, updates {err_delta:.2e}")
  assert err_param < 1e-6
  assert err_delta < 1e-4

  # Frozen leaves carry no Adam moments: state = 2 moments per trainable element + 2 step counters.
  state_size = sum(np.size(x) for x in jax.tree.leaves(state))
  assert state_size == 2 * n_trainable + 2


def test_update_without_params_is_an_error():
  params = {"encoder": {"norm": {"scale": np.ones(4, np.float32)}}}
  tx, _ = optim.make_optimizer(params, base_lr=1e-3, global_batch_size=256, warmup_steps=1,
                               total_steps=3, depth=1)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------- bad input


def _shape(*dims):
  return jax.ShapeDtypeStruct(dims, jnp.float32)


GOOD_ENCODER = {"patch_embed": {"kernel": _shape(4, 4, 3, 8), "bias": _shape(8)},
                "cls_token": _shape(1, 1, 8),
                "blocks_0": {"norm1": {"scale": _shape(8), "bias": _shape(8)}},
                "norm": {"scale": _shape(8), "bias": _shape(8)}}


@pytest.mark.parametrize("params, match", [
    ({"encoder": {**GOOD_ENCODER, "foo": {"kernel": _shape(8, 8)}}},
     "no optimizer rule covers parameter 'encoder/foo/kernel'"),
    ({"encoder": {**GOOD_ENCODER, "pos_embed": _shape(1, 2, 2, 8)}}, "'buffers' collection"),
    ({"encoder": GOOD_ENCODER, "heads": {"h0": {"dense": {"weird": _shape(8, 8)}}}},
     "heads/h0/dense/weird"),
    ({"encoder": GOOD_ENCODER, "decoder": {"kernel": _shape(8, 8)}}, "decoder/kernel"),
    ({"encoder": {**GOOD_ENCODER, "blocks_1": {"norm1": {"scale": _shape(8)}}}}, "depth=1"),
], ids=["unknown_encoder", "pos_embed", "unknown_head_leaf", "unknown_top", "depth_mismatch"])
def test_unknown_parameter_is_a_clear_error(params, match):
  with pytest.raises(ValueError, match=match):
    optim.param_groups(params, depth=1)
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(params, base_lr=1e-3, global_batch_size=256, warmup_steps=1,
                         total_steps=3, depth=1)


def test_layer_id_and_bad_arguments():
  assert optim.layer_id("encoder/embed_norm/scale", 24) == 0
  assert optim.layer_id("encoder/mask_token", 24) == 0
  assert optim.layer_id("encoder/blocks_7/mlp/fc1/kernel", 24) == 8
  assert optim.layer_id("encoder/norm/bias", 24) == 25
  assert optim.layer_id("heads/nnclr_temp02_cls/projector_0/bn/scale", 24) == 25
  with pytest.raises(ValueError, match="block 5, but depth=2"):
    optim.layer_id("encoder/blocks_5/norm1/scale", 2)
  with pytest.raises(ValueError, match="frozen_blocks"):
    optim.param_groups({"encoder": GOOD_ENCODER}, depth=1, frozen_blocks=2)
  with pytest.raises(ValueError, match="layer_decay"):
    optim.param_groups({"encoder": GOOD_ENCODER}, depth=1, layer_decay=0.0)


def test_embed_norm_not_frozen_by_block_freezer():
  """VitBlockFreezer leaves embed_norm (post-norm models) trainable; stage 2 freezes it."""
  params = {"encoder": {**GOOD_ENCODER, "embed_norm": {"scale": _shape(8), "bias": _shape(8)}}}
  _, _, trainable = optim.param_groups(params, depth=1, frozen_blocks=1)
  trainable = flat(trainable)
  assert trainable["encoder/embed_norm/scale"] and trainable["encoder/norm/scale"]
  assert not trainable["encoder/patch_embed/kernel"]
  assert not trainable["encoder/blocks_0/norm1/bias"]
  _, _, trainable = optim.param_groups(params, depth=1, freeze_encoder=True)
  assert not any(jax.tree.leaves(trainable))


# ---------------------------------------------------------------- EMA


def test_ema_update_fp32():
  rng = np.random.default_rng(3)
  ema = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": {"c": np.ones(5, np.float32)}}
  params = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": {"c": np.zeros(5, np.float32)}}
  params_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  out = jax.jit(optim.ema_update)(ema, params_bf16)
  for o, e, p in zip(jax.tree.leaves(out), jax.tree.leaves(ema), jax.tree.leaves(params_bf16)):
    assert o.dtype == jnp.float32
    expected = 0.9999 * e.astype(np.float64) + 1e-4 * np.asarray(p, np.float64)
    np.testing.assert_allclose(np.asarray(o), expected, rtol=1e-6, atol=1e-7)
  out = optim.ema_update(ema, params, decay=0.5)
  np.testing.assert_allclose(out["a"], 0.5 * ema["a"] + 0.5 * params["a"], rtol=1e-6)
