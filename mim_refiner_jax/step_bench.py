"""The refinement step on synthetic inputs, timed whole and piece by piece.

Shared by tools/bench_step.py (whole step, against the PyTorch peer) and tools/profile_step.py
(where the step time goes). `PRESETS` are the shapes of the peer's presets
(../shared/bench/torch_reference_step.py): "tiny" (ViT-Ti/4 on 32/16 px, batch 64, 4 heads, queue
65536, top-20) and "l16" (ViT-L/16 on 224/96 px, 10 local views, batch 32, 8 heads).

The profile times separately jitted pieces with the shapes of the real step:
  encoder forward            encode() of all views (both resolution groups)
  encoder backward           vjp of encode() w.r.t. the encoder params, minus the forward
  heads fwd+bwd              projector + predictor of every head, value and grads
  retrieval                  queue retrieval of every head (similarity matmul + top-k + fetch)
  loss fwd+bwd               NNA loss of every head, value and grads w.r.t. the predictions
  optimizer                  tx.update + apply_updates over all params
  EMA                        ema_update of the encoder
  enqueue                    FIFO write of every head's queue
and the whole compiled step; the pieces' sum next to it shows what fusion across pieces saves.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mim_refiner_jax import sharding
from mim_refiner_jax import state as state_lib
from mim_refiner_jax import train_step
from mim_refiner_jax.config import HeadSpec
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.models.vit import ViT, vit_kwargs
from mim_refiner_jax.objectives import nna
from mim_refiner_jax.objectives import queue as queue_lib
from mim_refiner_jax.optim import ema_update, make_optimizer

# Same shapes as the peer's presets; "heads" = main + the blocks below the last one.
PRESETS = {
    "tiny": dict(size="tiny", patch=4, global_px=32, local_px=16, num_local=4, batch=64,
                 queue=65536, heads=4, proj_hidden=256, pred_hidden=512, out_dim=64),
    "l16": dict(size="large", patch=16, global_px=224, local_px=96, num_local=10, batch=32,
                queue=65536, heads=8, proj_hidden=2048, pred_hidden=4096, out_dim=256),
}


@dataclasses.dataclass
class BenchConfig:
  size: str = "mu"
  patch: int = 4
  global_px: int = 16
  local_px: int = 8
  num_local: int = 2
  batch: int = 16
  queue: int = 72
  heads: int = 2
  proj_hidden: int = 48
  pred_hidden: int = 40
  out_dim: int = 16
  dtype: str = "float32"
  stage: int = 3
  rules: str = "replicate"
  attention: str = "einsum"


@dataclasses.dataclass
class Setup:
  cfg: BenchConfig
  mesh: Any
  model: Refiner
  tx: Any
  state: dict
  shardings: Any
  step: Any
  batch: dict
  topk: int


def build(cfg: BenchConfig) -> Setup:
  """Model, optimizer, sharded state, jitted step and a random batch on all visible devices."""
  n_dev = jax.device_count()
  fsdp = 2 if cfg.rules == "fsdp" and n_dev % 2 == 0 else 1
  mesh = sharding.make_mesh(fsdp=fsdp)
  kwargs = vit_kwargs(cfg.size, cfg.patch, image_size=cfg.global_px)
  dtype = jnp.dtype(cfg.dtype)
  encoder = ViT(**kwargs, dtype=dtype, attention=cfg.attention)
  depth = kwargs["depth"]
  heads = [HeadSpec("nnclr_temp02_cls", "main", 0.2)] + [
      HeadSpec(f"nnclr_temp02_cls{b}", b, 0.2) for b in range(depth - 2, depth - 1 - cfg.heads, -1)]
  head = IDHead(proj_hidden_dim=cfg.proj_hidden, pred_hidden_dim=cfg.pred_hidden,
                output_dim=cfg.out_dim, dtype=dtype)
  model = Refiner(encoder, heads, head)
  stage2 = cfg.stage == 2

  def init_fn(tx):
    return state_lib.make_init_fn(
        model, tx, global_shape=(cfg.global_px,) * 2 + (3,),
        local_shape=(cfg.local_px,) * 2 + (3,) if cfg.num_local else None,
        queue_size=cfg.queue, with_ema=not stage2)

  class _NoTx:
    init = staticmethod(lambda p: ())

  params = jax.eval_shape(init_fn(_NoTx()), jax.random.PRNGKey(0))["params"]
  tx, lr_fn = make_optimizer(params, base_lr=4e-4, global_batch_size=cfg.batch, warmup_steps=10,
                             total_steps=1000, depth=depth, freeze_encoder=stage2)
  state, shardings = state_lib.create_state(init_fn(tx), jax.random.PRNGKey(0), mesh,
                                            sharding.state_rules(cfg.rules))
  topk = 1 if stage2 else 20
  step = train_step.make_train_step(
      model, tx, mesh, shardings, topk=topk, ema_decay=None if stage2 else 0.9999,
      freeze_encoder=stage2, sim_dtype=jnp.bfloat16, lr_fn=lr_fn)
  rng = np.random.default_rng(0)
  host = {
      "global": rng.normal(size=(2, cfg.batch, cfg.global_px, cfg.global_px, 3)).astype(np.float32),
      "local": rng.normal(size=(cfg.num_local, cfg.batch, cfg.local_px, cfg.local_px, 3)
                          ).astype(np.float32),
      "label": rng.integers(0, 10, cfg.batch).astype(np.int32),
      "index": np.arange(cfg.batch, dtype=np.int32)}
  return Setup(cfg, mesh, model, tx, state, shardings, step, sharding.global_batch(mesh, host),
               topk)


def time_calls(fn, args, steps: int, *, carry=None) -> list[float]:
  """Seconds per call of `fn(*args)` after one warm-up call (`carry` feeds outputs back)."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    if carry is not None:
      args = carry(args, out)
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return times


def _pieces(s: Setup):
  """`{name: (jitted fn, args)}` for every piece of the step (see the module docstring)."""
  model, state, batch, mesh = s.model, s.state, s.batch, s.mesh
  params, buffers = state["params"], state["buffers"]
  local = batch["local"] if s.cfg.num_local else None
  b = batch["global"].shape[1]
  index2 = jnp.broadcast_to(batch["index"], (2, b))

  def encode(enc, g, l):
    return model.encode(enc, buffers, g, l)

  def encode_vjp(enc, g, l):
    feats, vjp = jax.vjp(lambda e: encode(e, g, l), enc)
    return vjp(jax.tree.map(jnp.ones_like, feats))

  feats = jax.jit(encode)(params["encoder"], batch["global"], local)

  def heads_fwd_bwd(head_params, feats):
    def f(hp, x):
      total, outs = 0.0, {}
      for h in model.heads:
        (z, p), _ = model.head.apply({"params": hp[h.name], "batch_stats":
                                      state["batch_stats"][h.name]}, x[h.name], train=True,
                                     mutable=["batch_stats"])
        total += jnp.sum(p) + jnp.sum(z)
        outs[h.name] = (z, p)
      return total, outs
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(head_params, feats)

  (_, outs), _ = jax.jit(heads_fwd_bwd)(params["heads"], feats)
  anchors = {n: jax.lax.stop_gradient(z[:2]) for n, (z, _) in outs.items()}
  preds = {n: p for n, (_, p) in outs.items()}
  key = jax.random.PRNGKey(1)

  def retrieve(queues, anchors):
    return {n: queue_lib.retrieve(queues[n], anchors[n], index2, topk=s.topk,
                                  key=jax.random.fold_in(key, i), mesh=mesh)[0]
            for i, n in enumerate(anchors)}

  neighbours = jax.jit(retrieve)(state["queues"], anchors)

  def loss_fwd_bwd(preds):
    def f(p):
      return sum(nna.nna_loss(anchors[n], neighbours[n], p[n], temperature=0.2)[0] for n in p)
    return jax.value_and_grad(f)(preds)

  grads = jax.tree.map(jnp.ones_like, params)

  def optimizer(grads, opt, params):
    updates, opt = s.tx.update(grads, opt, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt

  def enqueue(queues, anchors):
    return {n: queue_lib.enqueue(queues[n], anchors[n][0], batch["index"], batch["label"],
                                 mesh=mesh) for n in queues}

  pieces = {
      "encoder forward": (encode, (params["encoder"], batch["global"], local)),
      "encoder fwd+bwd": (encode_vjp, (params["encoder"], batch["global"], local)),
      "heads fwd+bwd": (heads_fwd_bwd, (params["heads"], feats)),
      "retrieval": (retrieve, (state["queues"], anchors)),
      "loss fwd+bwd": (loss_fwd_bwd, (preds,)),
      "optimizer": (optimizer, (grads, state["opt"], params)),
  }
  if "ema" in state:
    pieces["EMA"] = (lambda e, p: ema_update(e, p, 0.9999), (state["ema"], params["encoder"]))
  pieces["enqueue"] = (enqueue, (state["queues"], anchors))
  return {name: (jax.jit(fn), args) for name, (fn, args) in pieces.items()}


def profile(s: Setup, steps: int = 5) -> dict:
  """`{piece: median seconds}` plus "whole step" and "compile whole step" (seconds)."""
  out = {}
  for name, (fn, args) in _pieces(s).items():
    out[name] = float(np.median(time_calls(fn, args, steps)))
  out["encoder backward"] = out.pop("encoder fwd+bwd") - out["encoder forward"]
  t0 = time.perf_counter()
  compiled = s.step.lower(s.state, s.batch).compile()
  out["compile whole step"] = time.perf_counter() - t0
  state = s.state
  times = time_calls(compiled, (state, s.batch), steps,
                     carry=lambda args, out: (out[0], args[1]))
  s.state = None  # donated
  out["whole step"] = float(np.median(times))
  return out


PROFILE_ORDER = ("encoder forward", "encoder backward", "heads fwd+bwd", "retrieval",
                 "loss fwd+bwd", "optimizer", "EMA", "enqueue")


def format_profile(prof: dict) -> str:
  """Markdown table of a `profile()` result."""
  rows = [n for n in PROFILE_ORDER if n in prof]
  total = sum(prof[n] for n in rows)
  lines = ["| piece | s/step | share of pieces |", "|---|---:|---:|"]
  lines += [f"| {n} | {prof[n]:.3f} | {100 * prof[n] / total:.0f}% |" for n in rows]
  lines += [f"| sum of pieces | {total:.3f} | |",
            f"| whole step (one jit) | {prof['whole step']:.3f} | |",
            f"| compile whole step | {prof['compile whole step']:.1f} | |"]
  return "\n".join(lines)


def retrieval_rows(s: Setup, peer_module=None, threads: int | None = None, steps: int = 5) -> dict:
  """Seconds per call of one head's retrieval + enqueue: ours (jitted, bf16 similarity, f32
  selection) and, given the peer's module, its NNQueue in train mode (mask, top-k, enqueue) in
  float32 and under bf16 autocast. Same shapes: 2B anchor rows, the preset's queue and top-k."""
  cfg, mesh = s.cfg, s.mesh
  rng = np.random.default_rng(0)
  b = cfg.batch
  z = rng.normal(size=(2, b, cfg.out_dim)).astype(np.float32)
  index = np.arange(b, dtype=np.int32)
  queue = s.state["queues"][s.model.heads[0].name]

  def ours(queue, z, index, key):
    nn_x, _ = queue_lib.retrieve(queue, z, jnp.broadcast_to(index, (2, b)), topk=s.topk, key=key,
                                 mesh=mesh)
    return nn_x, queue_lib.enqueue(queue, z[0], index, mesh=mesh)

  fn = jax.jit(ours, donate_argnums=(0,))  # the queue is updated in place, as in the step
  queue = jax.tree.map(jnp.copy, queue)
  rows = {"ours (bf16 matmul, f32 top-k)": float(np.median(time_calls(
      fn, (queue, z, index, jax.random.PRNGKey(0)), steps,
      carry=lambda args, out: (out[1],) + tuple(args[1:]))))}
  if peer_module is not None:
    import torch  # pylint: disable=g-import-not-at-top
    if threads:
      torch.set_num_threads(threads)
    q = peer_module.NNQueue(cfg.queue, cfg.out_dim, s.topk).train()
    x = torch.from_numpy(z.reshape(2 * b, cfg.out_dim))
    idx = torch.from_numpy(index.astype(np.int64))
    for name, ctx in (("peer float32", None), ("peer bf16 autocast", torch.bfloat16)):
      def call():
        if ctx is None:
          return q(x, idx, idx)
        with torch.autocast("cpu", dtype=ctx):
          return q(x, idx, idx)
      call()
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
      rows[name] = float(np.median(times))
  return rows
