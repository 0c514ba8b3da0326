"""Vision Transformer encoder: pre-norm (MAE, MAWS, dBOT, CrossMAE) and post-norm (data2vec 2.0).

Follows ../shared/reference/refiner_facts.md section 1. The module returns `(out, aux)`:
`out` is the "main" output `[B, 1 + h*w, D]` (after the final LayerNorm for pre-norm models; the
last block's output for post-norm ones, which have no final norm), and `aux` holds, for each block
index requested in `blocks`, the raw residual-stream CLS token and mean patch token of that block
(section 2: heads read `blocks[i]` without any norm). Blocks that are not requested are never
sliced, so they cost nothing after jit.

Options of timm's `VisionTransformer` used by the models people refine (timm defaults): register
tokens (`reg_tokens`, after CLS), `class_token=False`, LayerScale (`init_values`), `qkv_bias`,
`fc_norm` / `global_pool`, `no_embed_class` (a layout fact: our prefix tokens never get a position
term; a file's prefix position rows are folded into the tokens on conversion, exact since timm adds
them to constants). Tokens are `[CLS?, reg_0 .. reg_{R-1}, patches]`; "patch_mean" always
averages the patch tokens only and "registers" the register tokens (timm's `global_pool="avg"`).

Variables:
  params:  patch_embed{kernel (p,p,3,D), bias}, [cls_token (1,1,D)], [reg_token (1,R,D)],
           [embed_norm{scale,bias}], blocks_{i}{norm1, attn{qkv, proj}, [ls1{gamma}], norm2,
           mlp{fc1, fc2}, [ls2{gamma}]}, [norm{scale,bias}] | [fc_norm{scale,bias}]
  buffers: pos_embed (1, g, g, D): the frozen position table, loaded from the checkpoint and never
           trained (section 1.1). Other grids are resized with torch's bicubic kernel.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# width, depth, heads. Test sizes first, then the paper's (section 1.4); MLP ratio is 4 for all.
SIZES = {
    "mu": dict(width=32, depth=2, num_heads=2),
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "huge": dict(width=1280, depth=32, num_heads=16),
    "twob": dict(width=2560, depth=24, num_heads=32),
}

# timm VisionTransformer options this ViT has, with timm's defaults (module docstring).
OPTION_DEFAULTS = dict(reg_tokens=0, class_token=True, init_values=None, qkv_bias=True,
                       fc_norm=None, global_pool="token", no_embed_class=False)

NORM_EPS = 1e-6  # LayerNorm eps of every MIM model here (section 1.1)


def torch_bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """`[out_size, in_size]` matrix M with `M @ x` == torch bicubic resize of x along one axis.

  Torch's `interpolate(mode="bicubic", align_corners=False, antialias=False)` (section 1.1):
  source coordinate s = (o + 0.5) * in / out - 0.5 (unclamped), taps floor(s)-1 .. floor(s)+2
  clamped to the border, Keys kernel with A = -0.75, no widening when downsampling. 2-D resizing is
  separable, so applying this matrix along each spatial axis reproduces torch.
  """

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
      return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0

  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    s = (o + 0.5) * scale - 0.5
    i0 = int(np.floor(s))
    t = s - i0
    for k in (-1, 0, 1, 2):
      matrix[o, min(max(i0 + k, 0), in_size - 1)] += kernel(t - k)
  return matrix


def resize_pos_embed(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Resizes a `(1, h, w, D)` position table to `grid` with torch's bicubic kernel (in fp32)."""
  _, h, w, _ = pos.shape
  if (h, w) == tuple(grid):
    return pos
  rows = jnp.asarray(torch_bicubic_matrix(h, grid[0]), jnp.float32)
  cols = jnp.asarray(torch_bicubic_matrix(w, grid[1]), jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  pos = jnp.einsum("oh,bhwd->bowd", rows, pos.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,bowd->bopd", cols, pos, precision=hp)


def sincos_pos_embed(grid: int, dim: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table `(1, grid, grid, dim)`, column code in the first half.

  Only for models trained from scratch (tools/pretrain_mae.py). Refinement always loads the table
  from the checkpoint and never regenerates it (section 1.1, "sin-cos trap").
  """
  assert dim % 4 == 0, f"sin-cos position table needs a width divisible by 4, got {dim}"
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def encode(coords):  # [grid, grid] -> [grid, grid, dim/2]
    out = coords[..., None] * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing="ij")
  table = np.concatenate([encode(cols), encode(rows)], axis=-1)
  return table[None].astype(np.float32)


LayerNorm = functools.partial(nn.LayerNorm, epsilon=NORM_EPS, dtype=jnp.float32)


# Poolings of a block's tokens (module docstring); aux keys "{pooling}" and "block_{pooling}".
POOLINGS = ("cls", "patch_mean", "registers")

ATTENTION_IMPLS = ("einsum", "dot_product_attention", "cudnn")


class _HeadsLinear(nn.Module):
  """A Dense (kernel `[d_in, d_out]`, bias `[d_out]`, the names and init of nn.Dense) applied
  head-major: "qkv" maps `[B, T, D] -> 3 x [B, H, T, dh]`, "proj" maps `[B, H, T, dh] -> [B, T, D]`.
  Same parameters as the fused nn.Dense, so checkpoints and conversion do not change."""
  num_heads: int
  mode: str  # "qkv" or "proj"
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    if self.mode == "qkv":
      d_in = x.shape[-1]
      d_out = 3 * d_in
    else:
      d_in = d_out = x.shape[1] * x.shape[3]
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d_in, d_out), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (d_out,), jnp.float32)
            if self.use_bias else jnp.zeros((d_out,), jnp.float32))
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    h = self.num_heads
    if self.mode == "qkv":
      dh = d_in // h
      out = jnp.einsum("btd,dshk->sbhtk", x, kernel.reshape(d_in, 3, h, dh))
      return out + bias.reshape(3, 1, h, 1, dh) if self.use_bias else out
    dh = d_in // h
    return jnp.einsum("bhtk,hkd->btd", x, kernel.reshape(h, dh, d_out)) + bias


class Attention(nn.Module):
  """Fused-qkv multi-head self-attention; qkv output axis laid out (3, heads, head_dim).

  `impl`: "einsum" (explicit softmax attention computed head-major, the fastest on XLA:CPU),
  "dot_product_attention" (`jax.nn.dot_product_attention`, XLA path) or "cudnn" (the same with
  `implementation="cudnn"`: flash attention on NVIDIA GPUs, bf16/fp16 only). All three have the
  same parameters; logits and softmax are fp32.
  """
  num_heads: int
  dtype: Any = jnp.float32
  impl: str = "einsum"
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x, num_queries: int | None = None):
    """`x` `[B, T, D]` -> `[B, T, D]`, or `[B, num_queries, D]`: only the first tokens query."""
    b, t, d = x.shape
    nq = t if num_queries is None else num_queries
    if self.impl == "einsum":
      q, k, v = _HeadsLinear(self.num_heads, "qkv", self.dtype, self.qkv_bias,
                             name="qkv")(x)  # [B, H, T, dh]
      q = q[:, :, :nq]
      scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
      logits = jnp.einsum("bhqk,bhsk->bhqs", q * scale, k, preferred_element_type=jnp.float32)
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqs,bhsk->bhqk", probs, v)
      return _HeadsLinear(self.num_heads, "proj", self.dtype, name="proj")(out)
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}")
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    qkv = dense(3 * d, use_bias=self.qkv_bias, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(
        qkv[:, :nq, 0], qkv[:, :, 1], qkv[:, :, 2],
        implementation="cudnn" if self.impl == "cudnn" else None)
    return dense(d, name="proj")(out.reshape(b, nq, d))


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact GELU `x/2 * (1 + erf(x/sqrt 2))`, torch's formula for nn.GELU().

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU expands into branchy code that
  costs ~10% of the encoder step; erf is one rational approximation.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    h = gelu_exact(dense(self.hidden, name="fc1")(x))
    return dense(x.shape[-1], name="fc2")(h)


class LayerScale(nn.Module):
  """timm / DINOv2 LayerScale: a learned per-channel `gamma` (init `init_values`)."""
  init_values: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Transformer block. The residual stream stays fp32; linears run in `dtype` (section 1.5).

  `cls_only`: compute the output of the CLS token only (`[B, 1, D]`; keys and values still come
  from all tokens): the same CLS row, without the other rows' attention output and MLP.
  """
  num_heads: int
  mlp_hidden: int
  prenorm: bool = True
  dtype: Any = jnp.float32
  attention: str = "einsum"
  cls_only: bool = False
  qkv_bias: bool = True
  init_values: float | None = None  # LayerScale after attention and MLP (pre-norm only)

  @nn.compact
  def __call__(self, x):
    attn = Attention(self.num_heads, self.dtype, self.attention, self.qkv_bias, name="attn")
    mlp = Mlp(self.mlp_hidden, self.dtype, name="mlp")
    norm1, norm2 = LayerNorm(name="norm1"), LayerNorm(name="norm2")
    nq = 1 if self.cls_only else None
    rows = x[:, :1] if self.cls_only else x
    if self.prenorm:  # x + ls1(Attn(LN x)), x + ls2(MLP(LN x))  (timm Block)
      if self.init_values:
        ls1 = LayerScale(self.init_values, name="ls1")
        ls2 = LayerScale(self.init_values, name="ls2")
      else:
        ls1 = ls2 = lambda y: y
      x = rows + ls1(attn(norm1(x), nq))
      return x + ls2(mlp(norm2(x)))
    x = norm1(rows + attn(x, nq))  # post-norm (data2vec 2.0): LN(x + Attn x), LN(x + MLP x)
    return norm2(x + mlp(x))


class ViT(nn.Module):
  """ViT encoder exposing the CLS and mean-patch token of any block.

  Attributes:
    patch_size: side of a square patch.
    width, depth, num_heads, mlp_ratio: transformer size (see `SIZES`).
    prenorm: True for the MAE family (final `norm`), False for data2vec 2.0 (`embed_norm` before
      block 0, post-norm blocks, no final norm).
    pos_grid: side of the stored position table (14 for L/16 at 224 px, 16 for H/14 and 2B/14;
      37 for DINOv2's 518 px files), or (h, w). Any image size divisible by the patch size runs:
      the table is resized to its grid.
    dtype: compute dtype of convolutions, linears and attention. Parameters, LayerNorms, the
      position table and the residual stream stay fp32, matching torch bf16 autocast.
    remat: rematerialise each block in the backward pass (saves activation memory for 2B).
    frozen_blocks: the stem and blocks 0..n-1 are frozen (2B stage 3: 6, refiner_facts section 7):
      the residual stream (and any block output read before it) is stop_gradient'ed after block
      n-1, so no backward pass is built through them. Pre-norm only: a post-norm model's
      `embed_norm` before block 0 stays trainable in the reference and needs that backward.
    attention: attention implementation, see `Attention.impl` and `ATTENTION_IMPLS`.
    reg_tokens, class_token, init_values, qkv_bias, fc_norm, global_pool, no_embed_class: timm's
      options of the same names and defaults (module docstring). `fc_norm=None` follows timm:
      a LayerNorm after pooling (instead of the final `norm` on all tokens) iff global_pool="avg".
      `global_pool` only decides that; the main output exposes every pooling.
  """
  patch_size: int = 16
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  prenorm: bool = True
  pos_grid: int = 14
  dtype: Any = jnp.float32
  remat: bool = False
  frozen_blocks: int = 0
  attention: str = "einsum"
  reg_tokens: int = 0
  class_token: bool = True
  init_values: float | None = None
  qkv_bias: bool = True
  fc_norm: bool | None = None
  global_pool: str = "token"
  no_embed_class: bool = False

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token) + self.reg_tokens

  @property
  def use_fc_norm(self) -> bool:
    return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

  @nn.compact
  def __call__(self, images: jax.Array, blocks: Sequence[int] = (), keep: jax.Array | None = None,
               cls_only: bool = False):
    """Encodes `images` `[B, H, W, 3]` (normalised; H, W divisible by the patch size).

    `keep` `[B, K]` (optional) lists the patch indices (row-major) to keep, as MAE's random
    masking does after adding the position table; refinement never masks (section 1.1).
    `cls_only`: only CLS outputs are wanted: the last block computes the CLS row alone, `out` is
    `[B, 1, D]` and aux has no "patch_mean" (nor "block_patch_mean" of the last block); the CLS
    values are the same (saves ~2/3 of the last block).

    aux: "cls", "patch_mean", "registers" of the main output (after `fc_norm` where the model has
    one, i.e. timm's `forward_head(pre_logits=True)` for that pooling) and "block_cls",
    "block_patch_mean", "block_registers" {i: [B, D]} of the raw blocks; a pooling the model
    lacks (no CLS token, no registers) is absent.
    """
    p, d = self.patch_size, self.width
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by patch size {p}")
    bad = [i for i in blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"block indices {bad} out of range for a ViT of depth {self.depth}")
    if cls_only and not self.class_token:
      raise ValueError("cls_only needs a CLS token; this ViT has class_token=False")
    if self.global_pool not in ("token", "avg"):
      raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
    if self.global_pool == "token" and not self.class_token:
      raise ValueError("global_pool='token' needs a CLS token: use global_pool='avg' with "
                       "class_token=False (timm's rule)")
    if not self.prenorm and (self.init_values or self.use_fc_norm):
      raise ValueError("LayerScale and fc_norm are pre-norm (timm) options; a post-norm ViT has "
                       "neither")
    if self.frozen_blocks and not self.prenorm:
      raise ValueError("frozen_blocks cuts the backward pass before block n, but a post-norm ViT's "
                       "embed_norm stays trainable: freeze with the optimizer only (frozen_blocks=0"
                       " here)")

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed")(images)
    b, h, w, _ = x.shape
    grid = (self.pos_grid, self.pos_grid) if isinstance(self.pos_grid, int) else self.pos_grid
    pos = self.variable("buffers", "pos_embed", lambda: jnp.asarray(
        sincos_pos_embed(grid[0], d) if grid[0] == grid[1] else np.zeros((1, *grid, d)))).value
    # The fp32 table promotes the (possibly bf16) conv output: the residual stream is fp32.
    x = (x + resize_pos_embed(pos, (h, w))).reshape(b, h * w, d)
    if keep is not None:
      x = jnp.take_along_axis(x, keep[:, :, None], axis=1)
    prefix = []  # timm order: CLS, then registers (no position term: see the module docstring)
    if self.class_token:
      prefix.append(self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32))
    if self.reg_tokens:
      prefix.append(self.param("reg_token", nn.initializers.normal(0.02),
                               (1, self.reg_tokens, d), jnp.float32))
    n_pre = self.num_prefix_tokens
    if prefix:
      tokens = jnp.concatenate(prefix, axis=1)
      x = jnp.concatenate([jnp.broadcast_to(tokens, (b, n_pre, d)).astype(x.dtype), x], axis=1)
    if not self.prenorm:
      x = LayerNorm(name="embed_norm")(x)

    block_cls = nn.remat(Block) if self.remat else Block
    wanted = set(blocks)
    aux = {"block_cls": {}, "block_patch_mean": {}}
    if self.reg_tokens:
      aux["block_registers"] = {}
    for i in range(self.depth):
      last = cls_only and i == self.depth - 1
      x = block_cls(self.num_heads, int(self.mlp_ratio * d), self.prenorm, self.dtype,
                    self.attention, last, self.qkv_bias, self.init_values, name=f"blocks_{i}")(x)
      if i < self.frozen_blocks:  # nothing trainable before this point: no backward through it
        x = jax.lax.stop_gradient(x)
      for pooling in POOLINGS if i in wanted else ():
        pooled = self._pool(x, pooling, last)
        if pooled is not None:
          aux[f"block_{pooling}"][i] = pooled
    fc_norm = self.prenorm and self.use_fc_norm
    out = LayerNorm(name="norm")(x) if self.prenorm and not fc_norm else x
    post = LayerNorm(name="fc_norm") if fc_norm else (lambda y: y)
    for pooling in POOLINGS:
      pooled = self._pool(out, pooling, cls_only)
      if pooled is not None:
        aux[pooling] = post(pooled)
    return out, aux

  def _pool(self, x, pooling: str, cls_only: bool) -> jax.Array | None:
    """Pooled `[B, D]` of tokens `x`; None where the model (or `cls_only`) lacks the pooling."""
    c = int(self.class_token)
    if pooling == "cls":
      return x[:, 0] if c else None
    if cls_only:
      return None
    if pooling == "patch_mean":
      return x[:, self.num_prefix_tokens:].mean(axis=1)
    return x[:, c:self.num_prefix_tokens].mean(axis=1) if self.reg_tokens else None


def vit_kwargs(size: str, patch_size: int, prenorm: bool = True, image_size: int = 224,
               **overrides) -> dict:
  """Constructor arguments for a named size, e.g. `ViT(**vit_kwargs("large", 16))`."""
  if size not in SIZES:
    raise ValueError(f"unknown ViT size {size!r}; known: {sorted(SIZES)}")
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
  kwargs = dict(SIZES[size], patch_size=patch_size, mlp_ratio=4.0, prenorm=prenorm,
                pos_grid=image_size // patch_size)
  kwargs.update(overrides)
  return kwargs
