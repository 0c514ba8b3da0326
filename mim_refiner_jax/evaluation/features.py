"""Features of any blocks / poolings over a padded eval loader, on a mesh of any size.

Feature keys are those of `pooling.py`: `[block{i}_|last{n}_](cls|patch_mean|cls_patch_mean|
patch_tokens)`; without a prefix they read the main output (after the final LayerNorm for pre-norm
models, section 10.2 "last 1"); "block{i}_*" and "last{n}_*" read raw block outputs (section 10.1:
the paper's k-NN uses "block{depth-1}_cls").

`apply_fn(variables, images)` returns `(out, aux)` as `ViT.apply` does. `encoder_apply_fn(encoder,
keys)` builds one that also returns the full token outputs of the blocks the keys read (needed for
"patch_tokens" and "cls_patch_mean" of a block); `functools.partial(model.apply,
blocks=feature_blocks(keys, depth))` still works for the cls / patch_mean keys. The jitted feature
function is cached per (apply_fn, keys, depth, mesh): pass the same apply_fn object again to reuse
the compiled function (encoder_apply_fn returns the same object for equal arguments).

The loader yields per-host batches {"image": [b,H,W,3] float32, "label": [b], "index": [b],
"mask": [b] bool} where mask is False on padding rows (`make_eval_loader`; "label", "index" and
"mask" are optional); every host runs the same number of batches (ENGINEERING.md item 11).
Batches become global arrays sharded on the batch axis; features come back replicated (so every
process gets all rows) and padding rows are dropped, so every example appears exactly once for
any device count. `dataset_features.dataset_features` wraps this for a source config + eval transform.
"""

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_refiner_jax.evaluation import pooling
from mim_refiner_jax.evaluation.progress import progress_bar

_PER_ROW = ("label", "index")  # per-row batch entries carried along with the features


EXTRA_PREFIX = "head/"  # keys that apply_fn computes itself, returned in aux["extra"]


def feature_blocks(feature_keys: Sequence[str], depth: int | None = None) -> tuple[int, ...]:
  """The block indices whose intermediates the keys read (pass as `blocks=` to `ViT.apply`)."""
  return pooling.key_blocks([k for k in feature_keys if not k.startswith(EXTRA_PREFIX)], depth)


@functools.lru_cache(maxsize=32)
def token_layout(encoder) -> tuple[int, int]:
  """(CLS count, register count) of a ViT's tokens (pooling.pool's `layout`)."""
  return int(getattr(encoder, "class_token", True)), int(getattr(encoder, "reg_tokens", 0))


def encoder_apply_fn(encoder, feature_keys: tuple[str, ...]):
  """`(variables, images) -> (out, aux)` with aux["block_tokens"] = {i: [B, 1+T, D]} for the
  blocks the keys read, captured from the ViT's blocks (jit drops every other intermediate)."""
  blocks = feature_blocks(feature_keys, encoder.depth)
  names = {f"blocks_{i}": i for i in blocks}

  def apply(variables, images):
    (out, aux), state = encoder.apply(
        variables, images, blocks=blocks, mutable=["intermediates"],
        capture_intermediates=lambda module, method: method == "__call__" and module.name in names)
    captured = state["intermediates"]
    return out, dict(aux, block_tokens={i: captured[n]["__call__"][0] for n, i in names.items()},
                     token_layout=token_layout(encoder))

  return apply


def select_features(out, aux: dict, feature_keys: Sequence[str], depth: int | None = None) -> dict:
  """Pools the features named by `feature_keys` (float32) from a ViT's `(out, aux)`; keys
  starting with "head/" are taken as they are from aux["extra"] (e.g. the monitor's head
  outputs)."""
  extra = {k: aux["extra"][k].astype(jnp.float32) for k in feature_keys
           if k.startswith(EXTRA_PREFIX)}
  feature_keys = [k for k in feature_keys if not k.startswith(EXTRA_PREFIX)]
  main_pooled = {k: aux[k] for k in pooling.POOLINGS if k in aux}
  if "block_tokens" in aux:
    block_tokens, layout = aux["block_tokens"], aux.get("token_layout", (1, 0))
  else:  # plain ViT.apply: pooled tokens per block only. [B, c + r + 1, D] pseudo tokens
    # (CLS?, mean register?, mean patch) serve cls / patch_mean / cls_patch_mean / registers.
    block_tokens = {}
    for i in aux.get("block_patch_mean", {}):
      rows = [aux[f"block_{p}"][i] for p in ("cls", "registers", "patch_mean")
              if i in aux.get(f"block_{p}", {})]
      block_tokens[i] = jnp.stack(rows, axis=1)
    layout = (int(bool(aux.get("block_cls"))), int("block_registers" in aux))
    for key in feature_keys:
      pool_name, blocks = pooling.parse_key(key, depth)
      missing = [i for i in blocks or () if i not in block_tokens]
      if missing:
        raise ValueError(f"feature key {key!r} needs blocks {missing}, which apply_fn did not "
                         f"return; apply the model with blocks=feature_blocks(keys, depth) or "
                         "use encoder_apply_fn")
      if blocks is not None and pool_name == "patch_tokens":
        raise ValueError(f"feature key {key!r} needs the block's tokens: build apply_fn with "
                         "features.encoder_apply_fn(encoder, keys)")
  return {**pooling.pooled_features(feature_keys, out, block_tokens, depth, layout, main_pooled),
          **extra}


@functools.lru_cache(maxsize=16)
def _feature_fn(apply_fn, feature_keys: tuple[str, ...], depth, mesh):
  def features(variables, images, per_row, mask):
    out, aux = apply_fn(variables, images)
    return select_features(out, aux, feature_keys, depth), per_row, mask

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


def _pad_rows(tree, pad: int):
  """`pad` zero rows appended to every array of `tree` (mask rows False: they are dropped)."""
  zeros = lambda a: np.zeros((pad,) + a.shape[1:], a.dtype)
  return jax.tree.map(lambda a: np.concatenate([a, zeros(a)]), tree)


def extract_features(apply_fn: Callable[[Any, jax.Array], tuple[Any, dict]], variables,
                     batches: Iterable[dict], *, feature_keys: Sequence[str],
                     depth: int | None = None, mesh=None, progress: str | None = None,
                     num_batches: int | None = None) -> dict[str, np.ndarray]:
  """Runs `apply_fn` over `batches`: `{key: [N, D] float32, "label": [N], "index": [N]}`.

  Rows with mask False are dropped; "label" and "index" (dataset index) are returned when the
  batches carry them. Every process returns all N rows, in global batch order (batch by batch,
  process by process), which with several hosts is not dataset order: use "index" to reorder.
  `depth` is needed for the "last{n}_*" keys. `progress` (a description) shows a progress bar
  on process 0 (tqdm) over `num_batches`.
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
  bar = progress_bar(num_batches, progress) if progress else None
  for batch in batches:
    images = np.asarray(jax.device_get(batch["image"]), np.float32)
    b = len(images)
    if per_row_keys is None:
      per_row_keys = tuple(key for key in _PER_ROW if key in batch)
    per_row = {key: np.asarray(batch[key], np.int32) for key in per_row_keys}
    mask = np.asarray(batch.get("mask", np.ones(b, bool)), bool)
    for key, values in {**per_row, "mask": mask}.items():
      if values.shape != (b,):
        raise ValueError(f"batch {key!r} must have shape ({b},) like the images, got "
                         f"{values.shape}")
    if b % local_devices:  # e.g. the k-NN monitor's 500 rows on 8 devices: 4 masked rows more
      images, per_row, mask = _pad_rows((images, per_row, mask), -b % local_devices)
    to_global = functools.partial(jax.make_array_from_process_local_data, batch_sharding)
    outputs = fn(variables, to_global(images), jax.tree.map(to_global, per_row), to_global(mask))
    if pending is not None:  # fetch the previous batch while this one computes
      consume(pending)
    pending = outputs
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if pending is None:
    raise ValueError("the eval loader yielded no batches")
  consume(pending)

  return {key: np.concatenate(collected[key]) for key in feature_keys + per_row_keys}
