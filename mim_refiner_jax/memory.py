"""Per-device memory of a refinement run, from the compiled train step (nothing is allocated).

`plan(config, devices)` builds the run the way `train.py` does (model from the config's ViT size,
optimizer, state layout, sharding rules, mesh, the jitted step), but with `jax.eval_shape` for the
state and `ShapeDtypeStruct`s with shardings for state and batch, then lowers and compiles the REAL
step and reads XLA's buffer assignment (`compiled.memory_analysis()`). No weights file is read.

Per device it reports the state by part (exact: the shard shapes of the state's shardings),
the batch, XLA's temporaries (activations kept for the backward pass, gradients, workspace) and
the total = arguments + temporaries + outputs not aliased to the donated state.

Where it compiles (`target_devices`): with `libtpu` installed (`pip install -e .[plan]`), the
step is compiled for a TPU topology of N chips without any TPU (`jax.experimental.topologies`,
libtpu's compiler running on the CPU host): XLA's TPU buffer assignment, bf16 native, a
memory-aware scheduler, and remat honoured. That is the plan for TPU v5p / v5e, and the accelerator
model for GPUs and TPU v4 (compiled for v5p, judged against their own memory): ViT-L/16 stage 3
comes out at ~0.67 GiB per sample per device, so about 100 samples fit an A100-80GB as the
reference's users report (refiner_facts section 11, issue #11). Without libtpu the step is compiled
for simulated CPU devices (XLA_FLAGS --xla_force_host_platform_device_count): state bytes are still
exact, but XLA:CPU's temporaries overestimate an accelerator's ~3x (f32 copies around bf16 matmuls,
materialised attention scores, a scheduler that hoists rematerialised blocks so remat shows no
saving): the report says so.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections

from mim_refiner_jax import config as config_lib
from mim_refiner_jax import sharding as sharding_lib
from mim_refiner_jax import train as train_lib
from mim_refiner_jax.models import vit as vit_lib

GIB = 2**30
# Memory per device, GiB (what the runtime reports as total; usable is a little less).
DEVICE_MEMORY_GIB = {
    "a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200-141gb": 140,
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95,
}
# The TPU generation whose compiler plans each device kind (GPUs and v4: v5p as the accelerator
# model, see the module docstring) and the per-host chip grid its topology names are built from.
TPU_TARGET = {"tpu-v5p": "v5p", "tpu-v5e": "v5e"}
# libtpu compiles for a topology without a TPU; these keep it from probing for one and let several
# planners run at once (no TPU is opened, so its one-process lock is not needed). Set unless set.
LIBTPU_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
HEADROOM = 0.1  # share of the memory kept free for the runtime, collectives' buffers, fragments
DEMO_VIT = dict(width=96, depth=4, num_heads=3)  # the demo's shipped MAE when model.size is ""


@dataclasses.dataclass
class Plan:
  """Per-device bytes of one compiled train step."""
  devices: int
  mesh: dict
  params: int         # params, buffers, BatchNorm statistics
  optimizer: int
  ema: int
  queues: int
  batch: int
  temporaries: int    # XLA temp buffers: activations, gradients, workspace
  other: int          # arguments not counted above and outputs not aliased to the state
  flops: float | None  # cost_analysis FLOPs per device per step

  @property
  def total(self) -> int:
    return (self.params + self.optimizer + self.ema + self.queues + self.batch
            + self.temporaries + self.other)

  def fits(self, device_gib: float, headroom: float = HEADROOM) -> bool:
    return self.total <= device_gib * GIB * (1 - headroom)


def vit_kwargs_for(config) -> dict:
  """The encoder's constructor arguments from the config alone (no weights file)."""
  m = config.model
  size = dict(vit_lib.SIZES[m.size]) if m.size else dict(DEMO_VIT)
  return dict(size, patch_size=m.patch_size, mlp_ratio=4.0, prenorm=m.prenorm,
              pos_grid=m.image_size // m.patch_size, **m.get("vit_options", {}))


def tpu_topology_name(generation: str, chips: int) -> str | None:
  """A topology name of `chips` chips for jax.experimental.topologies ("v5p:2x2x2" for 8), or None
  when `chips` is not a power of two of at least 4 (a host holds 2x2 chips)."""
  if chips < 4 or chips & (chips - 1):
    return None
  dims = [2, 2, 1] if generation == "v5p" else [2, 2]
  while math.prod(dims) < chips:  # double the smallest axis, the last of equals: 2x2x4, 2x4x4
    i = len(dims) - 1 - dims[::-1].index(min(dims))
    dims[i] *= 2
  return f"{generation}:{'x'.join(str(d) for d in dims)}"


def libtpu_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("libtpu") is not None


def target_devices(device: str, count: int, backend: str = "auto"):
  """`(devices, description)` to compile a plan for `count` devices of kind `device`.

  backend "tpu": the TPU topology (no TPU needed; needs libtpu), "cpu": simulated CPU devices
  (XLA_FLAGS must have provided them), "auto": tpu when libtpu is installed and `count` makes a
  topology, else cpu.
  """
  generation = TPU_TARGET.get(device, "v5p")
  name = tpu_topology_name(generation, count)
  if backend == "auto":
    backend = "tpu" if libtpu_available() and name else "cpu"
  if backend == "tpu":
    if name is None:
      raise ValueError(f"a TPU topology needs a power of two of at least 4 chips, not {count}")
    if not libtpu_available():
      raise ValueError("--backend tpu needs libtpu (pip install -e .[plan]) to compile for a TPU "
                       "topology on this host")
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    for var, value in LIBTPU_ENV.items():
      os.environ.setdefault(var, value)
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    proxy = "" if device in TPU_TARGET else f", the accelerator model for {device}"
    return list(devices), f"compiled for TPU {name} (libtpu, no TPU needed{proxy})"
  if backend != "cpu":
    raise ValueError(f"backend must be auto, tpu or cpu, not {backend!r}")
  if jax.device_count() < count:
    raise ValueError(f"{count} devices asked for, {jax.device_count()} simulated: set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={count} before jax starts")
  return jax.devices()[:count], (
      f"compiled for {count} simulated CPU devices: state exact, temporaries XLA:CPU's (about 3x "
      "an accelerator's, remat not visible; pip install -e .[plan] for the TPU compiler)")


def _shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (device 0's shard)."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(config, mesh, batch_size: int | None = None) -> dict:
  """The loader's batch as sharded ShapeDtypeStructs (uint8 views, data/loader.py)."""
  d = config.data
  b = batch_size or config.batch_size
  batch = {"global": jax.ShapeDtypeStruct((2, b, d.global_size, d.global_size, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32),
           "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
  if d.num_local:
    batch["local"] = jax.ShapeDtypeStruct((d.num_local, b, d.local_size, d.local_size, 3),
                                          jnp.uint8)
  shardings = sharding_lib.batch_shardings(mesh, batch)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                      shardings)


def build(config, devices, vit_kwargs: dict | None = None) -> dict:
  """What train.py builds, abstract: step (jitted, not compiled), state (sharded
  ShapeDtypeStructs), shardings, batch (sharded ShapeDtypeStructs), mesh, rules, init_fn, model."""
  stage2 = config.stage == 2
  key = jax.random.key(config.seed)
  mesh = sharding_lib.make_mesh(config.sharding.data, config.sharding.fsdp, devices)
  rules = sharding_lib.state_rules(config.sharding.rules)
  model = train_lib.build_model(config, vit_kwargs or vit_kwargs_for(config),
                                num_devices=len(devices))
  steps_per_ep = config_lib.steps_per_epoch(config.data.num_train_examples or 1_281_167,
                                            config.batch_size)
  tx, lr_fn, _ = train_lib.build_optimizer(config, train_lib.param_shapes(config, model, key),
                                           steps_per_ep, stage2, model.encoder.depth)
  with_ema = not stage2 and config.ema_decay > 0
  init_fn = train_lib._init_fn(config, model, tx, with_ema)  # pylint: disable=protected-access
  shapes = jax.eval_shape(init_fn, key)
  shardings = sharding_lib.infer_shardings(mesh, shapes, rules)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                       shardings)
  batch = abstract_batch(config, mesh)
  step = train_lib.build_step(config, model, tx, mesh, shardings, lr_fn, with_ema,
                              jax.tree.map(lambda x: x.sharding, batch))
  return dict(step=step, state=state, shardings=shardings, batch=batch, mesh=mesh, rules=rules,
              init_fn=init_fn, model=model, key=key)


def plan(config, devices=None, vit_kwargs: dict | None = None) -> Plan:
  """Compiles the config's train step for `devices` (default: all) and returns its `Plan`;
  `vit_kwargs` (e.g. a weights file's) replaces the encoder the config's model.size names."""
  devices = list(jax.devices() if devices is None else devices)
  check(config, len(devices))
  built = build(config, devices, vit_kwargs)
  state, shardings, batch, mesh = (built[k] for k in ("state", "shardings", "batch", "mesh"))
  compiled = built["step"].lower(state, batch).compile()
  mem = compiled.memory_analysis()
  part = lambda name: _shard_bytes(state[name], shardings[name]) if name in state else 0
  params = part("params") + part("buffers") + part("batch_stats")
  parts = dict(params=params, optimizer=part("opt"), ema=part("ema"), queues=part("queues"),
               batch=_shard_bytes(batch, jax.tree.map(lambda x: x.sharding, batch)))
  arguments = mem.argument_size_in_bytes
  outputs_fresh = mem.output_size_in_bytes - mem.alias_size_in_bytes
  other = max(arguments - sum(parts.values()), 0) + max(outputs_fresh, 0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Plan(devices=len(devices), mesh=dict(mesh.shape), temporaries=mem.temp_size_in_bytes,
              other=other, flops=(cost or {}).get("flops"), **parts)


def check(config, num_devices: int):
  """Clear errors for configs the mesh cannot hold."""
  for name, value in (("batch_size", config.batch_size), ("queue.size", config.queue.size)):
    if value % num_devices:
      raise ValueError(f"config.{name}={value} does not divide by {num_devices} devices")


def with_changes(config, **changes) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-name changes, e.g. {"model.remat": True}."""
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in changes.items():
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def candidate_changes(config, num_devices: int, first: Plan | None = None):
  """Changes to try when a run does not fit, smallest first: shard the state (FSDP), rematerialise
  the blocks (first when `first`, the plan as it is, is dominated by activations), then both with
  halved global batches (a smaller per-device batch; the reference uses no gradient accumulation,
  so this changes the recipe: section 7)."""
  fsdp = {"sharding.rules": "fsdp", "sharding.fsdp": -1, "sharding.data": -1}
  steps = []
  if config.sharding.rules != "fsdp" or config.sharding.fsdp == 1:
    steps.append(fsdp)
  if not config.model.remat:
    steps.append({"model.remat": True})
    if first is not None and first.temporaries > first.total - first.temporaries:
      steps.reverse()
  both = {k: v for step in steps for k, v in step.items()}  # only what the config lacks
  if len(steps) == 2:
    steps.append(both)
  batch = config.batch_size // 2
  while batch >= num_devices and batch % num_devices == 0:
    steps.append(dict(both, batch_size=batch))
    batch //= 2
  return steps


def find_fit(config, device_gib: float, devices=None, headroom: float = HEADROOM,
             log=lambda *a: None, vit_kwargs: dict | None = None):
  """`(plan, None)` if the config fits, else `(plan, (changes, plan of the change))` for the first
  candidate change that fits (or `(plan, None)` with nothing found). Each candidate recompiles."""
  first = plan(config, devices, vit_kwargs)
  if first.fits(device_gib, headroom):
    return first, None
  num = len(devices or jax.devices())
  for changes in candidate_changes(config, num, first):
    log(f"  trying {describe(changes)}")
    p = plan(with_changes(config, **changes), devices, vit_kwargs)
    if p.fits(device_gib, headroom):
      return first, (changes, p)
  return first, ()


def describe(changes: dict) -> str:
  if not changes:
    return "-"
  out = []
  if changes.get("sharding.rules") == "fsdp":
    out.append("FSDP over all devices")
  if changes.get("model.remat"):
    out.append("remat")
  if "batch_size" in changes:
    out.append(f"global batch {changes['batch_size']}")
  return " + ".join(out)


def gib(n: int) -> str:
  return f"{n / GIB:.2f}"


def report(p: Plan, device: str, device_gib: float, headroom: float = HEADROOM) -> str:
  """A human-readable table of one plan."""
  rows = [("parameters (+ buffers, BN stats)", p.params), ("optimizer state", p.optimizer),
          ("EMA", p.ema), ("queues", p.queues), ("batch (uint8 views)", p.batch),
          ("activations / temporaries", p.temporaries), ("other", p.other),
          ("total", p.total)]
  lines = [f"{name:<36s} {gib(v):>9s} GiB" for name, v in rows]
  budget = device_gib * (1 - headroom)
  verdict = "fits" if p.fits(device_gib, headroom) else "does NOT fit"
  lines.append(f"{device}: {device_gib} GiB per device, {budget:.1f} GiB usable "
               f"({headroom:.0%} headroom): {verdict}")
  if p.flops:
    lines.append(f"FLOPs per device per step (XLA cost analysis): {p.flops:.4g}")
  return "\n".join(lines)


def state_bytes_real(state) -> dict:
  """Bytes device 0 holds of each top-level part of a REAL state (for checking a plan)."""
  dev = jax.devices()[0]
  out = {}
  for name, sub in state.items():
    out[name] = sum(s.data.nbytes for leaf in jax.tree.leaves(sub)
                    for s in leaf.addressable_shards if s.device == dev)
  return out


def remat_check(width: int = 256, depth: int = 8, batch: int = 64) -> dict:
  """Temporaries (bytes) of the gradient of a ViT without and with remat on this backend: shows
  whether the backend's buffer assignment reflects what remat saves (XLA:CPU's does not)."""
  from mim_refiner_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((batch, 64, 64, 3), jnp.float32)
  out = {}
  for remat in (False, True):
    vit = ViT(patch_size=8, width=width, depth=depth, num_heads=4, pos_grid=8, remat=remat)
    variables = vit.init(jax.random.PRNGKey(0), images[:1])
    loss = lambda p, vit=vit, v=variables: jnp.sum(
        vit.apply({"params": p, "buffers": v["buffers"]}, images)[0] ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    out[remat] = compiled.memory_analysis().temp_size_in_bytes
  return out

