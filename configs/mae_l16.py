"""MAE ViT-L/16 refinement (refiner_facts.md section 8: l16_mae.yaml; stage-3 run c0be9je6).

  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=2 --workdir workdirs/mae_l16_s2 \
      --config.init.pretrained=weights/mae_large16.pth
  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=3 --workdir workdirs/mae_l16_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  return paper_config.refinement_config(
      stage=args.stage, vit_size="large", patch_size=16, prenorm=True,
      heads=head_names("02", ["", 22, 21, 20, 19, 18, 17, 16]),
      batch_size=1024, epochs=20 if args.stage == 2 else 30, local_size=96,
      pretrained="weights/mae_large16.pth", stage2_workdir="workdirs/mae_l16_s2")
