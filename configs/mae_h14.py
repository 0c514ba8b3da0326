"""MAE ViT-H/14 refinement (refiner_facts.md section 8: h14_mae.yaml; stage-3 run mvdt62zg).

  python -m mim_refiner_jax.train --config configs/mae_h14.py:stage=2 --workdir workdirs/mae_h14_s2
  python -m mim_refiner_jax.train --config configs/mae_h14.py:stage=3 --workdir workdirs/mae_h14_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  return paper_config.refinement_config(
      stage=args.stage, vit_size="huge", patch_size=14, prenorm=True,
      heads=head_names("03", [""] + list(range(30, 19, -1))),
      batch_size=512, epochs=20 if args.stage == 2 else 30, local_size=98,
      pretrained="weights/mae_huge14.pth", stage2_workdir="workdirs/mae_h14_s2")
