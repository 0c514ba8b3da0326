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

`norm` (config `heads.norm`) chooses where the statistics come from. The paper's one stated
limitation (section 6) is that SyncBN makes every head layer wait for an all-reduce; it suggests
statistics of previous iterations, communicated asynchronously. Modes (all keep the affine
scale/bias, so params and optimizer state are the same in every mode):

  sync_batch   (default, the reference) mean and biased variance of the global batch, all rows of
               the call; running stats as torch: r <- (1 - 0.1) r + 0.1 * stat, with the unbiased
               variance n / (n - 1). Eval: the running stats.
  local_batch  "ghost BN": the batch axis (the last leading axis) is cut into `groups` blocks of
               consecutive samples (groups = devices the batch is sharded over, so each device
               normalises its own rows and the forward has no collective); stats per block over
               all views. Running stats: the torch update with the mean over blocks of the block
               means and unbiased block variances (an all-reduce nothing in the forward waits for).
               Eval: the running stats. With groups = 1 it is sync_batch.
  async_stats  normalise with the statistics of PREVIOUS steps held in batch_stats (no gradient
               flows through them). After the forward, the global batch mean mu_t and biased
               variance s2_t of the current rows (all-reduced by XLA, needed only by the next
               step) update a bias-corrected EMA with momentum m = 0.1:
                 w_t = (1 - m) w_{t-1} + m,  w_0 = 0     (so w_t = 1 - (1 - m)^t)
                 mean_t = mean_{t-1} + (m / w_t) (mu_t - mean_{t-1})
                 var_t  = var_{t-1}  + (m / w_t) (s2_t - var_{t-1})
               i.e. mean_t = sum_k m (1 - m)^(t-k) mu_k / w_t (Adam's bias correction). Step 0
               normalises with the initial mean 0, var 1 (`none` up to 1/sqrt(1 + eps)), step 1
               with exactly step 0's global statistics. Eval uses mean, var: what the next train
               step would use.
               `weight` (w_t) is an extra batch_stats entry of this mode.
  batch_renorm Batch Renormalization (Ioffe 2017) over async_stats' statistics: the forward's value
               is (close to) async_stats', the gradient is local_batch's. Per block g of the batch
               (as local_batch: one per device, no collective) mu_g, s_g = sqrt(s2_g + eps) with
               gradient; with the stored mean, s = sqrt(var + eps):
                 r = sg(clip(s_g / s, 1/3, 3)),  d = sg(clip((mu_g - mean) / s, -5, 5))
                 y = ((x - mu_g) / s_g * r + d) * scale + bias
               which is (x - mean) / s * scale + bias while the clips (Ioffe's final r_max 3,
               d_max 5) are inactive. Step 0 (weight 0: nothing stored yet) uses r = 1, d = 0,
               i.e. local_batch. mean, var and weight are updated exactly as async_stats' (the
               global batch statistics, all-reduced for the next step). Eval: mean, var.
  none         no statistics: y = x * scale + bias, in train and eval (the paper's ablation
               "without normalisation"); mean/var stay at their initial values, unused.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_refiner_jax.models.vit import gelu_exact

BN_EPS = 1e-5       # torch BatchNorm1d default
BN_MOMENTUM = 0.1   # torch convention: running <- (1 - m) * running + m * batch
NORMS = ("sync_batch", "local_batch", "async_stats", "batch_renorm", "none")  # config heads.norm
RENORM_R_MAX, RENORM_D_MAX = 3.0, 5.0  # batch_renorm's clips (Ioffe 2017's final values)


class TorchBatchNorm(nn.Module):
  """BatchNorm1d with torch's exact semantics; statistics over all leading axes of `[..., C]`.

  Differs from `flax.linen.BatchNorm` in one point that matters for checkpoints carried from stage 2
  to stage 3 and for eval-mode features (the k-NN monitor reads projector_0 in eval mode): torch
  updates `running_var` with the *unbiased* batch variance (n / (n - 1)), Flax with the biased one.
  Normalisation in train mode uses the biased variance in both. The statistics are computed in fp32
  with the two-pass formula (mean first, then the mean squared deviation).

  `norm` and `groups`: the statistics' source (module docstring). The named scopes
  "head_norm_stats" (batch statistics) and "head_norm_apply" (the normalisation) mark the ops in
  the compiled HLO for tools/head_norm_collectives.py.
  """
  eps: float = BN_EPS
  momentum: float = BN_MOMENTUM
  dtype: Any = jnp.float32
  norm: str = "sync_batch"
  groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    x = x.astype(jnp.float32)
    if self.norm == "none":
      with jax.named_scope("head_norm_apply"):
        y = x * scale + bias
      return y.astype(self.dtype)
    if self.norm in ("async_stats", "batch_renorm"):
      return self._async(x, scale, bias, ra_mean, ra_var, train)
    if self.norm == "local_batch" and train:
      return self._local(x, scale, bias, ra_mean, ra_var)
    if train:
      axes = tuple(range(x.ndim - 1))  # all leading axes, e.g. views and batch
      n = int(np.prod(x.shape[:-1]))
      if n < 2:
        raise ValueError(f"BatchNorm in train mode needs at least 2 rows, got {n}")
      with jax.named_scope("head_norm_stats"):
        mean = x.mean(axis=axes)
        var = jnp.square(x - mean).mean(axis=axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    with jax.named_scope("head_norm_apply"):
      y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)

  def _group_stats(self, x):
    """x cut into `groups` blocks of consecutive samples of the batch axis (axis -2), each
    block's mean and biased variance over its rows, and the rows per block."""
    b, g = x.shape[-2], self.groups
    if b % g:
      raise ValueError(f"{self.norm}: the batch of {b} does not split into {g} groups")
    grouped = x.reshape(x.shape[:-2] + (g, b // g, x.shape[-1]))  # [..., G, B/G, C]
    axes = tuple(range(grouped.ndim - 3)) + (grouped.ndim - 2,)   # all but groups, features
    n = int(np.prod(grouped.shape[:-3])) * (b // g)               # rows per group
    if n < 2:
      raise ValueError(f"BatchNorm in train mode needs at least 2 rows per group, got {n}")
    with jax.named_scope("head_norm_stats"):
      mean = grouped.mean(axis=axes, keepdims=True)               # [1.., G, 1, C]
      var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
    return grouped, mean, var, n

  def _local(self, x, scale, bias, ra_mean, ra_var):
    """Statistics per block of `groups` consecutive samples of the batch axis."""
    grouped, mean, var, n = self._group_stats(x)
    g = self.groups
    if not self.is_initializing():
      m, c = self.momentum, x.shape[-1]
      ra_mean.value = (1 - m) * ra_mean.value + m * mean.reshape(g, c).mean(axis=0)
      ra_var.value = (1 - m) * ra_var.value + m * (var.reshape(g, c) * (n / (n - 1))).mean(axis=0)
    with jax.named_scope("head_norm_apply"):
      y = (grouped - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.reshape(x.shape).astype(self.dtype)

  def _async(self, x, scale, bias, ra_mean, ra_var, train):
    """Normalise with the stored statistics; fold this step's global ones in for the next."""
    weight = self.variable("batch_stats", "weight", lambda: jnp.zeros((), jnp.float32))
    mean, var = ra_mean.value, ra_var.value  # previous steps' (state: no gradient)
    if self.norm == "batch_renorm" and train:
      y = self._renorm(x, scale, bias, mean, var, weight.value)
    else:
      with jax.named_scope("head_norm_apply"):
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    if train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      with jax.named_scope("head_norm_stats"):
        rows = jax.lax.stop_gradient(x)
        batch_mean = rows.mean(axis=axes)
        batch_var = jnp.square(rows - batch_mean).mean(axis=axes)
      m = self.momentum
      new_weight = (1 - m) * weight.value + m
      rate = m / new_weight
      weight.value = new_weight
      ra_mean.value = mean + rate * (batch_mean - mean)
      ra_var.value = var + rate * (batch_var - var)
    return y.astype(self.dtype)

  def _renorm(self, x, scale, bias, mean, var, weight):
    """batch_renorm's train-mode forward (module docstring): local statistics carry the gradient,
    r and d (no gradient) move the value onto the stored statistics'."""
    grouped, group_mean, group_var, _ = self._group_stats(x)
    with jax.named_scope("head_norm_apply"):
      group_std = jnp.sqrt(group_var + self.eps)
      std = jnp.sqrt(var + self.eps)
      stored = weight > 0  # step 0: nothing stored yet, plain per-block BatchNorm
      r = jnp.where(stored, jnp.clip(group_std / std, 1 / RENORM_R_MAX, RENORM_R_MAX), 1.0)
      d = jnp.where(stored, jnp.clip((group_mean - mean) / std, -RENORM_D_MAX, RENORM_D_MAX), 0.0)
      r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
      y = ((grouped - group_mean) / group_std * r + d) * scale + bias
    return y.reshape(x.shape)


class LinearBN(nn.Module):
  """Bias-free Linear -> BatchNorm [-> exact GELU]: one `nn.Sequential` of the reference MLPs."""
  features: int
  gelu: bool
  dtype: Any = jnp.float32  # matmul and activation dtype (bf16: the reference's autocast, 1.5)
  norm: str = "sync_batch"
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                 kernel_init=nn.initializers.xavier_uniform(), name="dense")(x)
    x = TorchBatchNorm(dtype=self.dtype, norm=self.norm, groups=self.groups, name="bn")(x, train)
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
    norm: the statistics of every BatchNorm (module docstring; config `heads.norm`).
    norm_groups: local_batch's blocks of the batch axis: the devices the batch is sharded over.
  """
  proj_hidden_dim: int = 2048
  pred_hidden_dim: int = 4096
  output_dim: int = 256
  proj_hidden_layers: int = 1
  pred_hidden_layers: int = 0
  dtype: Any = jnp.float32
  norm: str = "sync_batch"
  norm_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True):
    """`x` `[..., D]`: pooled features, e.g. `[N, D]` or `[views, B, D]` (one BN call over all)."""
    if x.ndim < 2:
      raise ValueError(f"IDHead expects pooled features [..., N, D], got shape {x.shape}")
    proj = [self.proj_hidden_dim] * (1 + self.proj_hidden_layers) + [self.output_dim]
    pred = [self.pred_hidden_dim] * (1 + self.pred_hidden_layers) + [self.output_dim]
    z = x
    for i, features in enumerate(proj):
      z = LinearBN(features, gelu=i < len(proj) - 1, dtype=self.dtype, norm=self.norm,
                   groups=self.norm_groups, name=f"projector_{i}")(
          z, train)
    p = z
    for i, features in enumerate(pred):
      p = LinearBN(features, gelu=i < len(pred) - 1, dtype=self.dtype, norm=self.norm,
                   groups=self.norm_groups, name=f"predictor_{i}")(
          p, train)
    return z, p
