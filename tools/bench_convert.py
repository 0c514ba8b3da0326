"""Times a full-size conversion: an L/16 MAE checkpoint (~1.2 GB) -> Flax (Orbax), with peak RSS.

  python tools/bench_convert.py                    # temp dir, deleted afterwards
  python tools/bench_convert.py --dir /tmp/bench --keep --refined

Writes a random-weight ViT-L/16 in the MAE layout ({"model": timm-named encoder}, refiner_facts.md
section 3.1) with torch.save, then converts it in a fresh subprocess, so that the peak RSS is the
conversion's and not torch's or the writer's: `load_pretrained` (torch-free reader) + `save_flax`,
optionally followed by `save_torch(layout="refined")` in another subprocess. Reports wall times and
peak RSS (VmHWM of the process; ru_maxrss would include the parent's RSS at fork) relative to the
file size. Targets: < 60 s and < 3x the file size.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

L16 = dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_ratio=4.0, prenorm=True,
           pos_grid=14)


def peak_rss_bytes() -> int:
  """Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's RSS at fork)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_mae_checkpoint(path: str) -> None:
  """Random L/16 in MAE naming: cls_token, pos_embed (1,197,D) with a zero CLS row, blocks, norm."""
  import torch  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  sd = {}
  for name, shape in mapping.expected_shapes(L16).items():
    sd[name] = torch.randn(shape) * 0.02
  d, g = L16["width"], L16["pos_grid"]
  pos = sd.pop("pos_embed.embed").reshape(1, g * g, d)
  sd["pos_embed"] = torch.cat([torch.zeros(1, 1, d), pos], dim=1)
  sd["cls_token"] = sd.pop("cls_tokens.tokens")
  torch.save({"model": sd}, path)


def child(args) -> None:
  """Runs in a fresh process; prints one JSON line."""
  if args.child == "write":
    write_mae_checkpoint(args.output)
    print(json.dumps({}))
    return
  t0 = time.perf_counter()
  from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
  import_s, rss_after_import = time.perf_counter() - t0, peak_rss_bytes()
  result = dict(import_s=import_s, rss_after_import=rss_after_import)
  t = time.perf_counter()
  if args.child == "flax":
    pre = checkpoints.load_pretrained(args.input)
    result["load_s"] = time.perf_counter() - t
    result["rss_after_load"] = peak_rss_bytes()
    result["num_params"] = pre.num_params
    result["format"] = pre.info["format"]
    t = time.perf_counter()
    checkpoints.save_flax(args.output, pre.variables, pre.vit_kwargs)
    result["save_s"] = time.perf_counter() - t
  else:  # flax directory -> refined .th
    pre = checkpoints.load_flax(args.input)
    result["load_s"] = time.perf_counter() - t
    result["rss_after_load"] = peak_rss_bytes()
    t = time.perf_counter()
    checkpoints.save_torch(args.output, pre.variables, pre.vit_kwargs, layout="refined")
    result["save_s"] = time.perf_counter() - t
  result["peak_rss"] = peak_rss_bytes()
  print(json.dumps(result))


def run_child(kind, src, dst) -> dict:
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, "--input", src,
                         "--output", dst], capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  if proc.returncode:
    raise RuntimeError(f"conversion subprocess failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_s"] = wall
  return result


def report(title, result, file_size):
  gib = 2**30
  print(f"{title}:")
  print(f"  wall time (process) {result['wall_s']:6.1f} s   (imports {result['import_s']:.1f} s, "
        f"load {result['load_s']:.1f} s, save {result['save_s']:.1f} s)")
  print(f"  peak RSS            {result['peak_rss'] / gib:6.2f} GiB = "
        f"{result['peak_rss'] / file_size:.2f}x the file "
        f"(after imports {result['rss_after_import'] / gib:.2f} GiB, "
        f"after load {result['rss_after_load'] / gib:.2f} GiB)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dir", help="work directory (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the files")
  parser.add_argument("--refined", action="store_true", help="also time Flax -> refined .th")
  parser.add_argument("--child", choices=["write", "flax", "refined"], help=argparse.SUPPRESS)
  parser.add_argument("--input", help=argparse.SUPPRESS)
  parser.add_argument("--output", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return 0

  work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
  os.makedirs(work, exist_ok=True)
  src = os.path.join(work, "mae_large16.pth")
  try:
    if not os.path.exists(src):
      t = time.perf_counter()
      subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "write", "--output",
                      src], check=True)  # in a child: this process stays small
      print(f"wrote {src} in {time.perf_counter() - t:.1f} s")
    size = os.path.getsize(src)
    print(f"file size: {size / 2**30:.2f} GiB ({size:,} bytes)")
    flax_dir = os.path.join(work, "mae_large16_flax")
    shutil.rmtree(flax_dir, ignore_errors=True)
    result = run_child("flax", src, flax_dir)
    print(f"converted {result['num_params']:,} parameters (format {result['format']})")
    report("MAE .pth -> Flax (load_pretrained + save_flax)", result, size)
    ok = result["wall_s"] < 60 and result["peak_rss"] < 3 * size
    if args.refined:
      out = os.path.join(work, "mae_large16_refined.th")
      if os.path.exists(out):
        os.remove(out)
      report("Flax -> refined .th (load_flax + save_torch)", run_child("refined", flax_dir, out),
             size)
    print(f"targets (< 60 s, < 3x file size): {'met' if ok else 'NOT met'}")
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
