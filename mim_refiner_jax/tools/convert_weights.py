"""Converts ViT encoder weights between PyTorch checkpoints, safetensors and Flax (Orbax).

  python tools/convert_weights.py --input weights/mae_large16.pth --output weights/mae_l16 --to flax
  python tools/convert_weights.py --input weights/data2vec2_large16.pt --output d2v2.th --to refined
  python tools/convert_weights.py --input workdirs/demo/mae --output mae_demo.pth --to mae
  python tools/convert_weights.py --input mae_demo.pth --output mae_demo_bf16.pth --to timm \
      --dtype bfloat16 --num-heads 3

Input: any format `convert.checkpoints.load_pretrained` reads (MAE .pth, MAWS/timm .pt with
timm's options, DINOv2 hub .pth, I-JEPA .pth.tar (--ijepa-encoder), data2vec 2.0 fairseq .pt,
refined .th, .safetensors, a Flax checkpoint directory). PyTorch files
are read and written without torch and without running pickled code. Output (`--to`):
  flax         an Orbax checkpoint directory + vit_kwargs.json (what the trainer starts from)
  refined      the official MIM-Refiner .th layout {"state_dict", "ctor_kwargs"}
  timm         a flat timm VisionTransformer(num_classes=0) state dict (pre-norm only)
  mae          {"model": timm state dict}, the facebookresearch/mae layout (pre-norm only)
  dinov2       a DINOv2 hub state dict (register_tokens, ls1/ls2.gamma, mask_token)
  ijepa        {"encoder", "target_encoder"} with module. keys, as I-JEPA saves (no CLS token)
  safetensors  refined naming, vit_kwargs in the metadata
timm and mae state dicts have no place for the head count; the files written here carry it in an
extra zip record (torch ignores it), other such files need a known width or --num-heads. --dtype sets the PyTorch/safetensors tensors' dtype (float32 by default).
Prints the detected format, family, size, patch size and parameter count. Mistakes (missing
file, unknown format, overrides that contradict the file) print one error and exit 2, as the
other tools do. --input and --output may be gs:// (or other etils.epath) URLs.
"""

import argparse
import sys

from mim_refiner_jax import errors
from mim_refiner_jax import paths
from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.convert import mapping
from mim_refiner_jax.convert import torch_files

TARGETS = ("flax",) + checkpoints.TORCH_LAYOUTS


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--input", required=True, help="checkpoint file or Flax directory")
  parser.add_argument("--output", required=True, help="output file (or directory for --to flax)")
  parser.add_argument("--to", required=True, choices=TARGETS)
  parser.add_argument("--family", choices=sorted(mapping.FAMILY_ALIASES),
                      help="override the detected family (pre-norm MAE vs post-norm data2vec 2.0)")
  parser.add_argument("--size", choices=sorted(mapping.SIZES), help="named ViT size (sets heads)")
  parser.add_argument("--patch-size", type=int, help="expected patch size (checked)")
  parser.add_argument("--num-heads", type=int, help="attention heads (not readable from weights)")
  parser.add_argument("--ijepa-encoder", default="target_encoder",
                      choices=checkpoints.IJEPA_ENCODERS, help="which encoder of an I-JEPA file")
  parser.add_argument("--dtype", default="float32", choices=sorted(checkpoints.TORCH_DTYPES),
                      help="tensor dtype of PyTorch / safetensors outputs")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.to != "flax" and paths.as_path(args.output).exists():
    print(f"error: {args.output} exists; choose a new output path", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  try:
    pre = checkpoints.load_pretrained(args.input, family=args.family, size=args.size,
                                      patch_size=args.patch_size, num_heads=args.num_heads,
                                      ijepa_encoder=args.ijepa_encoder)
  except (ValueError, OSError, torch_files.UnsafePickleError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  info, kw = pre.info, pre.vit_kwargs
  print(f"input:       {args.input}")
  print(f"format:      {info['format']} (containers: {info.get('containers') or 'none'})")
  print(f"family:      {info['family']}")
  print(f"size:        {info['size']} (width {kw['width']}, depth {kw['depth']}, "
        f"heads {kw['num_heads']}, mlp ratio {kw['mlp_ratio']:g})")
  print(f"patch size:  {kw['patch_size']} (position grid {kw['pos_grid']}x{kw['pos_grid']})")
  options = {k: v for k, v in kw.items() if k in mapping.OPTION_DEFAULTS}
  if options:
    print(f"options:     {', '.join(f'{k}={v}' for k, v in options.items())} (timm names)")
  print(f"parameters:  {pre.num_params:,}")
  if info.get("dropped_keys"):
    dropped = info["dropped_keys"]
    more = ", ..." if len(dropped) > 4 else ""
    print(f"dropped:     {len(dropped)} keys ({', '.join(dropped[:4])}{more})")
  for note in info.get("notes", []):
    print(f"note:        {note}")
  try:
    if args.to == "flax":
      checkpoints.save_flax(args.output, pre.variables, kw)
    else:
      checkpoints.save_torch(args.output, pre.variables, kw, layout=args.to, dtype=args.dtype)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  print(f"wrote:       {args.output} ({args.to}{'' if args.to == 'flax' else ', ' + args.dtype})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
