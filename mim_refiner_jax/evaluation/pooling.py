"""Feature keys and the poolings they name (refiner_facts.md sections 2, 10; beyond_cls_facts 1-2).

A feature key is `[WHERE_]POOLING`:
  WHERE    ""          the main output: after the final LayerNorm for pre-norm models (the probe's
                       "last 1", section 10.2), the last block's output for post-norm ones;
           "block{i}_" the raw residual stream after block i (0-based, no norm). The paper's k-NN
                       reads the last block this way ("block{depth-1}_cls", section 10.1);
           "last{n}_"  the last n blocks, raw, concatenated in block order (needs the depth).
  POOLING  "cls"             the CLS token                                        [D]
           "patch_mean"      the mean of the patch tokens                         [D]
           "cls_patch_mean"  CLS || mean patch                                    [2D]
           "cls_patch_mean_dinov2"  as cls_patch_mean for one block; see below
           "patch_tokens"    the patch tokens themselves, for the selective-      [T, D]
                             aggregation probe (no CLS; beyond_cls_facts 1-2 read the last
                             block without the final norm: "block{depth-1}_patch_tokens")
           "registers"       the mean of the register tokens (models with      [D]
                             `reg_tokens`, for analysis; never part of "patch_mean")
Tokens are laid out `[CLS?, registers, patches]` (`layout` = (CLS count, register count), models/
vit.py); "cls" on a model without CLS token is an error naming the fix. For the main output, the
ViT's own pooled features are used where it returns them (after timm's `fc_norm`, if any).
For "last{n}_": "cls" concatenates n CLS tokens ("last4_cls", section 10.1), "patch_mean" n mean
patch tokens, and "cls_patch_mean" is the reference's probe input (section 10.2): its
`vit_block_extractor` concatenates the raw block outputs along channels ([B, T, nD],
`concat_finalizer(dim=-1)`), then `ConcatClassAverage` pools: the n CLS tokens, then the n mean
patch tokens [2nD]. "cls_patch_mean_dinov2" is DINOv2's `create_linear_input`: the n CLS tokens,
then the mean patch token of the last block only [(n+1)D].
"patch_tokens" cannot be concatenated over blocks.
"""

import functools
import re
from typing import Mapping, Sequence

import jax.numpy as jnp

POOLINGS = ("cls", "patch_mean", "cls_patch_mean", "cls_patch_mean_dinov2", "patch_tokens",
            "registers")
_KEY = re.compile(r"(?:(block)(\d+)_|(last)(\d+)_)?(" + "|".join(POOLINGS) + r")")
_HELP = ("use [block{i}_|last{n}_](" + "|".join(POOLINGS) + "), e.g. 'cls', 'block11_cls', "
         "'last4_cls', 'cls_patch_mean', 'block11_patch_tokens'")


def parse_key(key: str, depth: int | None = None) -> tuple[str, tuple[int, ...] | None]:
  """`key` -> (pooling, blocks); blocks None means the main output."""
  match = _KEY.fullmatch(key)
  if not match:
    raise ValueError(f"unknown feature key {key!r}; {_HELP}")
  block, index, last, count, pooling = match.groups()
  if block:
    i = int(index)
    if depth is not None and i >= depth:
      raise ValueError(f"feature key {key!r}: block {i} does not exist in a ViT of depth {depth}")
    return pooling, (i,)
  if last:
    n = int(count)
    if depth is None:
      raise ValueError(f"feature key {key!r} needs the model depth: pass depth=...")
    if not 1 <= n <= depth:
      raise ValueError(f"feature key {key!r}: cannot take the last {n} of {depth} blocks")
    if pooling == "patch_tokens" and n > 1:
      raise ValueError(f"feature key {key!r}: patch tokens of several blocks cannot be "
                       "concatenated; use block{i}_patch_tokens")
    return pooling, tuple(range(depth - n, depth))
  return pooling, None


def key_blocks(keys: Sequence[str], depth: int | None = None) -> tuple[int, ...]:
  """The block indices whose outputs the keys read."""
  blocks = set()
  for key in keys:
    blocks.update(parse_key(key, depth)[1] or ())
  return tuple(sorted(blocks))


def pool(tokens: jnp.ndarray, pooling: str, layout: tuple[int, int] = (1, 0)) -> jnp.ndarray:
  """`[B, c + r + T, D]` tokens (`layout` = (c, r): CLS count, register count) -> the pooled
  features."""
  c, r = layout
  if pooling.startswith("cls") and not c:
    raise ValueError(f"pooling {pooling!r} on a ViT without a CLS token (class_token=False): "
                     "use 'patch_mean'")
  if pooling == "registers":
    if not r:
      raise ValueError("pooling 'registers' on a ViT without register tokens")
    return tokens[:, c:c + r].mean(axis=1)
  cls, patches = tokens[:, 0], tokens[:, c + r:]
  if pooling == "cls":
    return cls
  if pooling == "patch_mean":
    return patches.mean(axis=1)
  if pooling in ("cls_patch_mean", "cls_patch_mean_dinov2"):
    return jnp.concatenate([cls, patches.mean(axis=1)], axis=-1)
  if pooling == "patch_tokens":
    return patches
  raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def pooled_features(keys: Sequence[str], main_tokens, block_tokens: Mapping[int, jnp.ndarray],
                    depth: int | None = None, layout: tuple[int, int] = (1, 0),
                    main_pooled: Mapping[str, jnp.ndarray] | None = None) -> dict:
  """{key: float32 features} from the main output and the raw outputs of the blocks keys read.

  `main_pooled`: the ViT's own pooled main output ({"cls", "patch_mean", "registers"}: after
  fc_norm where the model has one), preferred to pooling `main_tokens`."""
  main_pooled = main_pooled or {}
  pool_at = functools.partial(pool, layout=layout)
  out = {}
  for key in keys:
    pooling, blocks = parse_key(key, depth)
    if blocks is None and pooling in main_pooled:
      out[key] = main_pooled[pooling]
    elif blocks is None and pooling == "cls_patch_mean" and "patch_mean" in main_pooled:
      out[key] = jnp.concatenate([main_pooled["cls"] if "cls" in main_pooled
                                  else pool_at(main_tokens, "cls"), main_pooled["patch_mean"]], -1)
    elif blocks is None:
      out[key] = pool_at(main_tokens, pooling)
    else:
      missing = [i for i in blocks if i not in block_tokens]
      if missing:
        raise ValueError(f"feature key {key!r} needs the outputs of blocks {missing}")
      if pooling == "cls_patch_mean":  # the reference's: n CLS, then n mean patch (module doc)
        parts = ([pool_at(block_tokens[i], "cls") for i in blocks]
                 + [pool_at(block_tokens[i], "patch_mean") for i in blocks])
      elif pooling == "cls_patch_mean_dinov2":  # DINOv2's last-n input (module doc)
        parts = [pool_at(block_tokens[i], "cls") for i in blocks]
        parts.append(pool_at(block_tokens[blocks[-1]], "patch_mean"))
      else:
        parts = [pool_at(block_tokens[i], pooling) for i in blocks]
      out[key] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    out[key] = out[key].astype(jnp.float32)
  return out
