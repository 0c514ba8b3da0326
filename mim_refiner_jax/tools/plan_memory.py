r"""Per-device memory of a refinement run, and the smallest change that makes it fit.

Compiles the real train step for N devices with abstract inputs (nothing allocated, no weights
needed): for a TPU topology when libtpu is installed (`pip install -e .[plan]`; no TPU needed),
else for N simulated CPU devices (mim_refiner_jax/memory.py says what the numbers mean and how far
each approximates a GPU):

  python tools/plan_memory.py --config configs/mae_l16.py:stage=3 --device a100-80gb --devices 8
  python tools/plan_memory.py --config configs/mae_2b14.py:stage=3 --device tpu-v5p --devices 32 \
      --config.model.remat=False
  python tools/plan_memory.py --table --out plan_table.md   # the README table (20+ compiles)

--table keeps every compiled plan in OUT.cache.json, so an interrupted table resumes where it
stopped.

--config.x.y=VALUE overrides a config field (as for train.py). Without --no-search a run that does
not fit is recompiled with remat or FSDP, both, then halved global batches until one fits
(memory.candidate_changes).
"""

import argparse
import ast
import dataclasses
import json
import os
import sys
import time

# The repository checkout this module sits in (configs/ lives there, not in the package).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Stage 3 first (the binding case), the paper's ten runs.
PAPER_RUNS = [os.path.join(ROOT, f"configs/{name}.py:stage={stage}") for stage in (3, 2)
              for name in ("mae_l16", "mae_2b14", "mae_h14", "d2v2_l16", "d2v2_h14")]
TABLE_DEVICES = ("a100-80gb", "h100-80gb", "tpu-v5p")
TABLE_COUNTS = (8, 32)


def load_config(spec: str, overrides: list[str]):
  """`path.py[:arg]` -> its get_config(arg), with `x.y=value` overrides applied."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SystemExit(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("plan_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  changes = {}
  for item in overrides:
    name, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"override {item!r} must be --config.NAME=VALUE")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    changes[name] = value
  try:
    return memory.with_changes(config, **changes)
  except (KeyError, AttributeError) as e:
    raise SystemExit(f"unknown config field in {overrides}: {e}") from None


def plan_one(config, devices, device, search, log):
  """(plan, fix) for one run; fix is None (fits), (changes, plan) or () (nothing found)."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  gib = memory.DEVICE_MEMORY_GIB[device]
  if not search:
    return memory.plan(config, devices), None
  return memory.find_fit(config, gib, devices, log=log)


def table(args, log):
  """All paper runs x TABLE_DEVICES x TABLE_COUNTS; compiles are shared between device kinds."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  lines = ["| run | devices | per-device memory (GiB) | " + " | ".join(TABLE_DEVICES) + " |",
           "|---|---|---|" + "---|" * len(TABLE_DEVICES)]
  cache_path = (args.out or "plan_table.md") + ".cache.json"
  cache = {}
  if os.path.exists(cache_path):
    with open(cache_path) as f:
      cache = json.load(f)
  targets = {}

  def cached_plan(config, n):
    if n not in targets:  # one compile serves every device kind of the table (memory.py)
      targets[n] = memory.target_devices(TABLE_DEVICES[-1], n, args.backend)
      log(f"  {n} devices: {targets[n][1]}")
    key = json.dumps([config.to_json(), n, targets[n][1]])
    if key not in cache and args.cached_only:
      return None
    if key not in cache:
      t0 = time.time()
      cache[key] = dataclasses.asdict(memory.plan(config, targets[n][0]))
      log(f"    compiled in {time.time() - t0:.0f} s: "
          f"{memory.gib(memory.Plan(**cache[key]).total)} GiB")
      if os.path.exists(cache_path):  # another planner may have added plans meanwhile
        with open(cache_path) as f:
          cache.update({k: v for k, v in json.load(f).items() if k not in cache})
      with open(cache_path + ".tmp", "w") as f:
        json.dump(cache, f)
      os.replace(cache_path + ".tmp", cache_path)
    return memory.Plan(**cache[key])

  for n in [int(c) for c in args.counts.split(",")]:
    for spec in args.runs.split(",") if args.runs else PAPER_RUNS:
      config = load_config(spec, args.overrides)
      log(f"{spec} on {n} devices")
      p = cached_plan(config, n)
      name = (f"{os.path.basename(spec).replace('.py:stage=', ' stage ')} "
              f"(batch {config.batch_size}, {config.batch_size // n} per device)")
      if p is None:
        lines.append(f"| {name} | {n} | not compiled yet |" + " |" * len(TABLE_DEVICES))
        continue
      cells = []
      for device in TABLE_DEVICES:
        gib = memory.DEVICE_MEMORY_GIB[device]
        if p.fits(gib):
          cells.append("fits")
          continue
        fix = "no change found"
        for changes in memory.candidate_changes(config, n, p):
          fixed = cached_plan(memory.with_changes(config, **changes), n)
          if fixed is None:
            fix = f"{memory.describe(changes)} not compiled yet"
            break
          if fixed.fits(gib):
            fix = f"with {memory.describe(changes)}: {memory.gib(fixed.total)}"
            break
        cells.append(f"no; {fix}")
      lines.append(f"| {name} | {n} | {memory.gib(p.total)} "
                   f"(state {memory.gib(p.params + p.optimizer + p.ema + p.queues)}, temp "
                   f"{memory.gib(p.temporaries)}) | " + " | ".join(cells) + " |")
      if args.out:
        with open(args.out, "w") as f:
          f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/demo.py:stage=3",
                      help="config file[:arg], e.g. configs/mae_l16.py:stage=3")
  parser.add_argument("--device", default="a100-80gb",
                      help="a100-40gb, a100-80gb, h100-80gb, h200-141gb, tpu-v4, tpu-v5e, tpu-v5p")
  parser.add_argument("--devices", type=int, default=8, help="number of devices")
  parser.add_argument("--backend", default="auto", choices=("auto", "tpu", "cpu"),
                      help="compile for a TPU topology (needs libtpu: pip install -e .[plan]; no "
                           "TPU needed) or simulated CPU devices; auto: tpu when libtpu is there")
  parser.add_argument("--no-search", action="store_true",
                      help="only report; do not recompile to find a change that fits")
  parser.add_argument("--table", action="store_true",
                      help="the README table: paper runs on 8 and 32 A100-80GB, H100-80GB, v5p")
  parser.add_argument("--runs", default="", help="with --table: comma-separated config specs")
  parser.add_argument("--out", default="", help="with --table: also write the table here")
  parser.add_argument("--counts", default=",".join(map(str, TABLE_COUNTS)),
                      help="with --table: comma-separated device counts")
  parser.add_argument("--cached-only", action="store_true",
                      help="with --table: render from OUT.cache.json only, compile nothing")
  parser.add_argument("--remat-check", action="store_true",
                      help="only print a ViT gradient's temporaries without and with remat on "
                           "this backend (does its buffer assignment see what remat saves?)")
  args = parser.parse_args(argv)
  args.overrides = overrides
  from_table = max(int(c) for c in args.counts.split(",")) if args.table else args.devices
  # Simulated devices: must be set before jax is imported.
  # The LLVM optimisation level only changes the generated machine code, not XLA's HLO passes or
  # buffer assignment (what the plan reads), and cuts the CPU compile time several-fold.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={from_table}"
                             + " --xla_backend_optimization_level=0"
                             + " --xla_llvm_disable_expensive_passes=true")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  if args.device not in memory.DEVICE_MEMORY_GIB:
    raise SystemExit(f"unknown --device {args.device!r}; known: "
                     f"{', '.join(memory.DEVICE_MEMORY_GIB)}")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  if args.remat_check:
    temp = memory.remat_check()
    print(f"ViT width 256, depth 8, batch 64, gradient temporaries: without remat "
          f"{temp[False] / 2**20:.0f} MiB, with remat {temp[True] / 2**20:.0f} MiB")
    return 0
  if args.table:
    try:
      print(table(args, log))
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    return 0
  config = load_config(args.config, overrides)
  try:
    devices, where = memory.target_devices(args.device, args.devices, args.backend)
    p, fix = plan_one(config, devices, args.device, not args.no_search, log)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  gib = memory.DEVICE_MEMORY_GIB[args.device]
  print(f"{args.config} {' '.join('--config.' + o for o in overrides)} on {args.devices} x "
        f"{args.device}, mesh {p.mesh}, global batch {config.batch_size}; {where}")
  print(memory.report(p, args.device, gib))
  if fix:
    changes, fixed = fix
    print(f"smallest change that fits: {memory.describe(changes)} -> "
          f"{memory.gib(fixed.total)} GiB per device (temporaries {memory.gib(fixed.temporaries)})")
  elif fix == ():
    print("no tried change fits (FSDP, remat, halved batches): use more devices")
  return 0


if __name__ == "__main__":
  sys.exit(main())
