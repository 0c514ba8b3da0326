"""Linear probes on frozen features: the DINOv2 grid and selective aggregation, as one computation.

DINOv2 grid (../shared/reference/refiner_facts.md section 10.2; `ml-jku/MIM-Refiner`
`utils/processors/probe_processor.py`, `models/probe/{linear_probe,batchnorm1d}.py`):
  - heads = 13 learning rates x feature sets ("last1_cls", "last1_cls+patch", "last4_cls", ...);
    every head is non-affine BatchNorm1d (running stats, eps 1e-5, momentum 0.1) -> Linear
    (trunc-normal std 0.01, zero bias). The BN has no parameters and sees the same input for every
    LR, so, as in the reference (one `probe_model.norms.<pooling>` per pooling), it is computed once
    per feature set;
  - SGD momentum 0.9 (torch semantics: buf = 0.9 buf + g; p -= lr buf), no weight decay, peak LR =
    lr x batch / 256, `wupcos_percent` with end_percent 0.1: linear warmup over W = int(0.1 T)
    updates, lr(s) = peak (s+1)/(W+1), then cosine to the absolute 1e-6 (`optim.lr_schedule`);
  - top-1 on the test set after every epoch with the BN running stats; the reported number is the
    maximum over the grid and the epochs (`accuracy1/test*/max`), with the grid point named.
All heads are one batched computation: feature sets are zero-padded to the widest one and stacked
`[F, B, D_max]` (a zero column normalises to 0 and its weights get no gradient, so the padding is
exact), the weights are `[F, L, D_max, C]`, and one jitted step updates every head with its own
LR. The batch is sharded over every device of the mesh (BatchNorm statistics stay global, XLA adds
the all-reduce); parameters are replicated.

Selective aggregation (../shared/reference/beyond_cls_facts.md sections 1-3; `gmum/beyond_cls`):
AbMILP over the patch tokens (one Linear(D->1) with bias per token, softmax over the tokens of each
image, weighted sum) -> BatchNorm1d(affine=False, eps 1e-6) -> Linear(D, C), all trained jointly
with the same cross-entropy. Every LR of the grid is one head (own scorer, own BN stats, own
classifier), trained with the same SGD-grid machinery as the linear probe. The original trains one
head with LARS (trust 0.001, wd 0) at lr 0.1 x bs/256 for 90 epochs (10 warmup, cosine to 0);
`optimizer="lars"` applies that update rule per head, but the default is the SGD grid: the grid
searches the LR scale that LARS adapts, needs no per-layer norms, and keeps one protocol for both
probes. Inits follow the original: torch's default Linear init (U(+-1/sqrt(D))) for the scorer
and the classifier.

On cached features every epoch sees the same view (no-aug, or A fixed augmented copies); the
reference's fresh `train_minaug` view per epoch with a bf16 encoder is probe_stream.py, which
trains these heads with `train_heads(..., train_batches=...)`. The heads here are fp32 (the
reference autocasts the Linear to bf16).

Defaults are sized for MNIST-scale checks (a few thousand rows: 10 epochs, batch 256, a few
seconds on 2 CPU cores); the paper's values are `epochs=PAPER_EPOCHS, batch_size=PAPER_BATCH_SIZE`.
"""

import dataclasses
import functools
import math
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_refiner_jax import optim
from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.evaluation import progress as progress_lib

# The DINOv2 learning-rate grid (section 10.2), multiplied by batch / 256.
DINOV2_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
PAPER_EPOCHS = 50          # section 10.2 (selective aggregation: 90, beyond_cls_facts section 3)
PAPER_BATCH_SIZE = 1024    # section 10.2 (selective aggregation: 16384)
DEFAULT_EPOCHS = 10        # MNIST-sized default
DEFAULT_BATCH_SIZE = 256
WARMUP_PERCENT = 0.1       # `wupcos_percent` end_percent (probe_processor.py)
END_LR = 1e-6
MOMENTUM = 0.9
BN_MOMENTUM = 0.1          # torch BatchNorm1d default
PROBE_BN_EPS = 1e-5        # torch default (models/probe/batchnorm1d.py)
SA_BN_EPS = 1e-6           # beyond_cls main_linprobe.py
PROBE_INIT_STD = 0.01      # init_truncnormal_zero_bias(std=0.01); torch truncates at +-2 absolute
LARS_TRUST = 0.001
EVAL_CHUNK = 1024


# ---------------------------------------------------------------------------------------- models
# A model is (init(numpy rng) -> params, apply(params, stats, x, train) -> (logits [*heads, B, C],
# new_stats)); stats are the BatchNorm running statistics. Parameters with ndim > head dims + 1
# are "matrices" for LARS (torch's p.ndim > 1).

def batch_norm(x, mean, var, train: bool, eps: float, axis: int):
  """Non-affine torch BatchNorm1d over `axis` (the batch axis): (y, (new_mean, new_var))."""
  if not train:  # running statistics
    y = (x - jnp.expand_dims(mean, axis)) / jnp.sqrt(jnp.expand_dims(var, axis) + eps)
    return y, (mean, var)
  n = x.shape[axis]
  batch_mean = jnp.mean(x, axis=axis, keepdims=True)
  batch_var = jnp.mean(jnp.square(x - batch_mean), axis=axis, keepdims=True)  # biased: normalises
  y = (x - batch_mean) / jnp.sqrt(batch_var + eps)
  batch_mean, batch_var = jnp.squeeze(batch_mean, axis), jnp.squeeze(batch_var, axis)
  new_mean = (1 - BN_MOMENTUM) * mean + BN_MOMENTUM * batch_mean
  new_var = (1 - BN_MOMENTUM) * var + BN_MOMENTUM * batch_var * n / max(n - 1, 1)  # unbiased
  return y, (new_mean, new_var)


@dataclasses.dataclass(frozen=True)  # hashable: compiled steps are cached per model config
class LinearGrid:
  """F feature sets x L learning rates: BN (per feature set) -> Linear (per head)."""
  num_sets: int
  num_lrs: int
  dim: int
  num_classes: int

  @property
  def head_shape(self):
    return (self.num_sets, self.num_lrs)

  def init(self, rng: np.random.Generator):
    f, l = self.head_shape
    # torch.nn.init.trunc_normal_(std=0.01) truncates at +-2 absolute = +-200 std: never reached.
    kernel = PROBE_INIT_STD * rng.standard_normal((f, l, self.dim, self.num_classes))
    params = dict(kernel=kernel, bias=np.zeros((f, l, self.num_classes)))
    stats = dict(mean=np.zeros((f, self.dim)), var=np.ones((f, self.dim)))
    return params, stats

  def apply(self, params, stats, x, train: bool):
    """x: [F, B, D] -> logits [F, L, B, C]."""
    y, (mean, var) = batch_norm(x, stats["mean"], stats["var"], train, PROBE_BN_EPS, axis=1)
    logits = jnp.einsum("fbd,fldc->flbc", y, params["kernel"],
                        precision=jax.lax.Precision.HIGHEST) + params["bias"][:, :, None]
    return logits, dict(mean=mean, var=var)


@dataclasses.dataclass(frozen=True)
class SelectiveAggregation:
  """L learning rates, each AbMILP(depth 1) -> BN(affine=False, eps 1e-6) -> Linear."""
  num_lrs: int
  dim: int
  num_classes: int

  @property
  def head_shape(self):
    return (self.num_lrs,)

  def init(self, rng: np.random.Generator):
    (l,), d, c = self.head_shape, self.dim, self.num_classes
    bound = 1.0 / math.sqrt(d)  # torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    uniform = lambda shape: rng.uniform(-bound, bound, shape)
    params = dict(score_kernel=uniform((l, d, 1)), score_bias=uniform((l, 1)),
                  kernel=uniform((l, d, c)), bias=uniform((l, c)))
    stats = dict(mean=np.zeros((l, d)), var=np.ones((l, d)))
    return params, stats

  def apply(self, params, stats, tokens, train: bool):
    """tokens: [B, T, D] patch tokens -> logits [L, B, C]."""
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("btd,ld->lbt", tokens, params["score_kernel"][..., 0], precision=hi)
    weights = jax.nn.softmax(scores + params["score_bias"][:, :, None], axis=-1)
    pooled = jnp.einsum("lbt,btd->lbd", weights, tokens, precision=hi)
    y, (mean, var) = batch_norm(pooled, stats["mean"], stats["var"], train, SA_BN_EPS, axis=1)
    logits = jnp.einsum("lbd,ldc->lbc", y, params["kernel"], precision=hi)
    return logits + params["bias"][:, None], dict(mean=mean, var=var)


# ------------------------------------------------------------------------------ train / evaluate

def _per_head(value, leaf, num_head_dims: int):
  return jnp.reshape(value, value.shape + (1,) * (leaf.ndim - num_head_dims))


def sgd_update(params, momentum_buf, grads, lr, num_head_dims: int, optimizer: str = "sgd"):
  """torch.optim.SGD(momentum=0.9) per head, or MAE's LARS (wd 0) per head; lr: [*heads]."""
  def leaf(p, buf, g):
    if optimizer == "lars" and p.ndim - num_head_dims > 1:  # torch: p.ndim > 1 gets the trust
      axes = tuple(range(num_head_dims, p.ndim))
      p_norm = jnp.sqrt(jnp.sum(p * p, axes, keepdims=True))
      g_norm = jnp.sqrt(jnp.sum(g * g, axes, keepdims=True))
      trust = jnp.where((p_norm > 0) & (g_norm > 0), LARS_TRUST * p_norm / g_norm, 1.0)
      g = g * trust
    buf = MOMENTUM * buf + g
    return p - _per_head(lr, p, num_head_dims) * buf, buf
  out = jax.tree.map(leaf, params, momentum_buf, grads)
  return (jax.tree.map(lambda o: o[0], out, is_leaf=lambda o: isinstance(o, tuple)),
          jax.tree.map(lambda o: o[1], out, is_leaf=lambda o: isinstance(o, tuple)))


@functools.lru_cache(maxsize=None)
def _step_fns(model, mesh, peaks: tuple, warmup: int, total: int, optimizer: str):
  """Jitted (train_step, eval_step) for this model, mesh, LR grid and schedule."""
  replicated = NamedSharding(mesh, P())
  num_head_dims = len(model.head_shape)
  peak = np.asarray(peaks, np.float32).reshape(model.head_shape)
  schedule = optim.lr_schedule(peak, warmup, total, END_LR)

  def train_step(state, x, y, step):
    params, stats, buf = state

    def loss_fn(p):
      logits, new_stats = model.apply(p, stats, x, train=True)
      target = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)  # [B, C], every head
      ce = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * target, axis=-1)  # [*heads, B]
      return jnp.sum(jnp.mean(ce, axis=-1)), new_stats  # heads are independent: sum of means

    grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
    params, buf = sgd_update(params, buf, grads, schedule(step), num_head_dims, optimizer)
    return params, new_stats, buf

  def eval_step(state, x, y, mask):
    params, stats, _ = state
    logits, _ = model.apply(params, stats, x, train=False)
    hit = (jnp.argmax(logits, axis=-1) == y) & mask
    return jnp.sum(hit, axis=-1, dtype=jnp.int32)  # [*heads]

  return (jax.jit(train_step, donate_argnums=(0,), out_shardings=replicated),
          jax.jit(eval_step, out_shardings=replicated))


def init_state(model, mesh, seed: int):
  """(params, BN stats, momentum buffers), fp32, replicated; drawn on the host from `seed`."""
  params, stats = model.init(np.random.default_rng(seed))
  state = (params, stats, jax.tree.map(np.zeros_like, params))
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda a: knn._global_array(np.asarray(a, np.float32), replicated), state)


def _batch_spec(mesh, batch_axis: int, ndim: int) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = tuple(mesh.axis_names)
  return NamedSharding(mesh, P(*spec))


def train_heads(model, make_batch, train_labels: np.ndarray, test_labels: np.ndarray, *,
                batch_axis: int, batch_ndim: int, lrs: Sequence[float], epochs: int,
                batch_size: int, seed: int, mesh, optimizer: str, progress: bool,
                desc: str, train_batches=None) -> dict:
  """Trains every head of `model` with SGD; returns test top-1 after every epoch.

  `make_batch(split, rows, epoch)` returns the host array of the given rows with the batch on
  `batch_axis` (`epoch` picks an augmented copy of the train features, if any).
  `train_batches(epoch, rows_per_step)`, if given, yields the (x, y) global arrays of those rows
  instead (the fresh-augmentation probe extracts them on the devices, probe_stream.py).
  Returns {"accuracy": [epochs, *heads] float64, "batch_size", "steps", "warmup",
  "epoch_seconds": [epochs] wall time of each epoch's training, extraction included}.
  """
  if optimizer not in ("sgd", "lars"):
    raise ValueError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}")
  mesh = mesh or knn.default_mesh()
  n_train, n_dev = len(train_labels), mesh.size
  batch = min(int(batch_size), n_train) // n_dev * n_dev  # whole batches on every device
  if batch < max(n_dev, 2):
    raise ValueError(f"batch_size={batch_size} with {n_train} train rows leaves no batch of >= 2 "
                     f"rows divisible by the {n_dev} devices of the mesh")
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}")
  steps_per_epoch = n_train // batch  # drop_last, as the reference's sampler
  total = epochs * steps_per_epoch
  warmup = int(WARMUP_PERCENT * total)
  if total <= warmup:
    raise ValueError(f"{total} updates are too few for the warmup + cosine schedule")
  # Peak LR per head (LinearLrScaler), the LR axis last in every head shape.
  peaks = np.broadcast_to(np.asarray(lrs, np.float64) * batch / 256, model.head_shape)
  train_step, eval_step = _step_fns(model, mesh, tuple(peaks.reshape(-1).tolist()), warmup, total,
                                    optimizer)
  state = init_state(model, mesh, seed)

  x_spec = _batch_spec(mesh, batch_axis, batch_ndim)
  y_spec = _batch_spec(mesh, 0, 1)
  put = knn._global_array  # the same host array on every process -> sharded global array
  chunk = max(n_dev, min(EVAL_CHUNK, len(test_labels)) // n_dev * n_dev)
  test_chunks = []
  for start in range(0, len(test_labels), chunk):
    rows = np.arange(start, min(start + chunk, len(test_labels)))
    pad = chunk - len(rows)
    rows = np.concatenate([rows, np.zeros(pad, rows.dtype)])
    mask = np.arange(chunk) < chunk - pad
    test_chunks.append((put(make_batch("test", rows, 0), x_spec),
                        put(test_labels[rows].astype(np.int32), y_spec), put(mask, y_spec)))

  if train_batches is None:
    def train_batches(epoch, rows_per_step):
      for rows in rows_per_step:
        yield (put(make_batch("train", rows, epoch), x_spec),
               put(train_labels[rows].astype(np.int32), y_spec))

  rng = np.random.default_rng(seed)
  counts, step, seconds = [], 0, []
  for epoch in progress_lib.trange(epochs, desc, progress):
    start = time.time()
    order = rng.permutation(n_train)
    # sorted within a batch: cheaper host gathers (BN and the mean loss do not see the order)
    rows_per_step = [np.sort(order[i * batch:(i + 1) * batch]) for i in range(steps_per_epoch)]
    for x, y in train_batches(epoch, rows_per_step):
      state = train_step(state, x, y, jnp.asarray(step, jnp.int32))
      step += 1
    counts.append(sum(eval_step(state, *c) for c in test_chunks))  # stays on device until the end
    jax.block_until_ready(counts[-1])
    seconds.append(time.time() - start)
  if step != total:
    raise RuntimeError(f"train_batches gave {step} batches for {total} steps; this is a bug")
  correct = np.stack([np.asarray(jax.device_get(c.addressable_data(0))) for c in counts])
  return dict(accuracy=correct / len(test_labels), batch_size=batch, steps=total, warmup=warmup,
              epoch_seconds=seconds)


# ------------------------------------------------------------------------------------ public API

def _labels(labels, n: int, name: str) -> np.ndarray:
  return knn._check_labels(labels, n, name)  # pylint: disable=protected-access


def _best(acc: np.ndarray, lrs: Sequence[float]) -> tuple[float, int, int]:
  """acc [epochs, L] -> (max accuracy, lr index, epoch index); first maximum wins."""
  epoch, lr_index = np.unravel_index(np.argmax(acc), acc.shape)
  return float(acc[epoch, lr_index]), int(lr_index), int(epoch)


def _summary(acc: np.ndarray, lrs: Sequence[float]) -> dict:
  top, lr_index, epoch = _best(acc, lrs)
  return dict(best=dict(accuracy=top, lr=float(lrs[lr_index]), epoch=epoch + 1),
              max_accuracy_by_lr={str(lr): float(acc[:, i].max()) for i, lr in enumerate(lrs)},
              final_accuracy_by_lr={str(lr): float(acc[-1, i]) for i, lr in enumerate(lrs)})


def linear_probe_grid(train: Mapping[str, np.ndarray], train_labels, test: Mapping[str, np.ndarray],
                      test_labels, *, lrs: Sequence[float] | None = None,
                      epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE,
                      seed: int = 0, mesh=None, progress: bool = True,
                      optimizer: str = "sgd") -> dict:
  """The DINOv2 linear-probe grid (section 10.2) on cached features, every head at once.

  Args:
    train, test: feature-set name -> `[N, D_name]` features (same names and widths in both).
      Train features may also be `[A, N, D_name]`: A copies of the train set under the
      reference's minimal augmentation (evaluate.py --probe-augment A); epoch e trains on copy
      e mod A, an approximation of the reference's fresh crop per epoch.
    train_labels, test_labels: `[N]` integer class ids.
    lrs: base learning rates (x batch / 256); default the 13 of DINOV2_LRS.
    epochs, batch_size: paper: PAPER_EPOCHS (50), PAPER_BATCH_SIZE (1024); the default 10 / 256
      suits a few thousand rows. The batch is rounded down to a multiple of the device count.
    seed: head init and shuffling.
    mesh: the batch is sharded over all its devices; default all devices.
    optimizer: "sgd" (the reference) or "lars".

  Returns:
    {"best": {"accuracy", "feature", "lr", "epoch"} (max test top-1 over grid and epochs; epoch is
    1-based), "features": {name: {"best", "max_accuracy_by_lr", "final_accuracy_by_lr"}},
    "lrs", "epochs", "batch_size", "lr_scale", "steps", "warmup_steps", "num_train", "num_test"}.
  """
  if not train or set(train) != set(test):
    raise ValueError(f"train and test must have the same non-empty feature sets, got "
                     f"{sorted(train)} and {sorted(test)}")
  names = list(train)
  train_x = {k: knn._to_numpy(train[k], f"train[{k!r}]") for k in names}
  test_x = {k: knn._to_numpy(test[k], f"test[{k!r}]") for k in names}
  n_test = len(test_x[names[0]])
  train_x = {k: x if x.ndim == 3 else x[None] for k, x in train_x.items()}  # [A, N, D]
  copies = len(train_x[names[0]])
  n_train = train_x[names[0]].shape[1]
  for k in names:
    if (train_x[k].ndim != 3 or test_x[k].ndim != 2
        or train_x[k].shape[2] != test_x[k].shape[1] or len(train_x[k]) != copies):
      raise ValueError(f"feature set {k!r}: need [N, D] (or [A, N, D]) train and [N, D] test "
                       f"with equal D, got {train_x[k].shape} and {test_x[k].shape}")
    if train_x[k].shape[1] != n_train or len(test_x[k]) != n_test:
      raise ValueError(f"feature set {k!r} has a different number of rows than {names[0]!r}")
  train_y = _labels(train_labels, n_train, "train_labels")
  test_y = _labels(test_labels, n_test, "test_labels")
  if n_test == 0:
    raise ValueError("the test set is empty")
  lrs = tuple(DINOV2_LRS if lrs is None else lrs)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  dim = max(x.shape[-1] for x in train_x.values())

  def make_batch(split, rows, epoch):  # [F, B, D_max], each set zero-padded to the widest
    out = np.zeros((len(names), len(rows), dim), np.float32)
    for i, k in enumerate(names):
      x = train_x[k][epoch % copies] if split == "train" else test_x[k]
      out[i, :, :x.shape[1]] = x[rows]
    return out

  model = LinearGrid(len(names), len(lrs), dim, max(num_classes, 2))
  run = train_heads(model, make_batch, train_y, test_y, batch_axis=1, batch_ndim=3, lrs=lrs,
                    epochs=epochs, batch_size=batch_size, seed=seed, mesh=mesh,
                    optimizer=optimizer, progress=progress, desc="linear probe grid")
  return dict(summarize_grid(run["accuracy"], names, lrs), lrs=[float(lr) for lr in lrs],
              epochs=int(epochs), batch_size=run["batch_size"], lr_scale=run["batch_size"] / 256,
              steps=run["steps"], warmup_steps=run["warmup"], num_train=n_train, num_test=n_test,
              optimizer=optimizer, augmented_copies=copies if copies > 1 else 0,
              augmentation=(f"{copies} fixed copies" if copies > 1 else "none (cached features)"),
              epoch_seconds=run["epoch_seconds"])


def summarize_grid(acc: np.ndarray, names: Sequence[str], lrs: Sequence[float]) -> dict:
  """acc [epochs, F, L] -> {"best": {"accuracy", "feature", "lr", "epoch"}, "features": ...}."""
  features = {k: _summary(acc[:, i], lrs) for i, k in enumerate(names)}
  best_name = max(names, key=lambda k: features[k]["best"]["accuracy"])  # first maximum wins
  return dict(best=dict(feature=best_name, **features[best_name]["best"]), features=features)


def selective_aggregation_probe(train_tokens, train_labels, test_tokens, test_labels, *,
                                lrs: Sequence[float] | None = None, epochs: int = DEFAULT_EPOCHS,
                                batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, mesh=None,
                                progress: bool = True, optimizer: str = "sgd") -> dict:
  """Selective aggregation (AbMILP -> BN -> Linear, beyond_cls_facts sections 1-3), LR grid.

  Args:
    train_tokens, test_tokens: `[N, T, D]` patch tokens of the last block, no CLS, no final norm
      (beyond_cls_facts section 2).
    Others as `linear_probe_grid`; the original: LARS, 90 epochs, batch 16384, lr 0.1 x bs/256
    (`optimizer="lars", lrs=(0.1,), epochs=90, batch_size=16384`, warmup 10% instead of 10 epochs).

  Returns:
    {"best": {"accuracy", "feature": "selective_aggregation", "lr", "epoch"},
    "max_accuracy_by_lr", "final_accuracy_by_lr", "lrs", "epochs", "batch_size", ...}.
  """
  train_t = knn._to_numpy(train_tokens, "train_tokens")
  test_t = knn._to_numpy(test_tokens, "test_tokens")
  if train_t.ndim != 3 or test_t.ndim != 3 or train_t.shape[2] != test_t.shape[2]:
    raise ValueError(f"tokens must be [N, T, D] with the same D, got {train_t.shape} and "
                     f"{test_t.shape}")
  if train_t.shape[1] != test_t.shape[1]:
    raise ValueError(f"train and test have different token counts: {train_t.shape[1]} vs "
                     f"{test_t.shape[1]}")
  train_y = _labels(train_labels, len(train_t), "train_labels")
  test_y = _labels(test_labels, len(test_t), "test_labels")
  if len(test_t) == 0:
    raise ValueError("the test set is empty")
  lrs = tuple(DINOV2_LRS if lrs is None else lrs)
  num_classes = max(int(max(train_y.max(), test_y.max())) + 1, 2)
  data = dict(train=train_t, test=test_t)
  model = SelectiveAggregation(len(lrs), train_t.shape[2], num_classes)
  run = train_heads(model, lambda split, rows, _: data[split][rows].astype(np.float32), train_y,
                    test_y, batch_axis=0, batch_ndim=3, lrs=lrs, epochs=epochs,
                    batch_size=batch_size, seed=seed, mesh=mesh, optimizer=optimizer,
                    progress=progress, desc="selective aggregation")
  summary = _summary(run["accuracy"], lrs)
  return dict(best=dict(feature="selective_aggregation", **summary["best"]),
              max_accuracy_by_lr=summary["max_accuracy_by_lr"],
              final_accuracy_by_lr=summary["final_accuracy_by_lr"],
              lrs=[float(lr) for lr in lrs], epochs=int(epochs), batch_size=run["batch_size"],
              lr_scale=run["batch_size"] / 256, steps=run["steps"], warmup_steps=run["warmup"],
              num_train=len(train_t), num_test=len(test_t), optimizer=optimizer)
