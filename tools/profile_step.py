r"""Where the refinement step's time goes: each piece of the step jitted and timed on its own.

  python tools/profile_step.py --preset tiny --dtype float32      # the peer's tiny shapes
  python tools/profile_step.py --preset tiny --attention einsum   # another attention formulation

Prints one JSON line and a markdown table: encoder forward, encoder backward, heads, retrieval,
loss, optimizer, EMA and enqueue (median seconds over --steps calls each, same shapes as the real
step), their sum, the whole jitted step and its compile time. See mim_refiner_jax/step_bench.py.
Runs on the default devices (one CPU device unless XLA_FLAGS asks for more).
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mim_refiner_jax import step_bench  # pylint: disable=wrong-import-position


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(step_bench.PRESETS))
  for field in dataclasses.fields(step_bench.BenchConfig):
    parser.add_argument("--" + field.name, type=type(field.default), default=None,
                        help=f"overrides the preset (default without preset: {field.default})")
  parser.add_argument("--steps", type=int, default=5, help="timed calls per piece")
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
  prof = step_bench.profile(setup, args.steps)
  print(json.dumps({"config": dataclasses.asdict(cfg), "profile_s": {
      k: round(v, 4) for k, v in prof.items()}}), flush=True)
  print(step_bench.format_profile(prof))


if __name__ == "__main__":
  main()
