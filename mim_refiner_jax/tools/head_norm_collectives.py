r"""Which collectives the ID heads' forward waits for, per `heads.norm` mode, in the compiled step.

Compiles the real train step (memory.build: what train.py builds, abstract inputs) once per mode
and reads the optimised HLO (mim_refiner_jax/hlo_deps.py): the collectives that the forward
normalisation of any head BatchNorm ("head_norm_apply", models/heads.py) depends on through its
operands, those among them that compute BatchNorm statistics ("head_norm_stats"), and the bytes
per device per step of all collectives.

  # the demo's step on 8 simulated CPU devices (XLA_FLAGS must give them)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/head_norm_collectives.py \
      --config mim_refiner_jax/demo_config.py:stage=3 --devices 8 --backend cpu
  # a paper config compiled for a TPU v5p topology (libtpu installed: pip install -e .[plan])
  python tools/head_norm_collectives.py --config configs/mae_l16.py:stage=2 --devices 8 \
      --backend tpu
"""

import argparse
import json
import sys
import time

MODES = ("sync_batch", "local_batch", "async_stats", "batch_renorm", "none")


def analyse(config, devices, mode: str) -> dict:
  """The compiled step of `config` with heads.norm=`mode`: collectives and what waits for them."""
  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import hlo_deps
  from mim_refiner_jax import memory
  config = memory.with_changes(config, **{"heads.norm": mode})
  built = memory.build(config, devices)
  start = time.time()
  text = built["step"].lower(built["state"], built["batch"]).compile().as_text()
  seconds = time.time() - start
  computations, _ = hlo_deps.parse(text)
  every = hlo_deps.collectives(computations)
  waited, marked = hlo_deps.waited_for(computations, "head_norm_apply", "IDHead")
  is_norm = lambda c: "head_norm" in c.op_name
  count = lambda cs, kind=None: sum(1 for c in cs if kind is None or c.kind == kind)
  return dict(
      mode=mode, compile_seconds=round(seconds, 1), marked_ops=marked,
      waited_all_reduce=count(waited, "all-reduce"),
      waited_norm_stats=sum(1 for c in waited if "head_norm_stats" in c.op_name),
      waited_other=len(waited) - count(waited, "all-reduce"),
      collectives=len(every), all_reduce=count(every, "all-reduce"),
      bytes=sum(c.bytes for c in every), norm_collectives=sum(1 for c in every if is_norm(c)),
      norm_bytes=sum(c.bytes for c in every if is_norm(c)),
      waited=sorted(f"{c.kind} {c.bytes}B {c.op_name.removeprefix('jit(step)/')[:100]}"
                    for c in waited))


def table(rows: list[dict]) -> str:
  """Markdown table. Bytes: the results of every collective, per device per step; "vs none": the
  difference to heads.norm=none's step. (XLA combines small all-reduces with the gradients', so
  the op_name of a combined op says little about its bytes: only the totals are compared.)"""
  base = next((r["bytes"] for r in rows if r["mode"] == "none"), None)
  lines = ["| heads.norm | all-reduces the head forward waits for (BN statistics) | "
           "other collectives it waits for | collectives per step (all-reduces) | "
           "bytes per device per step | vs none |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    diff = "" if base is None else f"{r['bytes'] - base:+,}"
    lines.append(f"| {r['mode']} | {r['waited_all_reduce']} ({r['waited_norm_stats']}) | "
                 f"{r['waited_other']} | {r['collectives']} ({r['all_reduce']}) | "
                 f"{r['bytes']:,} | {diff} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="path.py[:arg], e.g. configs/mae_l16.py:stage=2")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--device", default="tpu-v5p", help="the planner's device kind (TPU target)")
  parser.add_argument("--backend", default="auto", choices=("auto", "tpu", "cpu"))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--json", default="", help="also write the rows to this file")
  args, overrides = parser.parse_known_args(argv)
  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import errors, memory
  from mim_refiner_jax.tools.plan_memory import load_config
  modes = [m for m in args.modes.split(",") if m]
  bad = [m for m in modes if m not in MODES]
  if bad:
    errors.print_error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    return errors.USER_ERROR_EXIT_CODE
  config = load_config(args.config, [o.removeprefix("--config.") for o in overrides])
  devices, description = memory.target_devices(args.device, args.devices, args.backend)
  print(f"{args.config} {' '.join(overrides)}: {description}", flush=True)
  rows = []
  for mode in modes:
    rows.append(analyse(config, devices, mode))
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "waited"}), flush=True)
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "overrides": overrides, "target": description,
                 "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
