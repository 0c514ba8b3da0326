"""Tiny refinement setup shared by the step tests, and the worker of the two-process test.

As a module: `setup(...)` builds model, optimizer, state shardings and the jitted step for a mesh,
cached so that test files share compiled steps (compiles dominate test time). As a script:

  python tests/tiny_refiner.py --port P --process_id I --num_processes 2 --initial F --out DIR

runs STEPS stage-3 steps from the initial state in F (npz of `flat(state)`) on the global mesh
of all processes (2 devices each, XLA_FLAGS set by the launcher), each process feeding its slice
of the batch, and process 0 writes the losses and the final state to DIR/result.npz (ENGINEERING.md "Multi-process JAX on CPU").
"""

import argparse
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from mim_refiner_jax import sharding
from mim_refiner_jax import state as state_lib
from mim_refiner_jax import train_step
from mim_refiner_jax.config import HeadSpec
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.models.vit import ViT
from mim_refiner_jax.optim import make_optimizer

# ViT "mu" (width 32, depth 2), 16 px global / 8 px local views, 2 local views, batch 16.
# The queue size 72 (8 shards of 9) appears in no other array shape, so the HLO checks can tell a
# gathered queue from anything else.
PATCH, GLOBAL_PX, LOCAL_PX, NUM_LOCAL, BATCH, QUEUE = 4, 16, 8, 2, 16, 72
HEADS = (HeadSpec("nnclr_temp02_cls", "main", 0.2), HeadSpec("nnclr_temp03_cls0", 0, 0.3))
STEPS = 3
SEED = 0


def make_model(compute_dtype=jnp.float32) -> Refiner:
  encoder = ViT(patch_size=PATCH, width=32, depth=2, num_heads=2, pos_grid=GLOBAL_PX // PATCH,
                dtype=compute_dtype)
  head = IDHead(proj_hidden_dim=48, pred_hidden_dim=40, output_dim=16, dtype=compute_dtype)
  return Refiner(encoder, HEADS, head)


def init_fn(model, tx, stage):
  return state_lib.make_init_fn(model, tx, global_shape=(GLOBAL_PX, GLOBAL_PX, 3),
                                local_shape=(LOCAL_PX, LOCAL_PX, 3), queue_size=QUEUE,
                                with_ema=stage == 3)


def make_tx(model, stage):
  params = jax.eval_shape(init_fn(model, _PlaceholderTx(), stage), jax.random.PRNGKey(0))["params"]
  return make_optimizer(params, base_lr=2e-4 if stage == 2 else 4e-4, global_batch_size=BATCH,
                        warmup_steps=2, total_steps=20, depth=model.encoder.depth,
                        freeze_encoder=stage == 2)


class _PlaceholderTx:
  """Stands in for the optimizer while the param shapes are derived."""

  @staticmethod
  def init(params):
    del params
    return ()


@functools.lru_cache(maxsize=None)
def setup(mesh_kind: str, stage: int, rules: str = "replicate", topk: int = 5,
          sim_dtype: str = "bfloat16", local_view_indexing: str = "reference"):
  """Everything for one (mesh, stage, rules) combination; the jitted step is shared."""
  if mesh_kind == "1dev":
    mesh = sharding.make_mesh(devices=jax.local_devices()[:1])
  elif mesh_kind == "all":
    mesh = sharding.make_mesh(fsdp=2 if rules == "fsdp" else 1)
  else:
    raise ValueError(mesh_kind)
  model = make_model()
  tx, lr_fn = make_tx(model, stage)
  init = init_fn(model, tx, stage)
  rule_list = sharding.state_rules(rules, min_fsdp_size=0)
  shardings = sharding.infer_shardings(
      mesh, jax.eval_shape(init, jax.random.PRNGKey(SEED)), rule_list)
  step = train_step.make_train_step(
      model, tx, mesh, shardings, topk=topk, local_view_indexing=local_view_indexing,
      ema_decay=0.99 if stage == 3 else None, freeze_encoder=stage == 2,
      sim_dtype=jnp.dtype(sim_dtype), lr_fn=lr_fn, max_traces=1)
  return dict(mesh=mesh, model=model, tx=tx, init=init, rules=rule_list, shardings=shardings,
              step=step)


def put_global(tree, shardings):
  """Host numpy values -> global arrays with `shardings` (works across processes)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


@functools.lru_cache(maxsize=None)
def initial_state_numpy(stage: int):
  """The initial state as host numpy arrays, computed once on one local device.

  Stage 3's is stage 2's plus a fresh stage-3 optimizer state and the EMA (what make_init_fn
  with with_ema=True builds from the same key), without compiling a second init function.
  """
  s = setup("1dev", 2)
  state, _ = state_lib.create_state(s["init"], jax.random.PRNGKey(SEED), s["mesh"], s["rules"])
  state = jax.device_get(state)
  if stage == 3:
    state = dict(state, opt=jax.device_get(make_tx(s["model"], 3)[0].init(state["params"])),
                 ema=state["params"]["encoder"])
  return state


def make_batch(step: int, process_index: int = 0, process_count: int = 1) -> dict:
  """Batch `step` (numpy), or this process's slice of it. Indices repeat after two steps, so the
  queue's self-exclusion is exercised from step 2 on."""
  rng = np.random.default_rng(100 + step)
  batch = {
      "global": rng.normal(size=(2, BATCH, GLOBAL_PX, GLOBAL_PX, 3)).astype(np.float32),
      "local": rng.normal(size=(NUM_LOCAL, BATCH, LOCAL_PX, LOCAL_PX, 3)).astype(np.float32),
      "label": rng.integers(0, 4, BATCH).astype(np.int32),
      "index": (np.arange(BATCH) + BATCH * (step % 2)).astype(np.int32),
  }
  per = BATCH // process_count
  rows = slice(process_index * per, (process_index + 1) * per)
  return {k: v[:, rows] if v.ndim > 1 else v[rows] for k, v in batch.items()}


def run_steps(s, state, num_steps, process_index=0, process_count=1):
  """`num_steps` steps from `state`; returns (final state, [metrics per step] as numpy)."""
  history = []
  for i in range(num_steps):
    batch = sharding.global_batch(s["mesh"], make_batch(i, process_index, process_count))
    state, metrics = s["step"](state, batch)
    history.append(jax.device_get(metrics))
  return state, history


@functools.lru_cache(maxsize=None)
def reference_run(stage: int = 3):
  """STEPS steps on one device from the initial state: (final state numpy, metrics history)."""
  s = setup("1dev", stage, topk=5 if stage == 3 else 1)
  state, history = run_steps(s, put_global(initial_state_numpy(stage), s["shardings"]), STEPS)
  return jax.device_get(state), history


def flat(tree) -> dict:
  """{"/"-joined path: numpy array} of a (gathered) pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding.path_str(p): np.asarray(x) for p, x in leaves}


# Parameters (or parts) whose true gradient is exactly zero, by invariance:
#  - the final LN bias feeds the main head's bias-free Linear -> BatchNorm, which removes any shift
#    shared by all rows; likewise each projector's last BN bias feeds predictor_0's Linear -> BN
#    (the anchors are stop-gradient);
#  - the key part of the qkv bias adds the same number to every logit of a query (softmax
#    invariance).
# What they receive is rounding noise, which Adam scales up to +-lr per step, so across device
# counts they only agree in staying within that bound (sum of the 3 learning rates). The queue
# vectors are projector outputs, so they inherit the projector_2 bias noise: atol 1e-4 there.
GRADIENT_FREE = re.compile(r"^params/(encoder/norm/bias|heads/[^/]+/projector_2/bn/bias)$")
QKV_BIAS = re.compile(r"^params/encoder/blocks_\d+/attn/qkv/bias$")
LR_SUM = 4e-4 * BATCH / 256 * (1 / 3 + 2 / 3 + 1)
WIDTH = 32


def assert_states_close(got, want):
  got, want = flat(got), flat(want)
  initial = flat(initial_state_numpy(3))
  assert got.keys() == want.keys()
  for k in want:
    got[k], want[k], initial[k] = (np.atleast_1d(d[k]) for d in (got, want, initial))
    free = slice(None) if GRADIENT_FREE.match(k) else (
        slice(WIDTH, 2 * WIDTH) if QKV_BIAS.match(k) else slice(0))
    for x in (got[k], want[k]):  # the gradient-free part moved by at most sum(lr)
      assert np.abs(x[free] - initial[k][free]).max(initial=0) <= 1.01 * LR_SUM, k
    g, w = np.delete(got[k], free), np.delete(want[k], free)  # the rest: flattened
    if np.issubdtype(w.dtype, np.integer):
      np.testing.assert_array_equal(g, w, err_msg=k)
    else:
      atol = 1e-4 if k.startswith("queues/") else 2e-5
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=k)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--initial", required=True, help="npz of the initial state (flat paths)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  # Before any device access (ENGINEERING.md): the coordinator is process 0.
  jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id, initialization_timeout=60)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  s = setup("all", 3, "fsdp")
  # The initial state comes from the launcher (saves compiling an init function here).
  shapes = jax.eval_shape(s["init"], jax.random.PRNGKey(SEED))
  stored = np.load(args.initial)
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  initial = jax.tree.unflatten(treedef, [stored[sharding.path_str(p)] for p, _ in paths])
  state = put_global(initial, s["shardings"])
  state, history = run_steps(s, state, STEPS, jax.process_index(), jax.process_count())
  gathered = multihost_utils.process_allgather(state, tiled=True)
  if jax.process_index() == 0:
    result = {f"state/{k}": v for k, v in flat(gathered).items()}
    result["losses"] = np.array([h["loss"] for h in history])
    result["num_devices"] = np.array(jax.device_count())
    np.savez(os.path.join(args.out, "result.npz"), **result)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
