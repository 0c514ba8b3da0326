"""Optimizer of MIM-Refiner: AdamW, LR schedule, layer-wise LR decay, weight decay, freezing, EMA.

Follows ../shared/reference/refiner_facts.md section 7. The trainable tree is
`{"encoder": <ViT params>, "heads": {<head name>: <head params>}}`; the position table lives in the
"buffers" collection and never reaches the optimizer.

The update equals torch.optim.AdamW with one param group per (lr_scale, weight_decay): for a leaf p
with gradient g at (0-based) update s,

  p <- p - lr(s) * lr_scale(p) * (adam(g) + wd(p) * p),   adam(g) = m_hat / (sqrt(v_hat) + eps)

which is torch's `p *= 1 - lr*wd; p -= lr * m_hat / (sqrt(v_hat) + eps)` with the group lr
lr(s) * lr_scale. Frozen leaves get a zero update, no decay and no Adam moments.

The chain is one `optax.chain` whose state holds no per-leaf Python objects:
  0. `optax.partition`: Adam moments for trainable leaves, `set_to_zero` for frozen ones;
     stage 2 (`freeze_encoder`) goes further: the whole chain only sees the `{"heads": ...}`
     subtree (`optimized_params`), so the step differentiates and updates the heads alone;
  1. per-leaf lr_scale and decoupled weight decay, both derived from the leaf's path (stateless);
  2. `optax.scale_by_learning_rate(schedule)`: its `count` is the update counter (see
     `optimizer_step`), so the schedule position is restored with the optimizer state.
The Adam moments sit under the same dict paths as the params, so path-based sharding rules for the
params also apply to them.
"""

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mim_refiner_jax import sharding as sharding_lib

# Parameter groups for layer-wise LR decay (section 7 table). Exactly one rule must match each path.
# Stem: the reference's prefixes patch_embed, cls_token, pos_embed, embed_norm and the name
# mask_token (pos_embed is a buffer here, so it is not listed). Register tokens (timm reg_token)
# are prefix tokens like CLS: stem, frozen with it, no decay; timm's fc_norm is the final norm.
_GROUP_RULES = (
    ("stem",
     re.compile(r"^encoder/(patch_embed|cls_token|reg_token|embed_norm|mask_token)(/.+)?$")),
    ("block", re.compile(r"^encoder/blocks_(\d+)/.+$")),
    ("final_norm", re.compile(r"^encoder/(fc_)?norm/(scale|bias)$")),
    # Heads: Dense kernels (no bias) and BatchNorm scale/bias; names, not module names, decide.
    ("head", re.compile(r"^heads/.+/(kernel|bias|scale)$")),
)


def peak_lr(base_lr: float, global_batch_size: int) -> float:
  """Peak LR = base * batch / 256 (the reference's LinearLrScaler, section 7)."""
  return base_lr * global_batch_size / 256


def lr_schedule(peak_lr: float,  # pylint: disable=redefined-outer-name
                warmup_steps: int, total_steps: int,
                end_lr: float = 1e-6) -> Callable[[Any], jax.Array]:
  """Linear warmup then cosine to an absolute `end_lr`; `schedule(s)` is the LR of update s.

  Section 7 ("wupcos_epoch", LR set before update s, 0-based; W warmup, T total updates):
    s <  W: peak * (s + 1) / (W + 1)
    s >= W: peak + (end - peak) * (1 - cos(pi * (s - W) / (T - W))) / 2
  Past the last update (s >= T) the value of update T-1 is held, as kappaschedules does.
  Traceable: `s` may be a jnp integer scalar (e.g. the optimizer's count).
  """
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if total_steps <= warmup_steps:
    raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}): the "
                     "cosine phase needs at least one update")
  w, t = float(warmup_steps), float(total_steps)

  def schedule(step):
    s = jnp.minimum(jnp.asarray(step, jnp.float32), t - 1)
    warm = peak_lr * (s + 1) / (w + 1)
    # The same cosine written as end + (peak - end) * sin^2(pi/2 * (T - s) / (T - W)), which keeps
    # fp32 relative accuracy near the end, where the LR is ~1000x below the peak.
    cosine = end_lr + (peak_lr - end_lr) * jnp.square(jnp.sin(jnp.pi / 2 * (t - s) / (t - w)))
    return jnp.where(s < w, warm, cosine)

  return schedule


def blocks_to_freeze(depth: int, end_percent: float) -> int:
  """Blocks frozen by the reference's VitBlockFreezer(end_percent): int(depth * p), 24*0.25 -> 6."""
  if not 0.0 <= end_percent <= 1.0:
    raise ValueError(f"end_percent must be in [0, 1], got {end_percent}")
  return int(depth * end_percent)


def _path_str(path) -> str:
  """'encoder/blocks_3/attn/qkv/kernel' from a string, a tuple of names or a jax key path."""
  if isinstance(path, str):
    return path
  if all(isinstance(k, str) for k in path):
    return "/".join(path)
  return sharding_lib.path_str(path)

def _match_group(path: str) -> tuple[str, re.Match]:
  matches = [(name, m) for name, rule in _GROUP_RULES if (m := rule.match(path))]
  if len(matches) == 1:
    return matches[0]
  if len(matches) > 1:  # only reachable if the rules above are edited carelessly
    raise ValueError(f"parameter {path!r} matches several optimizer rules: "
                     f"{[name for name, _ in matches]}")
  hint = ""
  if path.startswith("encoder/pos_embed"):
    hint = (" The position table is a frozen buffer: keep it in the 'buffers' collection, not in "
            "params.")
  raise ValueError(
      f"no optimizer rule covers parameter {path!r}.{hint} Known parameters: encoder/"
      "{patch_embed,cls_token,reg_token,embed_norm,mask_token}..., encoder/blocks_<i>/..., "
      "encoder/{norm,fc_norm}/{scale,bias}, heads/<name>/.../{kernel,bias,scale}. Add a rule to "
      "mim_refiner_jax/optim.py (_GROUP_RULES) for new parameters.")


def layer_id(path, depth: int) -> int:
  """Layer index for LLRD: stem 0, blocks_i -> i+1, final norm and heads -> depth+1.

  The LR scale is then decay ** (depth + 1 - layer_id): stem d^(L+1), block i d^(L-i) (the last
  block already gets d), final norm and heads 1 (section 7, layerwise_lr_decay_modifier.py).
  """
  path = _path_str(path)
  group, match = _match_group(path)
  if group == "stem":
    return 0
  if group == "block":
    i = int(match.group(1))
    if i >= depth:
      raise ValueError(f"parameter {path!r} belongs to block {i}, but depth={depth}: pass the "
                       "encoder's depth")
    return i + 1
  return depth + 1


@dataclasses.dataclass(frozen=True)
class _Rules:
  """Per-leaf (lr_scale, weight_decay, trainable), computed from the path and ndim alone."""
  depth: int
  layer_decay: float | None
  encoder_wd: float
  head_wd: float
  frozen_blocks: int
  freeze_encoder: bool

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f"depth must be >= 1, got {self.depth}")
    if not 0 <= self.frozen_blocks <= self.depth:
      raise ValueError(f"frozen_blocks must be in [0, depth={self.depth}], "
                       f"got {self.frozen_blocks}")
    if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
      raise ValueError(f"layer_decay must be in (0, 1] or None, got {self.layer_decay}")
    if self.encoder_wd < 0 or self.head_wd < 0:
      raise ValueError(f"weight decays must be >= 0, got encoder_wd={self.encoder_wd}, "
                       f"head_wd={self.head_wd}")

  def __call__(self, path: str, ndim: int) -> tuple[float, float, bool]:
    lid = layer_id(path, self.depth)
    is_encoder = path.startswith("encoder/")
    # Freezing (section 7): stage 2 freezes the whole encoder. VitBlockFreezer freezes blocks
    # 0..n-1, patch_embed and the CLS token (and the pos buffer); not embed_norm, mask_token or the
    # final norm (freeze_last_norm=False).
    frozen = is_encoder and bool(
        self.freeze_encoder
        or (self.frozen_blocks > 0 and 1 <= lid <= self.frozen_blocks)
        or (self.frozen_blocks > 0
            and re.match(r"^encoder/(patch_embed|cls_token|reg_token)(/|$)", path)))
    if frozen:  # never updated, never decayed
      return 0.0, 0.0, False
    scale = 1.0
    if self.layer_decay is not None and self.layer_decay != 1.0:
      scale = float(self.layer_decay ** (self.depth + 1 - lid))
    # No decay on biases, ndim <= 1 params (LN/BN scales) and the CLS token; the patch conv kernel
    # and mask_token are decayed (section 7, "Weight decay").
    name = path.rsplit("/", 1)[-1]
    if name == "bias" or ndim <= 1 or path in ("encoder/cls_token", "encoder/reg_token"):
      wd = 0.0
    else:
      wd = self.encoder_wd if is_encoder else self.head_wd
    return scale, float(wd), True


def _check_blocks(params, depth: int):
  """The params must hold exactly blocks 0..depth-1, or LLRD would be silently wrong."""
  encoder = params.get("encoder", {}) if hasattr(params, "get") else {}
  found = sorted(int(k[len("blocks_"):]) for k in encoder if re.fullmatch(r"blocks_\d+", str(k)))
  if found and found != list(range(depth)):
    raise ValueError(f"the encoder params hold blocks {found[0]}..{found[-1]} ({len(found)} blocks)"
                     f" but depth={depth}: pass the encoder's depth")


def param_groups(params, *, depth: int, layer_decay: float | None = 0.65, encoder_wd: float = 0.05,
                 head_wd: float = 1e-5, frozen_blocks: int = 0, freeze_encoder: bool = False):
  """Per-leaf hyperparameters, three trees shaped like `params` (arrays or ShapeDtypeStructs).

  Returns `(lr_scale, weight_decay, trainable)`: float, float and bool leaves. Frozen leaves have
  lr_scale 0 and weight_decay 0 (they are never updated). Raises ValueError for a parameter no rule
  covers.
  """
  rules = _Rules(depth, layer_decay, encoder_wd, head_wd, frozen_blocks, freeze_encoder)
  _check_blocks(params, depth)
  table = jax.tree_util.tree_map_with_path(
      lambda path, x: rules(_path_str(path), len(x.shape)), params)
  is_entry = lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], bool)
  return tuple(jax.tree.map(lambda e, i=i: e[i], table, is_leaf=is_entry) for i in range(3))


def _scale_and_decay(rules: _Rules) -> optax.GradientTransformation:
  """u <- lr_scale * (u + wd * p): the group LR scale and decoupled decay of torch AdamW."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("this optimizer applies weight decay and needs the params: call "
                       "tx.update(grads, opt_state, params)")

    def leaf(path, u, p):
      scale, wd, _ = rules(_path_str(path), p.ndim)
      if wd:
        u = u + wd * p
      return u if scale == 1.0 else u * scale

    return jax.tree_util.tree_map_with_path(leaf, updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(params, *, base_lr: float, global_batch_size: int, warmup_steps: int,
                   total_steps: int, end_lr: float = 1e-6, depth: int,
                   layer_decay: float | None = 0.65, encoder_wd: float = 0.05,
                   head_wd: float = 1e-5, frozen_blocks: int = 0, freeze_encoder: bool = False,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8):
  """AdamW of section 7. Returns `(tx, lr_fn)`; `lr_fn(step)` is the schedule before lr_scale.

  `params` (arrays or ShapeDtypeStructs) is only used to check that every parameter is covered by
  a rule; `tx` works on any tree with the same paths. Defaults are the stage-3 values (encoder wd
  0.05, head wd 1e-5, LLRD 0.65); layer_decay None or 1.0 disables LLRD. No clipping, no
  accumulation (section 7).
  """
  rules = _Rules(depth, layer_decay, encoder_wd, head_wd, frozen_blocks, freeze_encoder)
  param_groups(params, depth=depth, layer_decay=layer_decay, encoder_wd=encoder_wd,
               head_wd=head_wd, frozen_blocks=frozen_blocks, freeze_encoder=freeze_encoder)
  lr_fn = lr_schedule(peak_lr(base_lr, global_batch_size), warmup_steps, total_steps, end_lr)

  def labels(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: "trainable" if rules(_path_str(path), len(x.shape))[2] else "frozen", tree)

  tx = optax.chain(
      optax.partition({"trainable": optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       "frozen": optax.set_to_zero()}, labels),
      _scale_and_decay(rules),
      optax.scale_by_learning_rate(lr_fn),
  )
  if freeze_encoder:
    tx = _heads_only(tx)
  return tx, lr_fn


def optimized_params(params, freeze_encoder: bool):
  """The subtree the optimizer works on: `{"heads": ...}` in stage 2, else all params."""
  return {"heads": params["heads"]} if freeze_encoder else params


def _heads_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Stage 2: `inner` sees only `{"heads": ...}`, so no encoder-sized gradient, update or state
  exists (the paths keep their "heads/" prefix for the rules above). `init` and `update` accept
  the full params and pick the heads; the gradients must be the heads subtree."""

  def init_fn(params):
    return inner.init(optimized_params(params, True))

  def update_fn(updates, state, params=None):
    if set(updates) != {"heads"}:
      raise ValueError(f"the stage-2 optimizer updates the heads only; got gradients for "
                       f"{sorted(updates)}: differentiate optim.optimized_params(params, True)")
    if params is not None:
      params = optimized_params(params, True)
    return inner.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def optimizer_step(opt_state) -> jax.Array:
  """Number of updates applied so far (the schedule's count): the 0-based index of the next one."""
  return opt_state[2].count


def ema_update(ema_params, params, decay: float = 0.9999):
  """ema <- decay * ema + (1 - decay) * params, in fp32 (section 7 "EMA"; incremental_update)."""
  to32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  return optax.incremental_update(to32(params), to32(ema_params), step_size=1.0 - decay)

