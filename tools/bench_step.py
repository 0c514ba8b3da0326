r"""Benchmark of the refinement train step, optionally against the PyTorch peer in the same run.

  python tools/bench_step.py                           # "mu" test config on 1 and 8 sim. devices
  python tools/bench_step.py --devices 1,8 --rules fsdp --size tiny --batch 64
  python tools/bench_step.py --preset tiny --dtype float32 --threads 2 --rounds 2   # vs the peer
  python tools/bench_step.py --preset l16 --dtype bfloat16 --attention cudnn       # on a GPU

With --preset (the peer's "tiny" or "l16" shapes, mim_refiner_jax/step_bench.py) the PyTorch peer
step (--peer, default ../shared/bench/torch_reference_step.py next to the repository) runs with
the same shapes, precision (float32 = its --amp none, bfloat16 = --amp bf16) and thread count;
ours and the peer alternate for --rounds rounds (each a fresh process, --steps timed steps after
one warm-up step), and the summary gives both medians over all timed steps and the ratio.
`--peer none` skips the peer. --threads pins both sides to the first N cores (default: all).

Reported for ours: compile seconds (AOT lower + compile), median step seconds, images/s,
cost_analysis FLOPs per step, memory_analysis bytes, and the collectives of the optimised HLO
(count and bytes per kind, the largest ones, and whether any has the queue's size Q and the
vector size d, or Q alone, in its shape, i.e. whether a queue array ever moves).
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_PEER = os.path.join(ROOT, "..", "shared", "bench", "torch_reference_step.py")


def run_one(args):
  """Runs in the child process: builds the setup on all visible devices and measures."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mim_refiner_jax import sharding
  from mim_refiner_jax import step_bench

  cfg = config_from_args(args)
  s = step_bench.build(cfg)
  t0 = time.perf_counter()
  compiled = s.step.lower(s.state, s.batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  comms = sharding.collectives(compiled.as_text())
  times = step_bench.time_calls(compiled, (s.state, s.batch), args.steps,
                                carry=lambda a, out: (out[0], a[1]))

  itemsize = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "f16": 2, "s8": 1, "u8": 1}
  by_kind = {}
  for op, dtype, shape in comms:
    entry = by_kind.setdefault(op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += int(np.prod(shape)) * itemsize.get(dtype, 4)
  largest = sorted(comms, key=lambda c: -int(np.prod(c[2])))[:6]
  flops = float(cost.get("flops", -1)) if cost else None
  median = float(np.median(times))
  return {
      "impl": "ours", "devices": jax.device_count(), "mesh": dict(s.mesh.shape),
      **dataclasses.asdict(cfg), "device_kind": jax.devices()[0].device_kind,
      "threads": len(os.sched_getaffinity(0)),
      "compile_s": round(compile_s, 2),
      "step_s_median": round(median, 4),
      "step_s_all": [round(t, 4) for t in times],
      "img_per_s": round(cfg.batch / median, 1),
      "flops_per_step": flops,
      "tflops_per_s": None if flops is None else round(flops / median / 1e12, 3),
      "memory": None if mem is None else {
          k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes") if hasattr(mem, k)},
      "collectives": by_kind,
      "largest_collectives": [f"{op} {dtype}{list(shape)}" for op, dtype, shape in largest],
      "queue_sized_collectives": [
          f"{op} {dtype}{list(shape)}" for op, dtype, shape in comms
          if cfg.queue in shape and (len(shape) == 1 or cfg.out_dim in shape)],
  }


def config_from_args(args):
  from mim_refiner_jax import step_bench  # pylint: disable=g-import-not-at-top
  values = dict(step_bench.PRESETS[args.preset]) if args.preset else {}
  values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(step_bench.BenchConfig)
                 if getattr(args, f.name) is not None})
  return step_bench.BenchConfig(**values)


def peer_command(args, cfg):
  """The peer's command line for the same shapes, precision and threads as our config."""
  from mim_refiner_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  size = SIZES[cfg.size]
  depth = size["depth"]
  blocks = ",".join(str(b) for b in range(depth - 2, depth - 1 - cfg.heads, -1))
  return [sys.executable, args.peer, "--preset", args.preset or "tiny",
          "--dim", str(size["width"]), "--depth", str(depth), "--heads", str(size["num_heads"]),
          "--patch", str(cfg.patch), "--global-res", str(cfg.global_px),
          "--local-res", str(cfg.local_px), "--num-local", str(cfg.num_local),
          "--batch", str(cfg.batch), "--head-blocks", blocks,
          "--proj-hidden", str(cfg.proj_hidden), "--pred-hidden", str(cfg.pred_hidden),
          "--out-dim", str(cfg.out_dim), "--queue-size", str(cfg.queue), "--topk", "20",
          "--amp", "none" if cfg.dtype == "float32" else "bf16",
          "--device", "cuda" if args.peer_device == "cuda" else "cpu",
          "--threads", str(args.threads), "--warmup", "1", "--steps", str(args.steps)]


def _pin(threads):
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  return lambda: os.sched_setaffinity(0, cpus)


def run_ours(args, n_devices, argv):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if args.platform == "cpu":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"] + argv, env=env,
                       capture_output=True, text=True, check=False, preexec_fn=_pin(args.threads))
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    sys.exit(f"benchmark on {n_devices} devices failed:\n{out.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def run_peer(args, cfg):
  cmd = peer_command(args, cfg)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       preexec_fn=_pin(args.threads))
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    sys.exit(f"the peer failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
  return json.loads(lines[-1])


def parse(argv):
  from mim_refiner_jax import step_bench  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default=None, choices=sorted(step_bench.PRESETS),
                      help="the peer's shapes; also runs the peer unless --peer none")
  parser.add_argument("--devices", default=None,
                      help="simulated CPU device counts (default 1 with --preset, else 1,8)")
  for field in dataclasses.fields(step_bench.BenchConfig):
    parser.add_argument("--" + field.name, type=type(field.default), default=None,
                        help=f"overrides the preset (default without one: {field.default})")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per run and side")
  parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="cores for both sides (torch.set_num_threads and CPU affinity)")
  parser.add_argument("--peer", default=DEFAULT_PEER, help="path of torch_reference_step.py, "
                      "or 'none'")
  parser.add_argument("--platform", default="cpu", choices=["cpu", "default"],
                      help="cpu: simulated CPU devices; default: JAX's default backend (GPU/TPU)")
  parser.add_argument("--peer_device", default="cpu", choices=["cpu", "cuda"])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse(argv)
  if args.child:
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return
  cfg = config_from_args(args)
  use_peer = args.preset is not None and args.peer != "none"
  if use_peer and not os.path.exists(args.peer):
    sys.exit(f"peer script not found at {args.peer}; pass --peer PATH or --peer none")
  devices = [int(x) for x in (args.devices or ("1" if args.preset else "1,8")).split(",")]
  load = os.getloadavg()
  ours, peer = {n: [] for n in devices}, []
  for r in range(args.rounds if use_peer else 1):
    sides = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]
    for side in sides:
      if side == "ours":
        for n in devices:
          ours[n].append(run_ours(args, n, argv))
          print(json.dumps(ours[n][-1]), flush=True)
      elif use_peer:
        peer.append(run_peer(args, cfg))
        print(json.dumps(peer[-1]), flush=True)

  print(f"\n load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f} "
        f"(on {os.cpu_count()} cores; other processes make timings noisy)")
  print(" side    | devices | compile s | step s (median) | img/s | GFLOP/step | queue-sized colls")
  for n in devices:
    rs = ours[n]
    med = statistics.median(t for r in rs for t in r["step_s_all"])
    print(f" ours    | {n:7d} | {statistics.median(r['compile_s'] for r in rs):9.2f} | "
          f"{med:15.4f} | {cfg.batch / med:5.1f} | {rs[0]['flops_per_step'] / 1e9:10.3f} | "
          f"{len(rs[0]['queue_sized_collectives'])}")
  if peer:
    peer_med = statistics.median(t for r in peer for t in r["step_s_all"])
    print(f" peer    |       1 |         - | {peer_med:15.4f} | {cfg.batch / peer_med:5.1f} |")
    ours_med = statistics.median(t for r in ours[devices[0]] for t in r["step_s_all"])
    print(f"\n ratio peer/ours ({devices[0]} device, {cfg.dtype}, {args.threads} threads, "
          f"{args.rounds} alternating rounds x {args.steps} steps): {peer_med / ours_med:.2f}x")


if __name__ == "__main__":
  main()
