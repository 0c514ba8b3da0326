"""A tiny refinement config for the trainer tests (ViT mu: width 32, depth 2, patch 4, 16 px).

`init.pretrained` / `init.stage2_workdir` must be set by the caller (tests write a checkpoint).
"""

import ml_collections

from mim_refiner_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, stage=2, epochs=2, knn=True)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = args.stage
  c.model = dict(size="mu", patch_size=4, prenorm=True, image_size=16,
                 compute_dtype="float32", head_dtype="float32", remat=False)
  c.init = dict(pretrained="", stage2_workdir="")
  c.heads = dict(names="nnclr_temp02_cls,nnclr_temp02_cls0", pooling="", proj_hidden=32,
                 pred_hidden=32, out_dim=16)
  c.queue = dict(size=64, topk=1 if args.stage == 2 else 3, similarity_dtype="float32")
  c.loss = dict(local_view_indexing="reference")
  c.batch_size = 16
  c.num_epochs = float(args.epochs)
  c.warmup_epochs = 1.0
  c.optim = dict(base_lr=1e-3, end_lr=1e-6, b1=0.9, b2=0.95, eps=1e-8, layer_decay=0.65,
                 encoder_wd=0.05, head_wd=1e-5, frozen_blocks=0)
  c.ema_decay = 0.99 if args.stage == 3 else 0.0
  synthetic = "synthetic:64,num_classes=4,image_size=24"
  c.data = dict(train=synthetic, num_train_examples=0, global_size=16, local_size=8, num_local=2,
                color_augs=False, worker_count=0, fail_fast=False)
  c.evals = dict(knn=dict(
      every_epochs=1, train=synthetic, test="synthetic:32,num_classes=4,image_size=24,seed=1",
      resize_size=16, crop_size=16, batch_size=32, k=5, tau=0.07,
      features="block1_cls,cls" if args.knn else ""),
      # At the end of a run, the evaluation suite on its EMA encoder (tools/evaluate.py's
      # protocols, e.g. "knn,per_block,probe,lowshot,cluster"; "" = none): trained on data.train,
      # tested on the k-NN test set; results in WORKDIR/evaluation.
      final=dict(protocols="", preset="default", allow_label_mismatch=False))
  c.sharding = dict(data=-1, fsdp=1, rules="replicate")
  c.checkpoint = dict(every_steps=4, keep=2)
  c.log_every_steps = 1
  return c
