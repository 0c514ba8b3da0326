"""One refinement step: forward over all views, NN retrieval, NNA loss, update, EMA, enqueue.

Batch layout (from the loader; global arrays, batch axis sharded over all devices):
  {"global": [2, B, G, G, 3] uint8 NHWC pixels (normalised on the device, Refiner.normalize) or
             normalised float32, view-major (g1, g2),
   "local":  [n, B, L, L, 3] likewise (optional; n local views),
   "label":  [B] int32 (optional; only for the nn-accuracy metric),
   "index":  [B] int32 dataset index (queue self-exclusion)}
B is the global batch. The view axis stays separate from the (sharded) batch axis throughout
(models/refiner.py says why); the view order g1, g2, l1, ... is the reference's (section 4).

Per head (sections 4-6): z, p = head(all views); anchors = SG(z of g1, g2); neighbours = queue
retrieval of the anchors (self-index excluded; arg-max or random top-k); loss = NNA over the global
batch. The step loss is the sum of the head losses. After the update: EMA of the encoder (stage 3,
fp32, every step) and FIFO enqueue of g1's projector outputs of the whole global batch with their
indices and labels (after retrieval). BatchNorm running statistics come from the same forward.

The step is one `jax.jit` with the state donated and explicit in/out shardings; its PRNG key is
`fold_in(state["rng"], state["step"])`, so nothing but the state decides the randomness.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mim_refiner_jax import optim
from mim_refiner_jax import sharding as sharding_lib
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.objectives import nna
from mim_refiner_jax.objectives import queue as queue_lib

STANDARD_BATCH = {"global": jax.ShapeDtypeStruct((2, 2, 2, 2, 3), jnp.float32),
                  "local": jax.ShapeDtypeStruct((2, 2, 2, 2, 3), jnp.float32),
                  "label": jax.ShapeDtypeStruct((2,), jnp.int32),
                  "index": jax.ShapeDtypeStruct((2,), jnp.int32)}


def make_train_step(model: Refiner, tx: optax.GradientTransformation, mesh, state_shardings, *,
                    topk: int, temperatures: dict | None = None,
                    local_view_indexing: str = "reference", ema_decay: float | None = None,
                    freeze_encoder: bool = False, sim_dtype=jnp.bfloat16, logits_dtype=None,
                    lr_fn=None, batch_shardings=None,
                    queue_axes: Sequence[str] = queue_lib.QUEUE_AXES,
                    max_traces: int | None = None):
  """Returns `step(state, batch) -> (state, metrics)`, jitted, the state donated.

  Args:
    model: the Refiner (encoder + heads).
    tx: the optimizer (optim.make_optimizer) over params {"encoder", "heads"}.
    mesh: the ("data", "fsdp") mesh.
    state_shardings: shardings of the state (state.create_state returns them).
    topk: queue retrieval: 1 = arg-max (stage 2), k = random pick among the top-k (stage 3: 20).
    temperatures: {head name: tau}; default: each HeadSpec's temperature.
    local_view_indexing: "reference" (the official quirk) or "corrected" (objectives/nna.py).
    ema_decay: EMA of the encoder params after every step (stage 3: 0.9999); None = no EMA.
    freeze_encoder: stage 2: gradients only for the heads, `tx` must be the stage-2 optimizer
      (make_optimizer(freeze_encoder=True): heads subtree only); the encoder params are returned
      unchanged and no encoder backward pass is built.
    sim_dtype: dtype of the retrieval similarity matmul (reference: bf16).
    logits_dtype: dtype of the NNA logits matmul (reference: bf16 under autocast; None = fp32).
    lr_fn: optional schedule `step -> lr`, logged as metric "lr".
    batch_shardings: shardings of the batch dict; default: the standard layout above with all
      four keys (use sharding.batch_shardings(mesh, batch) for another key set).
    queue_axes: mesh axes the queues are sharded over.
    max_traces: if set, raise when the step is traced more often (each trace recompiles).

  Metrics (replicated scalars): "loss" (sum over heads), "lr", and per head "<name>/<metric>" for
  loss, global_loss, local_loss, alignment, global_alignment, local_alignment, nn_similarity,
  nn_age and nn_accuracy (when labels are given).
  """
  temperatures = dict(temperatures or {h.name: h.temperature for h in model.heads})
  missing = [h.name for h in model.heads if h.name not in temperatures]
  if missing:
    raise ValueError(f"no temperature for heads {missing}")
  nna.pair_sets(0, local_view_indexing)  # validates the name early
  if ema_decay is not None and freeze_encoder:
    raise ValueError("ema_decay is for stage 3 (trained encoder); stage 2 freezes the encoder")
  if batch_shardings is None:
    batch_shardings = sharding_lib.batch_shardings(mesh, STANDARD_BATCH)

  traces = []  # per instance: chex.assert_max_traces keys on the code object, shared by all steps

  def step(state, batch):
    traces.append(jax.tree.map(lambda x: (x.shape, x.dtype), batch))
    if max_traces is not None and len(traces) > max_traces:
      raise RuntimeError(f"the train step was traced {len(traces)} times (max_traces="
                         f"{max_traces}): every trace recompiles. Batch shapes per trace: "
                         f"{traces}. Keep batch shapes and dtypes fixed (drop_remainder).")
    key = jax.random.fold_in(state["rng"], state["step"])
    global_views = batch["global"]
    if global_views.ndim != 5 or global_views.shape[0] != 2:
      raise ValueError(f"batch['global'] must be [2, B, H, W, 3] (two global views), got "
                       f"{global_views.shape}")
    b = global_views.shape[1]
    local_views = batch.get("local")
    if local_views is not None and local_views.shape[0] == 0:
      local_views = None
    index = batch["index"].astype(jnp.int32)
    label = batch.get("label")
    # Per-row index and label of the anchors [2, B]; views stay a separate axis (never merged into
    # the sharded batch axis, see models/refiner.py).
    index2 = jnp.broadcast_to(index, (2, b))
    label2 = None if label is None else jnp.broadcast_to(label.astype(jnp.int32), (2, b))
    params = state["params"]

    def loss_fn(trainable):
      full = dict(params, **trainable)  # stage 2: the frozen encoder enters as a constant
      outputs, new_stats = model.apply(full, state["buffers"], state["batch_stats"],
                                       global_views, local_views, train=True,
                                       freeze_encoder=freeze_encoder)
      total, metrics, view0 = 0.0, {}, {}
      for i, h in enumerate(model.heads):
        z, p = outputs[h.name]                      # [V, B, d], views g1, g2, l1, ...
        anchors = jax.lax.stop_gradient(z[:2])
        neighbours, nn_metrics = queue_lib.retrieve(
            state["queues"][h.name], anchors, index2, topk=topk,
            key=jax.random.fold_in(key, i), mesh=mesh, label=label2, sim_dtype=sim_dtype,
            axes=queue_axes)
        loss, loss_metrics = nna.nna_loss(
            anchors, neighbours, p, temperature=temperatures[h.name],
            local_view_indexing=local_view_indexing, logits_dtype=logits_dtype)
        total = total + loss
        metrics.update({f"{h.name}/{k}": v for k, v in {**loss_metrics, **nn_metrics}.items()})
        view0[h.name] = anchors[0]
      return total, (metrics, new_stats, view0)

    # Stage 2 differentiates the heads only: no encoder backward, gradient or update exists (the
    # stage-2 optimizer works on this subtree, optim.optimized_params).
    trainable = optim.optimized_params(params, freeze_encoder)
    (loss, (metrics, new_stats, view0)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable)
    updates, opt_state = tx.update(grads, state["opt"], trainable)
    new_params = dict(params, **optax.apply_updates(trainable, updates))

    new_state = dict(state)
    new_state.update(step=state["step"] + 1, params=new_params, opt=opt_state,
                     batch_stats=new_stats)
    if ema_decay is not None:
      new_state["ema"] = optim.ema_update(state["ema"], new_params["encoder"], ema_decay)
    new_state["queues"] = {
        name: queue_lib.enqueue(state["queues"][name], view0[name], index, label, mesh=mesh,
                                axes=queue_axes)
        for name in state["queues"]}
    metrics["loss"] = loss
    if lr_fn is not None:
      metrics["lr"] = jnp.asarray(lr_fn(state["step"]), jnp.float32)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
