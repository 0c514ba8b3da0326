"""ID head of MIM-Refiner: projector and predictor MLPs with BatchNorm (refiner_facts.md section 4).

  projector: Linear D->h, BN, GELU | (Linear h->h, BN, GELU) x proj_hidden_layers | Linear h->d, BN
  predictor: Linear d->h', BN, GELU | (Linear h'->h', BN, GELU) x pred_hidden_layers
             | Linear h'->d, BN

Every Linear is bias-free (norm mode "batchnorm"), GELU is exact (erf), BN is affine with torch's
defaults (eps 1e-5, momentum 0.1), kernels are xavier-uniform. The predictor is fed the raw
projector output (`norm_before_pred=False`).

Parameter names map one to one onto the reference state dict (section 3.5):
  projector_{i}/dense/kernel   <- projector.{i}.0.weight (transposed)
  projector_{i}/bn/{scale,bias} <- projector.{i}.1.{weight,bias}
  batch_stats projector_{i}/bn/{mean,var} <- projector.{i}.1.{running_mean,running_var}
and likewise predictor_{i}.

BatchNorm statistics are computed over all rows of the call (all leading axes: views and batch).
Under `jax.jit` with the batch sharded over devices XLA all-reduces them, so the statistics are those of the global batch, as the
reference's SyncBatchNorm over all 12 views (ENGINEERING.md "Meshes"): no axis_name is needed.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_refiner_jax.models.vit import gelu_exact

BN_EPS = 1e-5       # torch BatchNorm1d default
BN_MOMENTUM = 0.1   # torch convention: running <- (1 - m) * running + m * batch


class TorchBatchNorm(nn.Module):
  """BatchNorm1d with torch's exact semantics; statistics over all leading axes of `[..., C]`.

  Differs from `flax.linen.BatchNorm` in one point that matters for checkpoints carried from stage 2
  to stage 3 and for eval-mode features (the k-NN monitor reads projector_0 in eval mode): torch
  updates `running_var` with the *unbiased* batch variance (n / (n - 1)), Flax with the biased one.
  Normalisation in train mode uses the biased variance in both. The statistics are computed in fp32
  with the two-pass formula (mean first, then the mean squared deviation).
  """
  eps: float = BN_EPS
  momentum: float = BN_MOMENTUM
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    x = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))  # all leading axes, e.g. views and batch
      n = int(np.prod(x.shape[:-1]))
      if n < 2:
        raise ValueError(f"BatchNorm in train mode needs at least 2 rows, got {n}")
      mean = x.mean(axis=axes)
      var = jnp.square(x - mean).mean(axis=axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


class LinearBN(nn.Module):
  """Bias-free Linear -> BatchNorm [-> exact GELU]: one `nn.Sequential` of the reference MLPs."""
  features: int
  gelu: bool
  dtype: Any = jnp.float32  # matmul and activation dtype (bf16: the reference's autocast, 1.5)

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                 kernel_init=nn.initializers.xavier_uniform(), name="dense")(x)
    x = TorchBatchNorm(dtype=self.dtype, name="bn")(x, train)
    if self.gelu:  # torch computes a bf16 GELU in fp32 and rounds the result
      x = gelu_exact(x.astype(jnp.float32)).astype(self.dtype)
    return x


class IDHead(nn.Module):
  """Projector + predictor. Returns `(z, p)`, both `[..., output_dim]` in `dtype`, un-normalised.

  Attributes:
    proj_hidden_dim, proj_hidden_layers: projector width and number of hidden h->h layers
      (reference preset "base": 2048 and 1, i.e. 3 Linear layers).
    pred_hidden_dim, pred_hidden_layers: predictor width and hidden layers ("base": 4096 and 0).
    output_dim: size of z and p (256).
    dtype: the head dtype (config `model.head_dtype`). bfloat16 reproduces torch bf16 autocast
      (refiner_facts 1.5): Linear in bf16 with bf16 results, BatchNorm statistics and
      normalisation computed in fp32 from the bf16 input and rounded back to bf16 (torch's
      batch_norm keeps the input dtype), GELU computed in fp32 and rounded; so z and p are bf16.
      float32: everything fp32.
  """
  proj_hidden_dim: int = 2048
  pred_hidden_dim: int = 4096
  output_dim: int = 256
  proj_hidden_layers: int = 1
  pred_hidden_layers: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True):
    """`x` `[..., D]`: pooled features, e.g. `[N, D]` or `[views, B, D]` (one BN call over all)."""
    if x.ndim < 2:
      raise ValueError(f"IDHead expects pooled features [..., N, D], got shape {x.shape}")
    proj = [self.proj_hidden_dim] * (1 + self.proj_hidden_layers) + [self.output_dim]
    pred = [self.pred_hidden_dim] * (1 + self.pred_hidden_layers) + [self.output_dim]
    z = x
    for i, features in enumerate(proj):
      z = LinearBN(features, gelu=i < len(proj) - 1, dtype=self.dtype, name=f"projector_{i}")(
          z, train)
    p = z
    for i, features in enumerate(pred):
      p = LinearBN(features, gelu=i < len(pred) - 1, dtype=self.dtype, name=f"predictor_{i}")(
          p, train)
    return z, p
