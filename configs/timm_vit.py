"""Any timm `VisionTransformer` state dict (options detected from its keys: registers, no CLS,
LayerScale, qkv bias, fc_norm): `configs/timm_vit.py:size=base,patch=16[,pooling=mean_patch]`.

Heads on the main output and the last third of the blocks (the paper puts 7 of 8 on the last
blocks); crops derived from the patch size (224/96 for 16 and 8, 224/98 for 14). pooling: cls
(default), mean_patch (needed for class_token=False models) or registers.

  python -m mim_refiner_jax.train --config configs/timm_vit.py:size=base,patch=16,stage=2 \
      --workdir workdirs/timm_b16_s2 --config.init.pretrained=weights/vit_base_patch16.pth
  python -m mim_refiner_jax.train --config configs/timm_vit.py:size=base,patch=16,stage=3 \
      --workdir workdirs/timm_b16_s3 --config.init.stage2_workdir=workdirs/timm_b16_s2
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import crop_sizes_for_patch, head_names, parse_arg
from mim_refiner_jax.models.vit import SIZES


def get_config(arg=None):
  args = parse_arg(arg, stage=2, size="base", patch=16, pooling="cls", batch_size=1024)
  depth = SIZES[args.size]["depth"]
  global_size, local_size = crop_sizes_for_patch(args.patch)
  c = paper_config.refinement_config(
      stage=args.stage, vit_size=args.size, patch_size=args.patch, prenorm=True,
      heads=head_names("02", [""] + list(range(depth - 2, depth - 2 - depth // 3, -1)),
                       pool="cls" if args.pooling == "cls" else "avg"),
      batch_size=args.batch_size, epochs=20 if args.stage == 2 else 30, local_size=local_size,
      global_size=global_size, pretrained="", stage2_workdir="",
      heads_pooling=args.pooling if args.pooling == "registers" else "")
  if args.pooling != "cls":  # the monitor reads what the heads read
    pooling = "patch_mean" if args.pooling == "mean_patch" else args.pooling
    c.evals.knn.features = f"block{depth - 1}_{pooling},{pooling}"
  return c
