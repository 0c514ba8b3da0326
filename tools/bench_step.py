r"""Benchmark of the refinement train step: compile time, step time, FLOPs, communication.

Runs one subprocess per device count (simulated CPU devices via XLA_FLAGS on a CPU host, or the
real devices when --devices is left at its default on an accelerator host) and prints one JSON line
per run plus a summary:

  python tools/bench_step.py                          # tiny config on 1 and 8 simulated devices
  python tools/bench_step.py --devices 1,8 --rules fsdp --size tiny --batch 64

Reported: compile seconds (AOT lower + compile), median step seconds over --steps timed steps (after
a warm-up step), cost_analysis FLOPs per step, memory_analysis bytes, and the collectives of the
optimised HLO (count and bytes per kind, the largest ones, and whether any has the queue's size Q
and the vector size d, or Q alone, in its shape, i.e. whether a queue array ever moves).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(args):
  """Runs in the subprocess: builds the setup on all visible devices and measures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from mim_refiner_jax import sharding
  from mim_refiner_jax import state as state_lib
  from mim_refiner_jax import train_step
  from mim_refiner_jax.config import HeadSpec
  from mim_refiner_jax.models.heads import IDHead
  from mim_refiner_jax.models.refiner import Refiner
  from mim_refiner_jax.models.vit import ViT, vit_kwargs
  from mim_refiner_jax.optim import make_optimizer

  n_dev = jax.device_count()
  fsdp = 2 if args.rules == "fsdp" and n_dev % 2 == 0 else 1
  mesh = sharding.make_mesh(fsdp=fsdp)
  kwargs = vit_kwargs(args.size, args.patch, image_size=args.global_px)
  encoder = ViT(**kwargs, dtype=jnp.dtype(args.dtype))
  heads = [HeadSpec("nnclr_temp02_cls", "main", 0.2)] + [
      HeadSpec(f"nnclr_temp02_cls{b}", b, 0.2)
      for b in range(kwargs["depth"] - 2, kwargs["depth"] - 1 - args.heads, -1)]
  head = IDHead(proj_hidden_dim=args.proj_hidden, pred_hidden_dim=args.pred_hidden,
                output_dim=args.out_dim, dtype=jnp.dtype(args.dtype))
  model = Refiner(encoder, heads, head)
  stage2 = args.stage == 2

  def init_fn(tx):
    return state_lib.make_init_fn(
        model, tx, global_shape=(args.global_px,) * 2 + (3,),
        local_shape=(args.local_px,) * 2 + (3,), queue_size=args.queue, with_ema=not stage2)

  class _NoTx:
    init = staticmethod(lambda p: ())
  params = jax.eval_shape(init_fn(_NoTx()), jax.random.PRNGKey(0))["params"]
  tx, lr_fn = make_optimizer(params, base_lr=4e-4, global_batch_size=args.batch,
                             warmup_steps=10, total_steps=1000, depth=kwargs["depth"],
                             freeze_encoder=stage2)
  rules = sharding.state_rules(args.rules)
  state, shardings = state_lib.create_state(init_fn(tx), jax.random.PRNGKey(0), mesh, rules)
  step = train_step.make_train_step(
      model, tx, mesh, shardings, topk=1 if stage2 else 20, ema_decay=None if stage2 else 0.9999,
      freeze_encoder=stage2, sim_dtype=jnp.bfloat16, lr_fn=lr_fn)
  rng = np.random.default_rng(0)
  host = {
      "global": rng.normal(size=(2, args.batch, args.global_px, args.global_px, 3)).astype(
          np.float32),
      "local": rng.normal(size=(args.num_local, args.batch, args.local_px, args.local_px, 3)
                          ).astype(np.float32),
      "label": rng.integers(0, 10, args.batch).astype(np.int32),
      "index": np.arange(args.batch, dtype=np.int32)}
  batch = sharding.global_batch(mesh, host)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  comms = sharding.collectives(compiled.as_text())

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)

  itemsize = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "f16": 2, "s8": 1, "u8": 1}
  by_kind = {}
  for op, dtype, shape in comms:
    entry = by_kind.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += int(np.prod(shape)) * itemsize.get(dtype, 4)
  largest = sorted(comms, key=lambda c: -int(np.prod(c[2])))[:6]
  return {
      "devices": n_dev, "mesh": dict(mesh.shape), "rules": args.rules, "stage": args.stage,
      "size": args.size, "batch": args.batch, "queue": args.queue, "heads": len(heads),
      "device_kind": jax.devices()[0].device_kind,
      "compile_s": round(compile_s, 2),
      "step_s_median": round(float(np.median(times)), 4),
      "step_s_min": round(float(np.min(times)), 4),
      "img_per_s": round(args.batch / float(np.median(times)), 1),
      "flops_per_step": float(cost.get("flops", -1)) if cost else None,
      "memory": None if mem is None else {
          k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes") if hasattr(mem, k)},
      "collectives": by_kind,
      "largest_collectives": [f"{op} {dtype}{list(shape)}" for op, dtype, shape in largest],
      "queue_sized_collectives": [
          f"{op} {dtype}{list(shape)}" for op, dtype, shape in comms
          if args.queue in shape and (len(shape) == 1 or args.out_dim in shape)],
      "loss": float(metrics["loss"]),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,8", help="simulated CPU device counts")
  parser.add_argument("--rules", default="replicate", choices=["replicate", "fsdp"])
  parser.add_argument("--stage", type=int, default=3, choices=[2, 3])
  parser.add_argument("--size", default="mu")
  parser.add_argument("--patch", type=int, default=4)
  parser.add_argument("--global_px", type=int, default=16)
  parser.add_argument("--local_px", type=int, default=8)
  parser.add_argument("--num_local", type=int, default=2)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--queue", type=int, default=72)
  parser.add_argument("--heads", type=int, default=2, help="main + the blocks below the last")
  parser.add_argument("--proj_hidden", type=int, default=48)
  parser.add_argument("--pred_hidden", type=int, default=40)
  parser.add_argument("--out_dim", type=int, default=16)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child:
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return
  results = []
  for n in [int(x) for x in args.devices.split(",")]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n}").strip()
    out = subprocess.run([sys.executable, __file__, "--child"] + sys.argv[1:], env=env,
                         capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
      sys.exit(f"benchmark on {n} devices failed:\n{out.stderr[-4000:]}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
    print(json.dumps(results[-1]), flush=True)
  print("\n devices | compile s | step s (median) | img/s | GFLOP/step | queue-sized collectives")
  for r in results:
    print(f" {r['devices']:7d} | {r['compile_s']:9.2f} | {r['step_s_median']:15.4f} | "
          f"{r['img_per_s']:5.1f} | {r['flops_per_step'] / 1e9:10.3f} | "
          f"{len(r['queue_sized_collectives'])}")


if __name__ == "__main__":
  main()
