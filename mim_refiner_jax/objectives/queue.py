"""Nearest-neighbour queue of an ID head as plain arrays (refiner_facts.md section 5).

A queue is a dict of arrays, a regular part of the train state (checkpointed, sharded by rules):
  x     [Q, d] float32  un-normalised projector outputs of global view 0, randn at init
  idx   [Q]    int32    dataset index of each entry; -1 at init (matches no dataset index)
  label [Q]    int32    class label of each entry (only for the nn-accuracy metric); -1 at init
  age   [Q]    int32    steps-worth of samples since the entry was written (a metric)
  ptr   []     int32    next write position (FIFO)

The queue is sharded along Q over the mesh axes `axes` (all devices by default). Retrieval and
enqueue run per shard inside `jax.shard_map`, so the queue never moves between devices: each
device scores the (small, gathered) batch rows against its own Q/D entries, keeps its top-k, and
only the k candidates per row are all-gathered and merged. Every device then knows the chosen
entry of every row; the owner contributes the entry and a psum delivers it (one [N, d] reduce).
Ties are broken towards the lower queue position both per shard and in the merge, so the result
does not depend on the number of shards.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

QUEUE_AXES = ("data", "fsdp")
_NORM_EPS = 1e-12  # torch F.normalize default


def normalize(x: jax.Array) -> jax.Array:
  """`x / max(||x||, 1e-12)` along the last axis, like torch's F.normalize."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def init_queue(key: jax.Array, size: int, dim: int) -> dict:
  """A fresh queue: x ~ N(0, 1) as in the reference (section 4 "Init"), no valid entries."""
  return {
      "x": jax.random.normal(key, (size, dim), jnp.float32),
      "idx": jnp.full((size,), -1, jnp.int32),
      "label": jnp.full((size,), -1, jnp.int32),
      "age": jnp.zeros((size,), jnp.int32),
      "ptr": jnp.zeros((), jnp.int32),
  }


def _check_shards(mesh, axes, size):
  shards = 1
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"queue axis {a!r} is not an axis of the mesh {dict(mesh.shape)}")
    shards *= mesh.shape[a]
  if size % shards:
    raise ValueError(f"queue size {size} must be divisible by the {shards} devices along {axes}; "
                     "pick a queue size that is a multiple of the device count")
  return shards


def retrieve(queue: dict, z: jax.Array, index: jax.Array, *, topk: int, key: jax.Array,
             mesh: jax.sharding.Mesh, label: jax.Array | None = None,
             sim_dtype=jnp.bfloat16, axes: Sequence[str] = QUEUE_AXES,
             return_positions: bool = False):
  """Nearest neighbours of the rows `z` in the queue.

  Args:
    queue: queue dict (see module docstring), `x` sharded along Q over `axes` (or replicated).
    z: `[..., d]` anchor rows of the global batch, e.g. `[2, B, d]` (both global views).
      Treated as constant; gathered onto every device (small), the queue stays put.
    index: `[...]` dataset index of each row; entries with the same index are never retrieved
      (their similarity is set to -1, section 5 step 2).
    topk: 1 = arg-max (stage 2); k > 1 = uniform random choice among the top-k, per row (stage 3).
    key: PRNG key for the random choice (unused for topk=1).
    mesh: the mesh the queue is sharded on.
    label: optional `[...]` labels of the rows, for the nn-accuracy metric.
    sim_dtype: dtype of the similarity matmul; the reference runs it in bf16 (section 1.5).
    axes: mesh axes the queue's first axis is sharded over.
    return_positions: also return the `[...]` queue positions of the neighbours (for tests).

  Returns:
    `(nn, metrics)`: `nn` `[..., d]` float32 the un-normalised queue entries (replicated), and
    scalar metrics `nn_similarity` (mean cosine of row and neighbour), `nn_age` (mean age of the
    retrieved entries) and, when `label` is given, `nn_accuracy` (stored label == row label).
  """
  axes = tuple(axes)
  size, dim = queue["x"].shape
  lead = z.shape[:-1]
  if z.ndim < 2 or z.shape[-1] != dim or index.shape != lead:
    raise ValueError(f"retrieve expects z [..., {dim}] and index [...] with the same leading "
                     f"shape, got {z.shape}, {index.shape}")
  n = int(np.prod(lead))
  if not 1 <= topk <= size:
    raise ValueError(f"topk must be in [1, queue size {size}], got {topk}")
  shards = _check_shards(mesh, axes, size)
  local_size = size // shards
  local_k = min(topk, local_size)  # shards * local_k >= topk, so the merge sees the global top-k
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  has_label = label is not None
  if not has_label:
    label = jnp.full(lead, -1, jnp.int32)

  def per_shard(qx, qidx, qlabel, qage, z, index, key):
    z, index = z.reshape(n, dim), index.reshape(n)  # rows of the whole (gathered) batch
    shard = jax.lax.axis_index(axes)
    offset = shard * local_size
    sim = jnp.dot(normalize(z).astype(sim_dtype), normalize(qx).astype(sim_dtype).T,
                  preferred_element_type=sim_dtype)
    # Selection runs on the matmul's (sim_dtype) values widened to f32: the cast is exact and
    # order-preserving, so neighbours and ties are those of a top-k in sim_dtype, but XLA:CPU's
    # bf16 top_k is ~60x slower than its f32 one ([128, 65536]: 1.8 s vs 0.03 s).
    sim = sim.astype(jnp.float32)
    sim = jnp.where(index[:, None] == qidx[None, :], -1, sim)       # [n, Q / shards] f32
    vals, pos = jax.lax.top_k(sim, local_k)                       # [n, local_k], ties -> lower pos
    cand_vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)  # [n, shards * local_k]
    cand_idx = jax.lax.all_gather(pos + offset, axes, axis=1, tiled=True)
    _, best = jax.lax.top_k(cand_vals, topk)  # candidates are in queue order: same tie-breaking
    top_idx = jnp.take_along_axis(cand_idx, best, axis=1)         # [n, topk] global positions
    if topk == 1:
      nn_idx = top_idx[:, 0]
    else:
      choice = jax.random.randint(key, (n,), 0, topk)
      nn_idx = jnp.take_along_axis(top_idx, choice[:, None], axis=1)[:, 0]
    # Fetch the chosen entries from their owners: exactly one shard contributes each row.
    local = nn_idx - offset
    mine = (local >= 0) & (local < local_size)
    local = jnp.clip(local, 0, local_size - 1)
    nn_x = jax.lax.psum(jnp.where(mine[:, None], qx[local], 0.0), axes)
    nn_age = jax.lax.psum(jnp.where(mine, qage[local], 0), axes)
    nn_label = jax.lax.psum(jnp.where(mine, qlabel[local], 0), axes)
    nn_idx = jax.lax.psum(jnp.where(mine, nn_idx, 0), axes)  # same value, typed as replicated
    return nn_x, nn_age, nn_label, nn_idx

  qspec = P(axes)
  nn_x, nn_age, nn_label, nn_idx = jax.shard_map(
      per_shard, mesh=mesh, in_specs=(qspec, qspec, qspec, qspec, P(), P(), P()),
      out_specs=(P(), P(), P(), P()))(queue["x"], queue["idx"], queue["label"], queue["age"], z,
                                 index, key)
  nn_x, nn_age, nn_label, nn_idx = (a.reshape(lead + a.shape[1:])
                                    for a in (nn_x, nn_age, nn_label, nn_idx))
  metrics = {
      "nn_similarity": jnp.mean(jnp.sum(normalize(z) * normalize(nn_x), axis=-1)),
      "nn_age": jnp.mean(nn_age.astype(jnp.float32)),
      "nn_accuracy": jnp.mean((nn_label == label).astype(jnp.float32)),
  }
  if not has_label:
    del metrics["nn_accuracy"]
  if return_positions:
    return nn_x, metrics, nn_idx
  return nn_x, metrics


def enqueue(queue: dict, z: jax.Array, index: jax.Array, label: jax.Array | None = None, *,
            mesh: jax.sharding.Mesh, axes: Sequence[str] = QUEUE_AXES) -> dict:
  """FIFO write of `z` `[n, d]` (global view 0 of the whole global batch) at `ptr`, wrapping.

  New entries get age 0, then every entry ages by n and ptr <- (ptr + n) % Q, exactly as the
  reference (section 5 "Enqueue"): a fresh entry reads age n at the next retrieval. Each shard
  writes only the positions it owns (out-of-shard positions are dropped), so nothing is gathered.
  """
  axes = tuple(axes)
  size, dim = queue["x"].shape
  n = z.shape[0]
  if z.shape != (n, dim) or index.shape != (n,):
    raise ValueError(f"enqueue expects z [n, {dim}] and index [n], got {z.shape}, {index.shape}")
  if n > size:
    raise ValueError(f"cannot enqueue {n} rows into a queue of size {size}; use a queue at least "
                     "as large as the global batch")
  shards = _check_shards(mesh, axes, size)
  local_size = size // shards
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  if label is None:
    label = jnp.full((n,), -1, jnp.int32)

  def per_shard(qx, qidx, qlabel, qage, ptr, z, index, label):
    offset = jax.lax.axis_index(axes) * local_size
    pos = (ptr + jnp.arange(n, dtype=jnp.int32)) % size - offset
    pos = jnp.where((pos >= 0) & (pos < local_size), pos, local_size)  # not ours -> dropped
    qx = qx.at[pos].set(z, mode="drop")
    qidx = qidx.at[pos].set(index.astype(jnp.int32), mode="drop")
    qlabel = qlabel.at[pos].set(label.astype(jnp.int32), mode="drop")
    qage = qage.at[pos].set(0, mode="drop") + n
    return qx, qidx, qlabel, qage

  qspec = P(axes)
  x, idx, lab, age = jax.shard_map(
      per_shard, mesh=mesh, in_specs=(qspec, qspec, qspec, qspec, P(), P(), P(), P()),
      out_specs=(qspec, qspec, qspec, qspec))(queue["x"], queue["idx"], queue["label"],
                                              queue["age"], queue["ptr"], z, index, label)
  ptr = ((queue["ptr"] + n) % size).astype(jnp.int32)
  return {"x": x, "idx": idx, "label": lab, "age": age, "ptr": ptr}
