"""The CPU demo: refine a tiny MAE pre-trained on the bundled MNIST digits (tools/demo.py).

Sized for 2 CPU cores: a ViT (width 96, depth 4, patch 4) at 32 px, 2 global views of 32 px and
2 local views of 16 px, a queue of 1024, batch 128. Stage 2 trains the heads on the frozen MAE;
stage 3 refines everything from the stage-2 workdir, as in the paper (section 7).

  python tools/demo.py                       # the whole thing: baselines, stage 2, stage 3, table
  python -m mim_refiner_jax.train --config configs/demo.py:stage=2 --workdir workdirs/demo/s2
  python -m mim_refiner_jax.train --config configs/demo.py:stage=3 --workdir workdirs/demo/s3
"""

import os

import ml_collections

from mim_refiner_jax import config as config_lib

# The demo's pre-trained MAE, shipped with the package (tools/pretrain_mae.py made it; the command
# and its sha256 are in mae_mnist.json beside it).
SHIPPED_MAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_mae",
                           "mae_mnist.safetensors")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, stage=2, seed=0, epochs=0)
  c = ml_collections.ConfigDict()
  c.seed = args.seed
  c.stage = args.stage
  c.model = dict(size="",  # "": taken from the checkpoint
                 patch_size=4, prenorm=True, image_size=32,
                 compute_dtype="float32", head_dtype="float32", remat=False,
                 num_heads=0)  # 0: from the checkpoint (or the size table for timm/MAE files)
  c.init = dict(pretrained=SHIPPED_MAE
                if args.stage == 2 else "",
                stage2_workdir="workdirs/demo/s2" if args.stage == 3 else "")
  depth = 4
  # The main output and blocks 2 and 1 (the paper uses the last third of the blocks).
  c.heads = dict(names=",".join(config_lib.head_names("02", ["", 2, 1])),
                 proj_hidden=256, pred_hidden=512, out_dim=64,
                 norm="sync_batch")  # BN statistics (models/heads.py; README "Head normalisation")
  c.queue = dict(size=1024, topk=1 if args.stage == 2 else 5, similarity_dtype="float32")
  c.loss = dict(local_view_indexing="corrected")
  c.batch_size = 128
  # Stage 3 as long as the 5-minute budget allows on 2 cores (0.8-0.9 s/step; longer keeps
  # paying, see the README's "What was tried").
  c.num_epochs = float(args.epochs or (3 if args.stage == 2 else 7))
  c.warmup_epochs = 1.0
  # 10x the paper's base LR: a few hundred steps instead of tens of thousands. With the paper's
  # 2e-4 the heads stay at chance in stage 2 and refinement gains little (measured: +0.5 points).
  c.optim = dict(base_lr=2e-3 if args.stage == 2 else 4e-3, end_lr=1e-6, b1=0.9, b2=0.95,
                 eps=1e-8, layer_decay=0.65, encoder_wd=0.05, head_wd=1e-5, frozen_blocks=0)
  # A horizon of ~50 of the 217 steps, the paper's proportion (0.9999: 10k of 37k steps); 0.99
  # lags the encoder by 3 points of k-NN after 248 steps (measured: 79.9 vs 83.2).
  c.ema_decay = 0.98 if args.stage == 3 else 0.0
  c.data = dict(train="mnist:train,image_size=32",
                num_train_examples=0,  # 0: take the length of the source
                global_size=32, local_size=16, num_local=2, color_augs=False,
                # Digits: no flips (a mirrored digit is another or no digit), and larger crops of
                # the 32 px images (the reference's scales leave mostly background).
                multicrop=dict(flip_p=0.0, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4)),
                worker_count=0, fail_fast=False)
  c.evals = dict(knn=dict(
      every_epochs=0,  # 0: only at the end
      # "auto": derived from data.train (MNIST: its train split and val), so an overridden
      # data.train carries the monitor along.
      train="auto", test="auto",
      resize_size=32, crop_size=32, batch_size=500, k=10, tau=0.07,
      features=f"block{depth - 1}_cls,block{depth - 1}_patch_mean"),
      # At the end of a run, the evaluation suite on its EMA encoder (tools/evaluate.py's
      # protocols, e.g. "knn,per_block,probe,lowshot,cluster"; "" = none): trained on data.train,
      # tested on the k-NN test set; results in WORKDIR/evaluation.
      final=dict(protocols="", preset="default", allow_label_mismatch=False))
  c.sharding = dict(data=-1, fsdp=1, rules="replicate")
  c.checkpoint = dict(every_steps=100, keep=2)
  c.log_every_steps = 10
  return c
