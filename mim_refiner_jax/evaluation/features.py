"""Features of any block / pooling over a padded eval loader, on a mesh of any size.

Feature keys (../shared/reference/refiner_facts.md sections 2 and 10):
  "cls", "patch_mean"        CLS / mean patch token of the main output: after the final LayerNorm
                             for pre-norm models (probe "last 1", section 10.2);
  "block{i}_cls",            raw residual stream of block i (0-based, no norm). The paper's k-NN
  "block{i}_patch_mean"      uses the last block without the final LN: "block{depth-1}_cls";
  "last{n}_cls",             the CLS (or mean patch) tokens of the last n blocks, concatenated in
  "last{n}_patch_mean"       block order ("last4_cls", section 10.1); needs `depth`.

`apply_fn(variables, images)` returns `(out, aux)` as `ViT.apply` does; it must compute the blocks
the keys need, e.g. `functools.partial(model.apply, blocks=feature_blocks(keys, model.depth))`.
The jitted feature function is cached per (apply_fn, keys, depth, mesh): pass the same apply_fn
object again to reuse the compiled function.

The loader yields per-host batches {"image": [b,H,W,3] float32, "label": [b], "index": [b],
"mask": [b] bool} where mask is False on padding rows (`make_eval_loader`; "label", "index" and
"mask" are optional); every host runs the same number of batches (ENGINEERING.md item 11).
Batches become global arrays sharded on the batch axis; features come back replicated (so every
process gets all rows) and padding rows are dropped.
"""

import functools
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_PER_ROW = ("label", "index")  # per-row batch entries carried along with the features
_KEY = re.compile(r"(?:(block)(\d+)_|(last)(\d+)_)?(cls|patch_mean)")


def _parse(key: str, depth: int | None) -> tuple[str, tuple[int, ...] | None]:
  """`key` -> (pooling, blocks); blocks None means the main output."""
  match = _KEY.fullmatch(key)
  if not match:
    raise ValueError(f"unknown feature key {key!r}; use 'cls', 'patch_mean', 'block{{i}}_cls', "
                     "'block{i}_patch_mean', 'last{n}_cls' or 'last{n}_patch_mean'")
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
    return pooling, tuple(range(depth - n, depth))
  return pooling, None


def feature_blocks(feature_keys: Sequence[str], depth: int | None = None) -> tuple[int, ...]:
  """The block indices whose intermediates the keys read (pass as `blocks=` to `ViT.apply`)."""
  blocks = set()
  for key in feature_keys:
    blocks.update(_parse(key, depth)[1] or ())
  return tuple(sorted(blocks))


def select_features(aux: dict, feature_keys: Sequence[str], depth: int | None = None) -> dict:
  """Picks the features named by `feature_keys` out of the ViT's `aux` dict (as float32)."""
  out = {}
  for key in feature_keys:
    pooling, blocks = _parse(key, depth)
    if blocks is None:
      out[key] = aux[pooling].astype(jnp.float32)
      continue
    per_block = aux[f"block_{pooling}"]
    missing = [i for i in blocks if i not in per_block]
    if missing:
      raise ValueError(f"feature key {key!r} needs blocks {missing}, which apply_fn did not "
                       f"return; apply the model with blocks=feature_blocks(keys, depth)")
    out[key] = jnp.concatenate([per_block[i] for i in blocks], axis=-1).astype(jnp.float32)
  return out


@functools.lru_cache(maxsize=16)
def _feature_fn(apply_fn, feature_keys: tuple[str, ...], depth, mesh):
  def features(variables, images, per_row, mask):
    _, aux = apply_fn(variables, images)
    return select_features(aux, feature_keys, depth), per_row, mask

  # Replicated outputs: XLA gathers the (small) features so each process can read every row.
  return jax.jit(features, out_shardings=NamedSharding(mesh, P()))


def _on_mesh(variables, mesh):
  """Leaves already placed on exactly this mesh's devices stay (e.g. FSDP); others replicate."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, variables)


def _fetch(x: jax.Array) -> np.ndarray:
  # Replicated: one local copy is the whole array. device_get is an explicit transfer, allowed
  # under jax_transfer_guard='disallow' (ENGINEERING.md item 17).
  return np.asarray(jax.device_get(x.addressable_data(0)))


def extract_features(apply_fn: Callable[[Any, jax.Array], tuple[Any, dict]], variables,
                     batches: Iterable[dict], *, feature_keys: Sequence[str],
                     depth: int | None = None, mesh=None) -> dict[str, np.ndarray]:
  """Runs `apply_fn` over `batches`: `{key: [N, D] float32, "label": [N], "index": [N]}`.

  Rows with mask False are dropped; "label" and "index" (dataset index) are returned when the
  batches carry them. Every process returns all N rows, in global batch order (batch by batch,
  process by process), which with several hosts is not dataset order: use "index" to reorder.
  `depth` is needed for the "last{n}_*" keys.
  """
  feature_keys = tuple(feature_keys)
  if not feature_keys:
    raise ValueError("feature_keys is empty; e.g. feature_keys=('block11_cls',)")
  if set(feature_keys) & set(_PER_ROW):
    raise ValueError(f"{_PER_ROW} are not feature keys (they are returned when present)")
  feature_blocks(feature_keys, depth)  # validate the keys before compiling anything
  mesh = mesh or jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  fn = _feature_fn(apply_fn, feature_keys, depth, mesh)
  variables = _on_mesh(variables, mesh)

  collected = {key: [] for key in feature_keys + _PER_ROW}
  per_row_keys = None

  def consume(outputs):
    feats, per_row, mask = jax.tree.map(_fetch, outputs)
    keep = mask.astype(bool)
    for key in feature_keys:
      collected[key].append(feats[key][keep])
    for key, values in per_row.items():
      collected[key].append(values[keep])

  pending = None
  for batch in batches:
    images = np.asarray(jax.device_get(batch["image"]), np.float32)
    b = len(images)
    if b % local_devices:
      raise ValueError(f"per-host batch of {b} rows does not divide over the {local_devices} "
                       "local devices; pad the eval batches to a multiple (make_eval_loader)")
    if per_row_keys is None:
      per_row_keys = tuple(key for key in _PER_ROW if key in batch)
    per_row = {key: np.asarray(batch[key], np.int32) for key in per_row_keys}
    mask = np.asarray(batch.get("mask", np.ones(b, bool)), bool)
    for key, values in {**per_row, "mask": mask}.items():
      if values.shape != (b,):
        raise ValueError(f"batch {key!r} must have shape ({b},) like the images, got "
                         f"{values.shape}")
    to_global = functools.partial(jax.make_array_from_process_local_data, batch_sharding)
    outputs = fn(variables, to_global(images), jax.tree.map(to_global, per_row), to_global(mask))
    if pending is not None:  # fetch the previous batch while this one computes
      consume(pending)
    pending = outputs
  if pending is None:
    raise ValueError("the eval loader yielded no batches")
  consume(pending)

  return {key: np.concatenate(collected[key]) for key in feature_keys + per_row_keys}
