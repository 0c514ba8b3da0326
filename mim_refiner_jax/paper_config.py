"""Shared defaults of the paper's refinement runs (../shared/reference/refiner_facts.md sections 7-10).

Each run file in configs/ (mae_l16.py, d2v2_h14.py, ...) states only what differs between runs, as
the reference's yaml templates do, and calls `refinement_config`. It lives in the package so that a
config file loads by its path from any directory, without configs/ on sys.path.
"""

import ml_collections


def refinement_config(*, stage: int, vit_size: str, patch_size: int, prenorm: bool,
                      heads: list[str], batch_size: int, epochs: int, local_size: int,
                      pretrained: str, stage2_workdir: str, frozen_blocks: int = 0,
                      remat: bool = False, sharding_rules: str = "replicate",
                      vit_options: dict | None = None, heads_pooling: str = "",
                      global_size: int = 224) -> ml_collections.ConfigDict:
  """Stage 2 (heads on a frozen encoder, top-1 NN) or stage 3 (everything, top-20 NN)."""
  if stage not in (2, 3):
    raise ValueError(f"stage must be 2 or 3, got {stage}")
  depth = {"small": 12, "base": 12, "large": 24, "huge": 32, "twob": 24}[vit_size]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = stage

  # Encoder (section 1). compute_dtype bfloat16 matches the reference's bf16 autocast (1.5);
  # head_dtype bfloat16 the autocast boundaries of heads and NNA logits (models/heads.py).
  # num_heads: 0 = from the file or the size table; set it for a timm/MAE file whose width is
  # not a known size (timm/MAE state dicts from elsewhere do not record it).
  c.model = dict(size=vit_size, patch_size=patch_size, prenorm=prenorm, image_size=224,
                 compute_dtype="bfloat16", head_dtype="bfloat16", remat=remat, num_heads=0,
                 # timm options the weights must have (models/vit.py; checked against the file,
                 # used by the memory planner), e.g. dict(reg_tokens=4, init_values=1e-5).
                 vit_options=dict(vit_options or {}))
  # Stage 2 starts from converted pre-trained weights (any format tools/convert_weights.py reads);
  # stage 3 from the last checkpoint of a stage-2 workdir: encoder, heads, BN stats and queues.
  c.init = dict(pretrained=pretrained if stage == 2 else "",
                stage2_workdir=stage2_workdir if stage == 3 else "")

  # ID heads (sections 2, 4): reference names nnclr_temp{T}_cls{block}; "cls" = main output.
  # norm: the heads' BN statistics; sync_batch is the reference's SyncBN (models/heads.py).
  # pooling: "" = each name's (cls / avg); or cls, mean_patch, registers for all heads (or one
  # per head, comma-separated): mean_patch for encoders without CLS token (I-JEPA).
  c.heads = dict(names=",".join(heads), proj_hidden=2048, pred_hidden=4096, out_dim=256,
                 norm="sync_batch", pooling=heads_pooling)
  c.queue = dict(size=65536, topk=1 if stage == 2 else 20, similarity_dtype="bfloat16")
  c.loss = dict(local_view_indexing="reference")  # the official quirk (section 6)

  # Optimisation (section 7).
  c.batch_size = batch_size
  c.num_epochs = float(epochs)
  c.warmup_epochs = 4.0
  c.optim = dict(base_lr=2e-4 if stage == 2 else 4e-4, end_lr=1e-6, b1=0.9, b2=0.95, eps=1e-8,
                 layer_decay=0.65, encoder_wd=0.05, head_wd=1e-5, frozen_blocks=frozen_blocks)
  c.ema_decay = 0.9999 if stage == 3 else 0.0  # 0 disables the EMA (stage 2 has none)

  # Data (sections 9, 10): ImageNet-1k from tfds; any source spec of mim_refiner_jax/data/sources.py
  # works, e.g. --config.data.train=image_folder:/data/imagenet/train or
  # --config.data.train=tfds:imagenet2012:train,data_dir=/data/tfds.
  c.data = dict(
      train="tfds:imagenet2012:train",
      num_train_examples=0,  # 0: the length of the source (1,281,167 for ImageNet-1k)
      global_size=global_size, local_size=local_size, num_local=10, color_augs=True,
      worker_count=8, fail_fast=False)
  # k-NN monitor (section 10.1). "auto" follows data.train: for tfds ImageNet the 10% train subset
  # and the validation split (same data_dir), for an image folder .../train the folder itself and
  # its sibling val/ (see sources.default_eval_sources); set both to other specs to override.
  c.evals = dict(knn=dict(
      every_epochs=1, train="auto", test="auto",
      resize_size=256, crop_size=224, batch_size=1024, k=10, tau=0.07,
      features=f"block{depth - 1}_cls,block{depth - 1}_patch_mean"),
      # At the end of a run, the evaluation suite on its EMA encoder (tools/evaluate.py's
      # protocols, e.g. "knn,per_block,probe,lowshot,cluster"; "" = none): trained on data.train,
      # tested on the k-NN test set; results in WORKDIR/evaluation.
      final=dict(protocols="", preset="default", allow_label_mismatch=False))

  # Mesh (data, fsdp): -1 takes all remaining devices. "fsdp" rules shard parameters, Adam moments
  # and EMA over the "fsdp" axis, which then holds every device (fsdp=-1); the batch is split over
  # both axes either way (sharding.py).
  c.sharding = dict(data=-1, fsdp=-1 if sharding_rules == "fsdp" else 1, rules=sharding_rules)
  c.checkpoint = dict(every_steps=1000, keep=3)
  c.log_every_steps = 50
  return c


