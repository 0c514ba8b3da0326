"""DINOv2 ViT-L/14 with 4 registers (the hub file dinov2_vitl14_reg4_pretrain.pth): registers,
LayerScale, a 37x37 position table resized to the crop grid. Heads on the CLS token of the main
output and blocks 16..22, as the paper's L/16 runs; crops 224 / 98 (patch 14).

  python -m mim_refiner_jax.train --config configs/dinov2_l14_reg4.py:stage=2 \
      --workdir workdirs/dinov2_l14_s2 --config.init.pretrained=weights/dinov2_vitl14_reg4_pretrain.pth
  python -m mim_refiner_jax.train --config configs/dinov2_l14_reg4.py:stage=3 \
      --workdir workdirs/dinov2_l14_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import crop_sizes_for_patch, head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  global_size, local_size = crop_sizes_for_patch(14)
  return paper_config.refinement_config(
      stage=args.stage, vit_size="large", patch_size=14, prenorm=True,
      heads=head_names("02", ["", 22, 21, 20, 19, 18, 17, 16]),
      batch_size=1024, epochs=20 if args.stage == 2 else 30, local_size=local_size,
      global_size=global_size, pretrained="weights/dinov2_vitl14_reg4_pretrain.pth",
      stage2_workdir="workdirs/dinov2_l14_s2",
      vit_options=dict(reg_tokens=4, init_values=1e-5, no_embed_class=True))
