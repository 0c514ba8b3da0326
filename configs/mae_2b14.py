"""MAE (MAWS) ViT-2B/14 refinement (refiner_facts.md section 8: twob14_mae.yaml; run 7mzhpufg).

Stage 2 trains extra heads for hyper-parameter selection (5 temperatures on the main output and
blocks 22..12); stage 3 keeps nnclr_temp035_cls + cls22..cls16, freezes the stem and blocks 0-5
(freezer end_percent 0.25, section 7), and runs 20 epochs. Parameters are sharded (FSDP rules) and
blocks rematerialised: the 2B model does not fit replicated with its optimizer state.

  python -m mim_refiner_jax.train --config configs/mae_2b14.py:stage=2 --workdir workdirs/mae_2b14_s2
  python -m mim_refiner_jax.train --config configs/mae_2b14.py:stage=3 --workdir workdirs/mae_2b14_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  if args.stage == 2:
    heads = ([f"nnclr_temp{t}_cls" for t in ("02", "025", "03", "0325", "035")]
             + head_names("035", range(22, 11, -1)))
  else:
    heads = head_names("035", ["", 22, 21, 20, 19, 18, 17, 16])
  return paper_config.refinement_config(
      stage=args.stage, vit_size="twob", patch_size=14, prenorm=True, heads=heads,
      batch_size=512, epochs=20, local_size=98,
      frozen_blocks=6 if args.stage == 3 else 0, remat=True, sharding_rules="fsdp",
      pretrained="weights/mae_twob14.pt", stage2_workdir="workdirs/mae_2b14_s2")
