r"""Where the refinement step's time goes: each piece of the step jitted and timed on its own.

  python tools/profile_step.py --preset tiny --dtype float32      # the peer's tiny shapes
  python tools/profile_step.py --preset tiny --attention dot_product_attention  # other attention
  python tools/profile_step.py --preset tiny --retrieval_only     # one head's retrieval vs the peer

Prints one JSON line and a markdown table: encoder forward, encoder backward, heads, retrieval,
loss, optimizer, EMA and enqueue (median seconds over --steps calls each, same shapes as the real
step), their sum, the whole jitted step and its compile time. See mim_refiner_jax/step_bench.py.
Runs on the default devices (one CPU device unless XLA_FLAGS asks for more).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mim_refiner_jax import step_bench  # pylint: disable=wrong-import-position


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(step_bench.PRESETS))
  for field in dataclasses.fields(step_bench.BenchConfig):
    parser.add_argument("--" + field.name, type=type(field.default), default=None,
                        help=f"overrides the preset (default without preset: {field.default})")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per piece")
  parser.add_argument("--retrieval_only", action="store_true",
                      help="time one head's retrieval + enqueue, ours and the peer's NNQueue")
  parser.add_argument("--peer", default=os.path.join(ROOT, "..", "shared", "bench",
                                                     "torch_reference_step.py"),
                      help="the peer script (for --retrieval_only), or 'none'")
  return parser.parse_args(argv)


def config_from_args(args) -> step_bench.BenchConfig:
  values = dict(step_bench.PRESETS[args.preset])
  values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(step_bench.BenchConfig)
                 if getattr(args, f.name) is not None})
  return step_bench.BenchConfig(**values)


def main(argv=None):
  args = parse(argv)
  cfg = config_from_args(args)
  setup = step_bench.build(cfg)
  if args.retrieval_only:
    peer = None
    if args.peer != "none":
      if not os.path.exists(args.peer):
        sys.exit(f"peer script not found at {args.peer}; pass --peer PATH or --peer none")
      spec = importlib.util.spec_from_file_location("torch_reference_step", args.peer)
      peer = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(peer)
    rows = step_bench.retrieval_rows(setup, peer, threads=len(os.sched_getaffinity(0)),
                                     steps=args.steps)
    print(json.dumps({"retrieval_s": {k: round(v, 4) for k, v in rows.items()}}))
    print("| retrieval + enqueue, one head | s/call |\n|---|---:|")
    print("\n".join(f"| {k} | {v:.4f} |" for k, v in rows.items()))
    return
  prof = step_bench.profile(setup, args.steps)
  print(json.dumps({"config": dataclasses.asdict(cfg), "profile_s": {
      k: round(v, 4) for k, v in prof.items()}}), flush=True)
  print(step_bench.format_profile(prof))


if __name__ == "__main__":
  main()
