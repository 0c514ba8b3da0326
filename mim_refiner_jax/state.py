"""The train state: one plain-dict pytree, created sharded (shapes first, then a sharded jit).

  {"step":        [] int32, updates done (also the key for the per-step PRNG fold-in),
   "params":      {"encoder": ViT params, "heads": {name: IDHead params}},
   "buffers":     {"pos_embed": ...} the encoder's frozen position table (never trained),
   "batch_stats": {name: IDHead BatchNorm running statistics},
   "opt":         the optax state of the params,
   "ema":         EMA of the encoder params (stage 3 only; absent in stage 2),
   "queues":      {name: queue dict, see objectives/queue.py},
   "rng":         PRNG key (its per-step key is fold_in(rng, step))}

`create_state` builds it as big_vision does: `jax.eval_shape(init)` -> shardings from rules ->
`jax.jit(init, out_shardings=...)`, so parameters are created directly in their shards and never
gathered on one device. `stage3_from_stage2` turns a finished stage-2 state into a fresh stage-3
state (section 7).
"""

import jax
import jax.numpy as jnp

from mim_refiner_jax import sharding as sharding_lib
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.objectives.queue import init_queue


def fresh_state(params, buffers, batch_stats, queues, rng, tx, with_ema: bool) -> dict:
  """The state layout above at step 0 with a fresh optimizer (and the EMA from the encoder)."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "buffers": buffers,
           "batch_stats": batch_stats, "opt": tx.init(params), "queues": queues, "rng": rng}
  if with_ema:
    state["ema"] = jax.tree.map(lambda x: x.astype(jnp.float32), params["encoder"])
  return state


def make_init_fn(model: Refiner, tx, *, global_shape, local_shape=None, queue_size: int,
                 with_ema: bool):
  """`init(key) -> state` for images of `global_shape` `(G, G, 3)` and `local_shape` (or None)."""
  def init(key):
    k_model, k_queue, k_rng = jax.random.split(key, 3)
    # [views, batch, H, W, 3]; only the image shapes matter for the variables
    g = jnp.zeros((2, 2) + tuple(global_shape), jnp.float32)
    l = None if local_shape is None else jnp.zeros((1, 2) + tuple(local_shape), jnp.float32)
    variables = model.init(k_model, g, l)
    queues = {h.name: init_queue(jax.random.fold_in(k_queue, i), queue_size,
                                 model.head.output_dim) for i, h in enumerate(model.heads)}
    return fresh_state(variables["params"], variables["buffers"], variables["batch_stats"],
                       queues, k_rng, tx, with_ema)
  return init


def create_state(init_fn, key, mesh, rules):
  """`(state, shardings)`: the state created directly with the shardings the rules give."""
  shapes = jax.eval_shape(init_fn, key)
  shardings = sharding_lib.infer_shardings(mesh, shapes, rules)
  return jax.jit(init_fn, out_shardings=shardings)(key), shardings


def stage3_from_stage2(stage2_state: dict, tx, mesh, rules, key=None, with_ema: bool = True):
  """Stage-3 state from a stage-2 one (section 7).

  Carries the encoder params and buffers, head params, BatchNorm statistics and queues; builds a
  FRESH optimizer state with `tx` (the stage-3 optimizer: `load_optim=False` in the reference),
  initialises the EMA from the encoder and restarts the step at 0. The PRNG key is `key` or the
  stage-2 key folded with 3 (so stage 3 does not replay stage 2's random choices).
  `with_ema=False` leaves the EMA out (runs without one).

  Returns `(state, shardings)`; the stage-2 state is not donated (it may still be saved).
  """
  def build(s2):
    rng = jax.random.fold_in(s2["rng"], 3) if key is None else key
    return fresh_state(s2["params"], s2["buffers"], s2["batch_stats"], s2["queues"], rng, tx,
                       with_ema)

  shapes = jax.eval_shape(build, stage2_state)
  shardings = sharding_lib.infer_shardings(mesh, shapes, rules)
  return jax.jit(build, out_shardings=shardings)(stage2_state), shardings
