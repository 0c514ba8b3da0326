"""I-JEPA ViT-H/14 (IN1K-vit.h.14-300e.pth.tar, the EMA `target_encoder`): no CLS token, so every
head mean-pools the patch tokens of its block (the reference's `avg` head names; the same as
--config.heads.pooling=mean_patch); the main output is the
final LayerNorm over all tokens. Heads on the main output and blocks 24..30 as the paper's H/14
runs; crops 224 / 98 (patch 14).

  python -m mim_refiner_jax.train --config configs/ijepa_h14.py:stage=2 \
      --workdir workdirs/ijepa_h14_s2 --config.init.pretrained=weights/IN1K-vit.h.14-300e.pth.tar
  python -m mim_refiner_jax.train --config configs/ijepa_h14.py:stage=3 --workdir workdirs/ijepa_h14_s3
"""

from mim_refiner_jax import paper_config
from mim_refiner_jax.config import crop_sizes_for_patch, head_names, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, stage=2)
  global_size, local_size = crop_sizes_for_patch(14)
  c = paper_config.refinement_config(
      stage=args.stage, vit_size="huge", patch_size=14, prenorm=True,
      heads=head_names("02", ["", 30, 29, 28, 27, 26, 25, 24], pool="avg"),
      batch_size=512, epochs=20 if args.stage == 2 else 30, local_size=local_size,
      global_size=global_size, pretrained="weights/IN1K-vit.h.14-300e.pth.tar",
      stage2_workdir="workdirs/ijepa_h14_s2",
      vit_options=dict(class_token=False, global_pool="avg", fc_norm=False))
  # The k-NN monitor reads what the heads read: the last block's mean patch token.
  c.evals.knn.features = "block31_patch_mean,patch_mean"
  return c
