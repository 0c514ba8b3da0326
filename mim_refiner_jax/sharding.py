"""Mesh, sharding rules and global batches (big_vision manner; ENGINEERING.md sections 1.2-1.3, 2).

The mesh has two axes, ("data", "fsdp"), both `AxisType.Auto` (GSPMD-style: XLA inserts the
collectives). The batch is split over all devices (both axes, `BATCH_AXES`). Parameters are
replicated ("replicate" rules), or sharded over the "fsdp" axis ("fsdp" rules). The "fsdp" rules
only shard when the "fsdp" axis has more than one device: `make_mesh(fsdp=-1)` (the configs'
default with `sharding.rules=fsdp`) puts every device on it, so parameters, Adam moments and EMA
take 1/N of their bytes per device; with `fsdp=1` they stay replicated.

Sharding rules are a list of `(regex, spec)` pairs matched against "/"-joined pytree paths, e.g.
"params/encoder/blocks_3/attn/qkv/kernel", "opt/0/mu/heads/...", "queues/<head>/x". The first
rule whose regex matches (re.search) wins. `spec` is a `PartitionSpec` or one of
  "replicate"   everything on every device;
  "fsdp"        the largest dim divisible by the "fsdp" axis size is sharded over it, for arrays of
                at least MIN_FSDP_SIZE elements (smaller ones and scalars are replicated);
                ("fsdp", min_size) sets another threshold (state_rules(min_fsdp_size=...));
  "all_devices" the first axis sharded over ("data", "fsdp") (the NN queues).
Optimizer state and EMA follow the parameters because "fsdp" is decided by shape alone.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device
MIN_FSDP_SIZE = 2**14          # elements; smaller arrays are not worth a gather


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None):
  """A ("data", "fsdp") mesh of Auto axes over `devices` (default: all).

  -1 takes the devices the other axis leaves; `fsdp=-1` with `data=-1` gives every device to
  "fsdp" (data 1). Several slices joined over a slow network: set `fsdp` to the devices of one
  slice and let `data` span the slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp == -1:
    if data == -1:
      data = 1
    if data < 1 or n % data:
      raise ValueError(f"data={data} must be >= 1 and divide the device count {n}")
    fsdp = n // data
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices; use "
                     "data=-1 to take the remaining devices")
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), AXES,
                           axis_types=(auto, auto))


def state_rules(name: str = "replicate", min_fsdp_size: int = MIN_FSDP_SIZE) -> list:
  """Rules for the train state: "replicate" (data parallel) or "fsdp" (parameters, EMA and
  optimizer state sharded over "fsdp"). Queues are always split over all devices (section 5)."""
  rules: list[tuple[str, Any]] = [(r"^queues/[^/]+/(x|idx|label|age)$", "all_devices")]
  # "fsdp" shards by shape over the "fsdp" mesh axis; with an axis of size 1 nothing is sharded.
  if name == "fsdp":
    rules.append((r"^(params|ema|opt)/", ("fsdp", min_fsdp_size)))
  elif name != "replicate":
    raise ValueError(f"unknown sharding rule set {name!r}; use 'replicate' or 'fsdp'")
  rules.append((r".*", "replicate"))
  return rules


def path_str(path) -> str:
  """'/'-joined names of a pytree key path (dict keys, attribute names, sequence indices)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape, mesh, min_size) -> P:
  size = mesh.shape["fsdp"]
  if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])  # largest first, stable
  for d in dims:
    if shape[d] % size == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def _spec(rule_spec, shape, mesh) -> P:
  if isinstance(rule_spec, P):
    return rule_spec
  if rule_spec == "replicate":
    return P()
  if rule_spec == "all_devices":
    return P(BATCH_AXES) if len(shape) >= 1 else P()
  if rule_spec == "fsdp":
    return _fsdp_spec(shape, mesh, MIN_FSDP_SIZE)
  if isinstance(rule_spec, tuple) and rule_spec[0] == "fsdp":
    return _fsdp_spec(shape, mesh, rule_spec[1])
  raise ValueError(f"unknown sharding rule spec {rule_spec!r}; use a PartitionSpec, 'replicate',"
                   " 'fsdp', ('fsdp', min_size) or 'all_devices'")


def infer_shardings(mesh, tree, rules):
  """`NamedSharding`s for every leaf of `tree` (arrays or ShapeDtypeStructs) from `rules`."""
  compiled = [(re.compile(regex), spec) for regex, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    for regex, spec in compiled:
      if regex.search(name):
        return NamedSharding(mesh, _spec(spec, leaf.shape, mesh))
    raise ValueError(f"no sharding rule matches {name!r}; end the rules with ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_shardings(mesh, batch) -> dict:
  """Shardings of a loader batch: images `[V, B, H, W, 3]` split on B (axis 1; the view axis
  comes first), per-sample vectors `[B]` split on B."""
  def one(x):
    if len(x.shape) == 1:
      return NamedSharding(mesh, P(BATCH_AXES))
    if len(x.shape) == 5:
      return NamedSharding(mesh, P(None, BATCH_AXES))
    raise ValueError(f"unexpected batch entry of shape {x.shape}: expected images [V, B, H, W, 3]"
                     " or per-sample [B]")
  return jax.tree.map(one, batch)


def global_batch(mesh, local_batch) -> dict:
  """Global arrays from this process's slice of the batch (every process feeds its rows).

  Each process passes `global_batch_size // jax.process_count()` samples; images are
  `[V, b, H, W, 3]`, so the batch axis is 1.
  """
  shardings = batch_shardings(mesh, local_batch)
  count = jax.process_count()

  def one(x, sharding):
    x = np.asarray(x)
    axis = 0 if x.ndim == 1 else 1
    shape = list(x.shape)
    shape[axis] *= count
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return jax.tree.map(one, local_batch, shardings)


_COLLECTIVE = re.compile(
    r"=\s*(\([^()]*\)|[\w\[\]{},:#\d]+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
  """`(op, dtype, shape)` of every collective result in an optimised HLO module text
  (`jax.jit(f).lower(...).compile().as_text()`); tuple results are listed element by element.

  Used to check what a compiled step communicates, e.g. that no device gathers a whole queue.
  """
  found = []
  for match in _COLLECTIVE.finditer(hlo_text):
    result, op = match.groups()
    for dtype, dims in _SHAPE.findall(result):
      found.append((op, dtype, tuple(int(d) for d in dims.split(",") if d)))
  return found
