"""Masked autoencoder (He et al. 2022, facebookresearch/mae `models_mae.py`) around our ViT.

Only for pre-training the small models of the CPU demo from scratch (tools/pretrain_mae.py);
refinement loads the encoder alone. The encoder is `vit.ViT` as the submodule "encoder", so
`variables["params"]["encoder"]` and `variables["buffers"]["encoder"]` are exactly a ViT's
variables; everything else is named `decoder_*` or `mask_token` (the names MAE's converters drop,
refiner_facts.md section 3.1).

Forward, as in MAE: patch embed + fixed sin-cos positions, keep a random 25% of the patches per
sample (argsort of uniform noise), prepend CLS, pre-norm blocks, final norm; then `decoder_embed`,
mask tokens at the dropped positions, unshuffle, fixed sin-cos decoder positions (zero for CLS),
pre-norm decoder blocks, `decoder_norm`, `decoder_pred` to p*p*3 pixel values per patch. The loss
is the MSE to the per-patch normalised pixels, averaged over masked patches only.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_refiner_jax.models import vit


def random_masking(rng: jax.Array, batch: int, num_patches: int,
                   mask_ratio: float) -> jax.Array:
  """MAE's per-sample random shuffle `ids_shuffle` `[B, N]` (argsort of uniform noise).

  The first `num_visible(num_patches, mask_ratio)` entries of a row are the kept patches.
  """
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.argsort(noise, axis=1)


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of kept patches; `int(N * (1 - ratio))` as in MAE."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
  return max(1, int(num_patches * (1 - mask_ratio)))


def masking_indices(ids_shuffle: jax.Array, num_keep: int):
  """From a shuffle, returns `(keep [B, K], ids_restore [B, N], mask [B, N])`, mask 1 = dropped.

  `take_along_axis(shuffled, ids_restore)` undoes the shuffle (row-major patch order again).
  """
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return ids_shuffle[:, :num_keep], ids_restore, mask


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C]` -> `[B, h*w, p*p*C]`: patches row-major, each laid out (p, p, C) as in MAE."""
  b, hh, ww, c = images.shape
  p = patch_size
  if hh % p or ww % p:
    raise ValueError(f"image size {(hh, ww)} is not divisible by patch size {p}")
  x = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images: `[B, h*w, p*p*C]` -> `[B, H, W, C]`."""
  b, n, _ = patches.shape
  g, p = int(round(n ** 0.5)), patch_size
  if g * g != n:
    raise ValueError(f"{n} patches do not form a square grid")
  x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, channels)


def norm_pix_target(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
  """MAE's `norm_pix_loss` target: each patch minus its mean, over sqrt(var + eps).

  The variance is torch's default `Tensor.var`, i.e. unbiased (ddof=1), as in MAE.
  """
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix: bool = True) -> jax.Array:
  """Mean over masked patches of the per-patch MSE between `pred` `[B, N, p*p*C]` and the target."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    target = norm_pix_target(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def decoder_pos_embed(grid: int, dim: int) -> np.ndarray:
  """Fixed `(1, 1 + grid*grid, dim)` sin-cos decoder positions, zero row for CLS (as MAE)."""
  table = vit.sincos_pos_embed(grid, dim).reshape(1, grid * grid, dim)
  return np.concatenate([np.zeros((1, 1, dim), np.float32), table], axis=1)


class MAE(nn.Module):
  """MAE encoder (`vit.ViT`, pre-norm) + light decoder.

  Attributes:
    patch_size, width, depth, num_heads, mlp_ratio, pos_grid, dtype: the encoder's ViT arguments
      (`ViT(**encoder_kwargs)` rebuilds the encoder alone).
    decoder_width, decoder_depth, decoder_heads: decoder size (MAE's is 512, 8, 16 for L/16).
    mask_ratio: fraction of patches dropped per sample (0.75 in MAE).
  """
  patch_size: int = 4
  width: int = 128
  depth: int = 6
  num_heads: int = 4
  mlp_ratio: float = 4.0
  pos_grid: int = 8
  decoder_width: int = 64
  decoder_depth: int = 2
  decoder_heads: int = 2
  mask_ratio: float = 0.75
  dtype: Any = jnp.float32

  @property
  def encoder_kwargs(self) -> dict:
    return dict(patch_size=self.patch_size, width=self.width, depth=self.depth,
                num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, prenorm=True,
                pos_grid=self.pos_grid)

  @nn.compact
  def __call__(self, images: jax.Array, ids_shuffle: jax.Array | None = None):
    """Returns `(pred [B, N, p*p*3], mask [B, N])` for normalised images `[B, H, W, 3]`.

    `ids_shuffle` `[B, N]` (from `random_masking`) fixes the masking; without it one is drawn from
    the "mask" rng stream.
    """
    b, hh, ww, _ = images.shape
    p = self.patch_size
    if hh != ww or hh != self.pos_grid * p:
      raise ValueError(f"MAE expects square {self.pos_grid * p}px images (pos_grid {self.pos_grid}"
                       f" x patch {p}), got {hh}x{ww}")
    n = self.pos_grid ** 2
    if ids_shuffle is None:
      ids_shuffle = random_masking(self.make_rng("mask"), b, n, self.mask_ratio)
    keep, ids_restore, mask = masking_indices(ids_shuffle, num_visible(n, self.mask_ratio))

    encoded, _ = vit.ViT(**self.encoder_kwargs, dtype=self.dtype, name="encoder")(images,
                                                                                  keep=keep)

    dense = lambda features, name: nn.Dense(  # pylint: disable=g-long-lambda
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name)
    d = self.decoder_width
    x = dense(d, "decoder_embed")(encoded)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    tokens = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token, (b, n - keep.shape[1], d)).astype(x.dtype)], axis=1)
    tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)  # unshuffle
    x = jnp.concatenate([x[:, :1], tokens], axis=1) + decoder_pos_embed(self.pos_grid, d)
    for i in range(self.decoder_depth):
      x = vit.Block(self.decoder_heads, int(self.mlp_ratio * d), prenorm=True, dtype=self.dtype,
                    name=f"decoder_blocks_{i}")(x)
    x = vit.LayerNorm(name="decoder_norm")(x)
    pred = dense(p * p * 3, "decoder_pred")(x)[:, 1:]
    return pred.astype(jnp.float32), mask
