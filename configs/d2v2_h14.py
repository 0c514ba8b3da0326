"""data2vec 2.0 ViT-H/14 refinement (refiner_facts.md section 8: h14_d2v2.yaml; run 3duek90m).

Stage 2 also trains cls31, which equals the main output of a post-norm model; stage 3 drops it.

  python -m mim_refiner_jax.train --config configs/d2v2_h14.py:stage=2 --workdir workdirs/d2v2_h14_s2
  python -m mim_refiner_jax.train --config configs/d2v2_h14.py:stage=3 --workdir workdirs/d2v2_h14_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  blocks = list(range(31 if args.stage == 2 else 30, 19, -1))
  return paper_config.refinement_config(
      stage=args.stage, vit_size="huge", patch_size=14, prenorm=False,
      heads=head_names("03", [""] + blocks),
      batch_size=512, epochs=20, local_size=98,
      pretrained="weights/data2vec2_huge14.pt", stage2_workdir="workdirs/d2v2_h14_s2")
