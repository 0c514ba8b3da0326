"""Scale: FSDP of the 2B state, the memory planner, frozen encoder / blocks, uint8 views, head dtype.

The 2B check is abstract (jax.eval_shape, nothing allocated). The planner is checked against a
real allocation of the tiny config on the 8 simulated devices. Frozen parts are checked on
gradients and on the compiled FLOPs (cost_analysis). The bf16 head + NNA loss is compared with
torch under `torch.autocast("cpu", torch.bfloat16)`.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import mae_2b14
from mim_refiner_jax import memory
from mim_refiner_jax import optim
from mim_refiner_jax import sharding
from mim_refiner_jax import state as state_lib
from mim_refiner_jax.config import HeadSpec
from mim_refiner_jax.data import multicrop
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.models.vit import ViT
from mim_refiner_jax.objectives import nna
from tests import tiny_config
from tests.test_heads_queue import torch_head


# ------------------------------------------------------------------------------ 2B state, FSDP


def test_2b_stage3_state_is_sharded_one_eighth_per_device():
  config = mae_2b14.get_config("stage=3")
  assert config.sharding.rules == "fsdp" and config.sharding.fsdp == -1
  built = memory.build(config, jax.devices())  # abstract: eval_shape only, nothing compiled
  assert dict(built["mesh"].shape) == {"data": 1, "fsdp": 8}
  state, shardings = built["state"], built["shardings"]
  assert state["queues"]["nnclr_temp035_cls"]["x"].shape == (65536, 256)
  assert len(state["queues"]) == 8
  flat = {sharding.path_str(p): (x, s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(shardings))}
  # every large parameter, Adam moment, EMA and queue leaf (not the 2.6 MB position-table buffer)
  large = {k: v for k, v in flat.items() if math.prod(v[0].shape) >= sharding.MIN_FSDP_SIZE
           and not k.startswith("buffers/")}
  for part in ("params/encoder/", "params/heads/", "ema/", "opt/", "queues/"):
    assert any(k.startswith(part) for k in large), part
  for name, (x, s) in large.items():
    assert math.prod(s.shard_shape(x.shape)) * 8 == math.prod(x.shape), (name, s.spec)
  # Adam moments exist only for trainable leaves: none for the frozen stem and blocks 0-5.
  assert not any(re.search(r"^opt/.*/(mu|nu)/encoder/blocks_[0-5]/", k) for k in flat)
  assert any(re.search(r"^opt/.*/mu/encoder/blocks_6/", k) for k in flat)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x, _ in flat.values())
  per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in flat.values())
  assert total > 20e9 and per_device < total / 8 * 1.01  # ~1/8 of ~24 GB; small leaves replicated


def test_make_mesh_fsdp_all_devices():
  assert dict(sharding.make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 8}
  assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
  with pytest.raises(ValueError, match="divide"):
    sharding.make_mesh(data=3, fsdp=-1)


# --------------------------------------------------------------------------------- the planner


def test_planner_matches_a_real_allocation():
  config = tiny_config.get_config("stage=3")
  config.sharding.rules, config.sharding.fsdp = "fsdp", -1
  config.heads.proj_hidden = config.heads.pred_hidden = 512  # kernels above MIN_FSDP_SIZE
  plan = memory.plan(config)
  assert plan.mesh == {"data": 1, "fsdp": 8}
  built = memory.build(config, jax.devices())
  real, _ = state_lib.create_state(built["init_fn"], built["key"], built["mesh"], built["rules"])
  held = memory.state_bytes_real(real)
  assert plan.params == held["params"] + held["buffers"] + held["batch_stats"]
  assert plan.optimizer == held["opt"] and plan.ema == held["ema"]
  assert plan.queues == held["queues"]
  # FSDP: the heads' large kernels are split, so a device holds well below all parameter bytes
  assert held["params"] < sum(x.nbytes for x in jax.tree.leaves(real["params"])) / 2
  # The step compiled with the real state and a real uint8 batch has the planner's buffers.
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 255, v.shape).astype(v.dtype) for k, v in built["batch"].items()}
  batch = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), batch, built["batch"])
  mem = built["step"].lower(real, batch).compile().memory_analysis()
  assert plan.temporaries == mem.temp_size_in_bytes > 0
  assert plan.total >= sum(held.values()) + plan.temporaries
  new_state, metrics = built["step"](real, batch)  # and it runs
  assert np.isfinite(float(metrics["loss"]))
  assert memory.state_bytes_real(new_state) == held


def test_planner_suggests_a_change_when_it_does_not_fit():
  config = tiny_config.get_config("stage=3")
  steps = memory.candidate_changes(config, 8)
  assert steps[0]["sharding.rules"] == "fsdp" and steps[1] == {"model.remat": True}
  assert steps[-1]["batch_size"] == 8
  assert memory.describe(steps[2]) == "FSDP over all devices + remat"
  # A run that already shards and rematerialises (the 2B) is offered smaller batches, named as such.
  done = memory.with_changes(config, **steps[2])
  assert [memory.describe(s) for s in memory.candidate_changes(done, 4)] == [
      f"global batch {config.batch_size // 2}", f"global batch {config.batch_size // 4}"]


def test_planner_compile_targets():
  # TPU topologies for the deviceless TPU compile (a host holds 2x2 chips).
  assert memory.tpu_topology_name("v5p", 8) == "v5p:2x2x2"
  assert memory.tpu_topology_name("v5p", 32) == "v5p:2x4x4"
  assert memory.tpu_topology_name("v5p", 4) == "v5p:2x2x1"
  assert memory.tpu_topology_name("v5e", 8) == "v5e:2x4"
  assert memory.tpu_topology_name("v5e", 32) == "v5e:4x8"
  assert memory.tpu_topology_name("v5p", 6) is None and memory.tpu_topology_name("v5p", 2) is None
  devices, where = memory.target_devices("a100-80gb", 8, "cpu")
  assert len(devices) == 8 and "simulated CPU devices" in where
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    memory.target_devices("a100-80gb", 16, "cpu")
  with pytest.raises(ValueError, match="power of two"):
    memory.target_devices("tpu-v5p", 6, "tpu")
  if not memory.libtpu_available():  # CI: auto falls back to the CPU compile, tpu says what to do
    assert "simulated CPU" in memory.target_devices("tpu-v5p", 8, "auto")[1]
    with pytest.raises(ValueError, match=r"pip install -e \.\[plan\]"):
      memory.target_devices("tpu-v5p", 8, "tpu")


@pytest.mark.slow  # three TPU compiles of a ViT-S step: minutes on 2 cores
@pytest.mark.skipif(not memory.libtpu_available(), reason="libtpu not installed (.[plan] extra)")
def test_planner_tpu_compile_sees_remat():
  """The deviceless TPU compile: state bytes as on CPU, and remat shrinks the temporaries (XLA:CPU
  shows no saving, memory.remat_check)."""
  config = tiny_config.get_config("stage=3")
  config.model.size, config.model.image_size, config.batch_size = "small", 64, 64
  config.data.global_size, config.data.local_size = 64, 32
  devices, where = memory.target_devices("tpu-v5p", 4, "tpu")
  assert "v5p:2x2x1" in where
  plain = memory.plan(config, devices)
  remat = memory.plan(memory.with_changes(config, **{"model.remat": True}), devices)
  on_cpu = memory.plan(config, jax.devices()[:4])
  assert plain.params == on_cpu.params and plain.optimizer == on_cpu.optimizer
  assert remat.temporaries < 0.7 * plain.temporaries


# ------------------------------------------------------------------- frozen encoder and blocks

WIDTH = 64


@functools.lru_cache(maxsize=None)
def _refiner(frozen_blocks=0):
  # An encoder that dominates the FLOPs (width 64, 3 blocks) and a small head.
  encoder = ViT(patch_size=4, width=WIDTH, depth=3, num_heads=2, pos_grid=4,
                frozen_blocks=frozen_blocks)
  head = IDHead(proj_hidden_dim=16, pred_hidden_dim=16, output_dim=8)
  model = Refiner(encoder, [HeadSpec("nnclr_temp02_cls", "main", 0.2)], head)
  views = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), views)
  return model, variables, views


@functools.lru_cache(maxsize=None)  # (0, False) serves both tests below: one compile less
def _loss_and_grad(frozen_blocks, freeze_encoder):
  model, v, views = _refiner(frozen_blocks)

  def loss(trainable, rest):
    params = dict(rest, **trainable)
    out, _ = model.apply(params, v["buffers"], v["batch_stats"], views,
                         freeze_encoder=freeze_encoder)
    z, p = out["nnclr_temp02_cls"]
    return jnp.sum(p * jax.lax.stop_gradient(z)) + jnp.sum(z ** 2)

  fn = jax.jit(jax.value_and_grad(loss))
  trainable = optim.optimized_params(v["params"], freeze_encoder)
  # The rest is an argument too, as in the train step: closed over, XLA would constant-fold the
  # frozen encoder's forward and the FLOPs would say nothing.
  rest = {k: x for k, x in v["params"].items() if k not in trainable}
  flops = fn.lower(trainable, rest).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, (list, tuple)) else flops)["flops"]
  value, grads = fn(trainable, rest)
  return value, grads, flops


def test_frozen_blocks_cut_the_backward_pass():
  full_value, full, full_flops = _loss_and_grad(0, False)
  value, grads, flops = _loss_and_grad(1, False)
  np.testing.assert_array_equal(value, full_value)  # same forward
  enc, full_enc = grads["encoder"], full["encoder"]
  for name in ("patch_embed", "cls_token", "blocks_0"):  # frozen: no gradient reaches them
    assert all((g == 0).all() for g in jax.tree.leaves(enc[name])), name
    assert any((g != 0).any() for g in jax.tree.leaves(full_enc[name])), name
  for name in ("blocks_1", "blocks_2", "norm"):  # trained: the same gradient as without the cut
    for g, ref in zip(jax.tree.leaves(enc[name]), jax.tree.leaves(full_enc[name])):
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
  # One of three blocks and the stem lose their backward: about 2 block-forwards of 9 units.
  assert flops < 0.85 * full_flops, (flops, full_flops)


def test_stage2_differentiates_the_heads_only():
  _, _, fwd_and_all_grads = _loss_and_grad(0, False)
  _, grads, flops = _loss_and_grad(0, True)
  assert set(grads) == {"heads"}
  model, v, views = _refiner(0)
  fwd = jax.jit(lambda p: model.apply(p, v["buffers"], v["batch_stats"], views)[0])
  fwd_flops = fwd.lower(v["params"]).compile().cost_analysis()
  fwd_flops = (fwd_flops[0] if isinstance(fwd_flops, (list, tuple)) else fwd_flops)["flops"]
  # The encoder runs forward only: the step costs little more than the forward pass, far less
  # than a backward through the encoder (which would be ~3x the forward).
  assert flops < 1.3 * fwd_flops and fwd_and_all_grads > 2.5 * fwd_flops, (
      flops, fwd_flops, fwd_and_all_grads)
  # The stage-2 optimizer holds and updates the heads only.
  tx, _ = optim.make_optimizer(v["params"], base_lr=1e-3, global_batch_size=8, warmup_steps=1,
                               total_steps=4, depth=3, freeze_encoder=True)
  opt_state = tx.init(v["params"])
  paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
  assert paths and not any("encoder" in p for p in paths)
  updates, _ = tx.update(grads, opt_state, v["params"])
  assert set(updates) == {"heads"}
  with pytest.raises(ValueError, match="heads only"):
    tx.update({"encoder": v["params"]["encoder"], **grads}, opt_state, v["params"])


def test_frozen_blocks_refused_for_post_norm():
  vit = ViT(patch_size=4, width=32, depth=2, num_heads=2, pos_grid=4, prenorm=False,
            frozen_blocks=1)
  with pytest.raises(ValueError, match="embed_norm"):
    vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


# ---------------------------------------------------------------------------------- uint8 views


def test_uint8_views_normalised_on_device_bit_identical():
  model, v, _ = _refiner(0)
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (2, 8, 16, 16, 3)).astype(np.uint8)
  pixels[0, 0, :16, :16] = np.arange(256).reshape(16, 16, 1)  # every level in every channel
  host = multicrop.normalize(pixels, multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD)
  np.testing.assert_array_equal(jax.jit(model.normalize)(pixels), host)
  apply = jax.jit(lambda views: model.apply(v["params"], v["buffers"], v["batch_stats"], views))
  out_uint8, stats_uint8 = apply(jnp.asarray(pixels))
  out_float, stats_float = apply(jnp.asarray(host))
  for a, b in zip(jax.tree.leaves((out_uint8, stats_uint8)), jax.tree.leaves((out_float,
                                                                               stats_float))):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- bf16 head precision

D, PROJ, PRED, OUT, N, TAU = 32, 48, 40, 16, 24, 0.2


def _ours(dtype, params, stats, x, neighbours):
  head = IDHead(proj_hidden_dim=PROJ, pred_hidden_dim=PRED, output_dim=OUT, dtype=dtype)
  logits_dtype = None if dtype == jnp.float32 else dtype

  def loss(params):
    (z, p), _ = head.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
    return nna.nna_loss(z[:2], neighbours, p, temperature=TAU,
                        logits_dtype=logits_dtype)[0], (z, p)

  (value, (z, p)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, grads, z, p


def _torch_nna(pre, post, pred):
  """The reference loss as written (tests/test_nna_loss.py's transcription, whose internal
  allclose self-check does not take mixed dtypes), views first: pre, post [2, N, d], pred [V, N, d];
  "reference" local indexing: local term k pairs the anchors with prediction view k."""
  pre, post, pred = (F.normalize(t, dim=-1) for t in (pre, post, pred))
  labels = torch.arange(pre.shape[1])
  mask = F.one_hot(labels, num_classes=len(labels)).to(pred.dtype)
  pairs = [(0, 1), (1, 0)] + [(a, k) for a in (0, 1) for k in range(pred.shape[0] - 2)]
  total = 0.0
  for a, b in pairs:
    logits = (post[a] @ pred[b].T / TAU) * mask + (pre[a] @ pred[b].T / TAU) * (1 - mask)
    total = total + F.cross_entropy(logits, labels)
  return total / len(pairs)


def _torch(params, x, neighbours, autocast):
  proj, pred = torch_head(params)
  with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
    xt = torch.from_numpy(np.asarray(x))       # [3, N, D] views g1, g2, l1: one BN call
    z = proj(xt.reshape(3 * N, D))
    p = pred(z).reshape(3, N, OUT)
    z = z.reshape(3, N, OUT)
    loss = _torch_nna(z[:2].detach(), torch.from_numpy(np.asarray(neighbours)), p)
  loss.backward()
  grads = {f"{name}_{i}": {"dense": {"kernel": blk[0].weight.grad.numpy().T},
                           "bn": {"scale": blk[1].weight.grad.numpy(),
                                  "bias": blk[1].bias.grad.numpy()}}
           for name, seq in (("projector", proj), ("predictor", pred))
           for i, blk in enumerate(seq)}
  return loss.item(), grads, z.dtype, p.dtype


def test_head_and_loss_match_torch_autocast():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, N, D)) * 2 + 0.5, jnp.float32)
  neighbours = jnp.asarray(rng.normal(size=(2, N, OUT)), jnp.float32)
  variables = IDHead(proj_hidden_dim=PROJ, pred_hidden_dim=PRED, output_dim=OUT).init(
      jax.random.PRNGKey(0), x, train=False)
  params, stats = jax.tree.map(np.asarray, variables["params"]), variables["batch_stats"]
  def grad_error(grads, ref):
    """Largest per-leaf relative error (norms), over leaves whose reference gradient is not ~0:
    projector_2's BatchNorm bias has an exactly-zero true gradient (the next BN removes any
    shift), so its value is rounding noise in both frameworks."""
    pairs = [(np.ravel(g), np.ravel(r)) for g, r in zip(jax.tree.leaves(grads),
                                                         jax.tree.leaves(ref))]
    scale = max(np.linalg.norm(r) for _, r in pairs)
    return max(np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in pairs
               if np.linalg.norm(r) > 1e-3 * scale)

  errors = {}
  for mode, dtype, autocast in (("fp32", jnp.float32, False), ("bf16", jnp.bfloat16, True)):
    value, grads, z, p = _ours(dtype, params, stats, x, neighbours)
    ref_value, ref_grads, zt_dtype, pt_dtype = _torch(params, x, neighbours, autocast)
    assert z.dtype == p.dtype == dtype and zt_dtype == pt_dtype == (
        torch.bfloat16 if autocast else torch.float32)
    errors[mode] = (abs(float(value) - ref_value), grad_error(grads, ref_grads))
    if mode == "bf16":  # against fp32 torch, to show the bf16 boundaries are what is matched
      fp32_value, fp32_grads, _, _ = _torch(params, x, neighbours, False)
      errors["bf16_vs_torch_fp32"] = (abs(float(value) - fp32_value),
                                      grad_error(grads, fp32_grads))
  # fp32: summation order only. bf16: one bf16 rounding here and there (8 mantissa bits,
  # 2^-8 = 0.4%): loss within 1e-2 absolute (value ~3), every gradient leaf within 5% (norm).
  assert errors["fp32"][0] < 1e-5 and errors["fp32"][1] < 1e-4, errors
  assert errors["bf16"][0] < 1e-2 and errors["bf16"][1] < 5e-2, errors
  # and closer to torch autocast than to torch fp32 (the bf16 path is not just fp32)
  assert errors["bf16"][1] < errors["bf16_vs_torch_fp32"][1], errors
