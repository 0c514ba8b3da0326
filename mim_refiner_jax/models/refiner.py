"""Encoder + ID heads over the views of several resolutions (refiner_facts.md sections 2 and 4).

Views come view-major, as the batch holds them: global views `[2, B, G, G, 3]` (g1, g2) and local
views `[n, B, L, L, 3]` (l1 .. ln). Views of one resolution go through the encoder in one call. Each
head pools its block's output, stacks the pooled views of both calls into `[2 + n, B, D]`
(g1, g2, l1, ..., ln: section 4 "View order") and runs projector and predictor on all of them at
once, so each BatchNorm normalises all views of the global batch in ONE call (statistics over the
view and batch axes), as the reference's SyncBN over its 12B rows.

The view axis is never merged into the (device-sharded) batch axis: merging [V, B] with B sharded
into one row axis is not a blockwise sharding, and XLA then gathers the whole batch of images
onto every device (seen in the compiled HLO). The encoder therefore sees the views sample-major
(`[B, V] -> [B * V]`, a local transpose that keeps each device's block contiguous) and the heads
work on `[V, B, D]`.

A head reads (section 2):
  block "main": the main output (after the final LayerNorm for pre-norm ViTs, the last block for
                post-norm ones);
  block i:      the raw residual stream of blocks[i] (0-based, no norm).
and pools it by "cls" (first token), "patch_mean" (mean of the patch tokens, registers excluded;
CrossMAE's "avg"; the pooling of encoders without CLS token) or "registers" (models/vit.py).

`Refiner` is a plain Python object around two Linen modules (the ViT and one `IDHead` definition
shared by all heads, each with its own variables), so the variables come as the dicts the train
state uses: params {"encoder": ..., "heads": {name: ...}}, buffers (the ViT's frozen pos table),
batch_stats {name: ...}.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from mim_refiner_jax.config import HeadSpec
from mim_refiner_jax.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, normalize_table
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.models.vit import POOLINGS, ViT


def head_input(aux: dict, spec: HeadSpec) -> jax.Array:
  """The pooled encoder output `[B, D]` a head reads from the ViT's aux (section 2)."""
  if spec.block == "main":
    return aux[spec.pooling]
  return aux[f"block_{spec.pooling}"][spec.block]


class Refiner:
  """MIM-Refiner model: a ViT encoder and ID heads attached to its blocks.

  Args:
    encoder: the ViT module.
    heads: head specs (name, block "main" or int, temperature, pooling: vit.POOLINGS).
    head: the IDHead module definition (sizes, dtype) used for every head.
    mean, std: per-channel normalisation of uint8 views, applied on the device as the first op
      (the loader ships uint8, a quarter of float32's bytes); float views are taken as normalised.
  """

  def __init__(self, encoder: ViT, heads: Sequence[HeadSpec], head: IDHead,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    names = [h.name for h in heads]
    if not heads or len(set(names)) != len(names):
      raise ValueError(f"need at least one head and unique head names, got {names}")
    for h in heads:
      if h.pooling not in POOLINGS:
        raise ValueError(f"head {h.name}: pooling must be one of {POOLINGS}, got {h.pooling!r}")
      if (h.pooling == "cls" and not encoder.class_token) or (
          h.pooling == "registers" and not encoder.reg_tokens):
        raise ValueError(f"head {h.name}: pooling {h.pooling!r} but the encoder has no "
                         f"{'CLS token' if h.pooling == 'cls' else 'register tokens'}")
      if h.block != "main" and not (isinstance(h.block, int) and 0 <= h.block < encoder.depth):
        raise ValueError(f"head {h.name}: block must be 'main' or an int in [0, {encoder.depth}), "
                         f"got {h.block!r}")
    self.encoder = encoder
    self.heads = tuple(heads)
    self.head = head
    self.mean, self.std = tuple(mean), tuple(std)
    self.blocks = tuple(sorted({h.block for h in heads if h.block != "main"}))
    self.cls_only = all(h.pooling == "cls" for h in heads)

  def _pool(self, aux: dict, spec: HeadSpec) -> jax.Array:
    return head_input(aux, spec)

  def normalize(self, views: jax.Array) -> jax.Array:
    """uint8 pixels `[..., 3]` -> float32 `(x / 255 - mean) / std` (ToTensor + Normalize).

    A lookup in the host-computed 256-level table of data/multicrop.normalize, so the values are
    the host float path's bit for bit (XLA rewrites the arithmetic and would differ by an ulp).
    Float views are returned unchanged (already normalised).
    """
    if views.dtype != jnp.uint8:
      return views
    table = jnp.asarray(normalize_table(self.mean, self.std).T)  # [256, C]
    return table[views.astype(jnp.int32), jnp.arange(table.shape[1])]

  def encode(self, encoder_params, buffers, global_views, local_views=None) -> dict:
    """Pooled features `{head: [2 + n, B, D]}` (fp32) of `[2, B, G, G, 3]`, `[n, B, L, L, 3]`
    views, uint8 (normalised here) or normalised float."""
    groups = [global_views] if local_views is None else [global_views, local_views]
    pooled = {h.name: [] for h in self.heads}
    for views in groups:
      if views.ndim != 5:
        raise ValueError(f"views must be [V, B, H, W, 3] (view-major), got shape {views.shape}")
      v, b = views.shape[:2]
      rows = jnp.swapaxes(views, 0, 1).reshape((b * v,) + views.shape[2:])  # sample-major
      rows = self.normalize(rows)
      # With CLS pooling only, the last block computes the CLS row alone (models/vit.py).
      _, aux = self.encoder.apply({"params": encoder_params, "buffers": buffers}, rows,
                                  blocks=self.blocks, cls_only=self.cls_only)
      for h in self.heads:
        x = self._pool(aux, h)
        pooled[h.name].append(jnp.swapaxes(x.reshape(b, v, x.shape[-1]), 0, 1))
    return {name: jnp.concatenate(xs, axis=0).astype(jnp.float32) for name, xs in pooled.items()}

  def init(self, key, global_views, local_views=None) -> dict:
    """Variables `{"params": {"encoder", "heads"}, "buffers", "batch_stats"}`.

    Views as in `apply` (`[V, B, H, W, 3]`, B >= 2); only their shapes matter (use e.g.
    `jnp.zeros`), so this can run under `jax.eval_shape` and a sharded `jax.jit`.
    """
    k_enc, k_heads = jax.random.split(key)
    enc_vars = self.encoder.init(k_enc, global_views[0, :1])
    features = self.encode(enc_vars["params"], enc_vars["buffers"], global_views[:, :2],
                           None if local_views is None else local_views[:, :2])
    heads, stats = {}, {}
    for i, h in enumerate(self.heads):
      v = self.head.init(jax.random.fold_in(k_heads, i), features[h.name], train=False)
      heads[h.name], stats[h.name] = v["params"], v["batch_stats"]
    return {"params": {"encoder": enc_vars["params"], "heads": heads},
            "buffers": enc_vars["buffers"], "batch_stats": stats}

  def apply(self, params, buffers, batch_stats, global_views, local_views=None, *,
            train: bool = True, freeze_encoder: bool = False):
    """Runs encoder and heads on a batch of views.

    Args:
      params: {"encoder", "heads": {name}}.
      buffers: the encoder's buffers (pos_embed).
      batch_stats: {name: head BatchNorm statistics}.
      global_views: `[2, B, G, G, 3]` (g1, g2).
      local_views: `[n, B, L, L, 3]` (l1 .. ln) or None.
      train: BatchNorm uses batch statistics and updates the running ones.
      freeze_encoder: stage 2; gradients stop at the encoder outputs (section 7: the frozen
        encoder has no dropout/BN, so eval mode changes nothing else).

    Returns:
      `({name: (z, p)}, new_batch_stats)` with z, p `[2 + n, B, d]` in the head's dtype.
    """
    features = self.encode(params["encoder"], buffers, global_views, local_views)
    outputs, new_stats = {}, {}
    for h in self.heads:
      x = features[h.name]
      if freeze_encoder:
        x = jax.lax.stop_gradient(x)
      variables = {"params": params["heads"][h.name], "batch_stats": batch_stats[h.name]}
      if train:
        (z, p), updated = self.head.apply(variables, x, train=True, mutable=["batch_stats"])
        new_stats[h.name] = updated["batch_stats"]
      else:
        z, p = self.head.apply(variables, x, train=False)
        new_stats[h.name] = batch_stats[h.name]
      outputs[h.name] = (z, p)
    return outputs, new_stats
