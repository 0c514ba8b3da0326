"""data2vec 2.0 ViT-L/16 refinement (refiner_facts.md section 8: l16_d2v2.yaml; run 5yvj2un6).

Post-norm encoder: the "main" head reads the last block, which is already normalised (section 2).

  python -m mim_refiner_jax.train --config configs/d2v2_l16.py:stage=2 --workdir workdirs/d2v2_l16_s2
  python -m mim_refiner_jax.train --config configs/d2v2_l16.py:stage=3 --workdir workdirs/d2v2_l16_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  return paper_config.refinement_config(
      stage=args.stage, vit_size="large", patch_size=16, prenorm=False,
      heads=head_names("02", ["", 22, 21, 20, 19, 18, 17, 16]),
      batch_size=1024, epochs=20, local_size=96,
      pretrained="weights/data2vec2_large16.pt", stage2_workdir="workdirs/d2v2_l16_s2")
