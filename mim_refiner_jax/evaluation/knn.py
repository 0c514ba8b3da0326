"""Weighted k-NN classifier, jitted and sharded (../shared/reference/refiner_facts.md section 10.1).

The reference (`ml-jku/MIM-Refiner:src/metrics/knn.py::multiclass_knn`):
  1. mu = column mean of the train features, sigma = column *unbiased* std + 1e-6; standardise train
     and test with the train statistics ("batch_normalize", on by default);
  2. L2-normalise every row (norm clamped at 1e-12);
  3. s_n = <t, x_n>; the score of class c is the sum over the top-k train rows of exp(s_n / tau) *
     [y_n == c]; the prediction is the arg-max (first maximum, as torch);
  4. the number of classes is max(train, test label) + 1, at least 2; a k larger than the number
     of train rows is skipped. There is no self-exclusion.

Layout: the train bank `[N, D]` is sharded by rows over every device of the mesh and never gathered.
Test rows go through in chunks of one fixed size (the last one padded), replicated. Inside
`jax.shard_map` each device takes the top-k of its own rows; only these `k` candidates per device
(`[chunk, devices * k]`) leave the device, and their top-k is the global top-k. Padding and masked
train rows get similarity -inf, so they are never chosen. Several k come from one similarity pass:
the top-k of every k is a prefix of the sorted top-max(k). The similarity matmul runs in fp32 at
HIGHEST precision by default (parity with the float64 tests); `similarity_dtype="bfloat16"`
rounds the normalised features to bf16 with fp32 accumulation (an option: the reference's bf16
autocast wraps only the encoder forward, its `multiclass_knn` similarities are fp32).
"""

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

DEFAULT_K = 10
DEFAULT_TAU = 0.07
STD_EPS = 1e-6    # added to the unbiased std (section 10.1)
NORM_EPS = 1e-12  # clamp of the row norm, as torch.nn.functional.normalize
# k values of the MIM-baseline evaluation (section 10.1, `eval/knn/mim/*.yaml`).
MIM_BASELINE_KS = (1, 2, 3, 5, 10, 20, 30, 50, 100, 200)


def default_mesh() -> jax.sharding.Mesh:
  """One axis over every device of every process."""
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def _to_numpy(x, name: str) -> np.ndarray | None:
  if x is None:
    return None
  if isinstance(x, jax.Array):  # explicit transfers: fine under jax_transfer_guard="disallow"
    if not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  try:
    return np.asarray(x)
  except Exception as e:  # e.g. a torch tensor on an accelerator
    raise TypeError(f"{name}: cannot convert {type(x).__name__} to a numpy array ({e}); pass "
                    "numpy or jax arrays") from e


def _check_mask(mask, n: int, name: str) -> np.ndarray:
  if mask is None:
    return np.ones(n, bool)
  mask = _to_numpy(mask, name)
  if mask.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) like the features, got {mask.shape}")
  return mask.astype(bool)


def _check_labels(labels, n: int, name: str) -> np.ndarray:
  labels = _to_numpy(labels, name)
  if labels.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) (one label per feature row), got "
                     f"{labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(labels == np.round(labels)):
      raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise ValueError(f"{name} must be >= 0 (class ids), got min {labels.min()}")
  return labels


def _l2_normalize(x: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, NORM_EPS)


def _row_spec(mesh) -> P:
  return P(tuple(mesh.axis_names))  # rows over all mesh axes: every device holds a slice


@functools.lru_cache(maxsize=None)
def _prepare_train_fn(mesh, standardize: bool):
  """Jitted (train, valid) -> (standardised and L2-normalised train, mu, sigma)."""
  rows, replicated = NamedSharding(mesh, _row_spec(mesh)), NamedSharding(mesh, P())

  def prepare(x, valid):
    x = x.astype(jnp.float32)
    keep = valid[:, None]
    if standardize:
      n = jnp.sum(valid).astype(jnp.float32)
      mu = jnp.sum(jnp.where(keep, x, 0.0), axis=0) / n
      centred = jnp.where(keep, x - mu, 0.0)  # two-pass variance: no cancellation
      sigma = jnp.sqrt(jnp.sum(centred * centred, axis=0) / (n - 1.0)) + STD_EPS  # unbiased
      x = (x - mu) / sigma
    else:
      mu = jnp.zeros(x.shape[1], jnp.float32)
      sigma = jnp.ones(x.shape[1], jnp.float32)
    x = jnp.where(keep, _l2_normalize(x), 0.0)
    return x, mu, sigma

  return jax.jit(prepare, out_shardings=(rows, replicated, replicated))


@functools.lru_cache(maxsize=None)
def _predict_chunk_fn(mesh, ks: tuple[int, ...], tau: float, num_classes: int, precision,
                      similarity_dtype=jnp.float32):
  """Jitted chunk classifier; compiled once per (train shape, chunk shape) for these settings.

  (train, train_labels, train_valid, mu, sigma, test_chunk) ->
    predictions [len(ks), chunk], top similarities [chunk, max(ks)], their labels [chunk, max(ks)].
  """
  rows = _row_spec(mesh)
  k_max = max(ks)

  def local_top_k(test, train, labels, valid):
    # Per device: [chunk, D] x [n_local, D] -> the k best of this device's rows.
    test, train = test.astype(similarity_dtype), train.astype(similarity_dtype)
    sims = jnp.dot(test, train.T, precision=precision, preferred_element_type=jnp.float32)
    sims = jnp.where(valid[None, :], sims, -jnp.inf)  # padding / masked rows never win
    top_sims, top_idx = jax.lax.top_k(sims, k_max)
    return top_sims, labels[top_idx]

  # Candidates come back as [chunk, devices * k_max]: only k rows per device leave the device.
  sharded_top_k = jax.shard_map(local_top_k, mesh=mesh, in_specs=(P(), rows, rows, rows),
                                out_specs=(P(None, rows[0]), P(None, rows[0])))

  def predict(train, train_labels, train_valid, mu, sigma, test):
    test = _l2_normalize((test.astype(jnp.float32) - mu) / sigma)
    cand_sims, cand_labels = sharded_top_k(test, train, train_labels, train_valid)
    top_sims, pos = jax.lax.top_k(cand_sims, k_max)  # sorted, best first
    top_labels = jnp.take_along_axis(cand_labels, pos, axis=1)
    weights = jnp.exp(top_sims / tau)  # exp(-inf) = 0 for (impossible) padding picks
    rank = jnp.arange(k_max)[None, :]
    row = jnp.arange(test.shape[0])[:, None]
    predictions = []
    for k in ks:  # the top-k for every k is a prefix of the sorted top-k_max
      votes = jnp.where(rank < k, weights, 0.0)
      scores = jnp.zeros((test.shape[0], num_classes), jnp.float32).at[row, top_labels].add(votes)
      predictions.append(jnp.argmax(scores, axis=1))
    return jnp.stack(predictions).astype(jnp.int32), top_sims, top_labels

  return jax.jit(predict, out_shardings=NamedSharding(mesh, P()))


def _global_array(host: np.ndarray, sharding) -> jax.Array:
  """The same full host array on every process -> global array with `sharding`.

  With global_shape == local shape each process places its devices' slices of the full array; the
  transfer is explicit (allowed under jax_transfer_guard="disallow").
  """
  return jax.make_array_from_process_local_data(sharding, host, global_shape=host.shape)


def _fetch(x: jax.Array) -> np.ndarray:
  return np.asarray(jax.device_get(x.addressable_data(0)))  # replicated: any shard is all of it


def knn_predict(train_feats, train_labels, test_feats, *, k: int | Sequence[int] = DEFAULT_K,
                tau: float = DEFAULT_TAU, standardize: bool = True, num_classes: int | None = None,
                train_mask=None, test_mask=None, test_labels=None, mesh=None, chunk: int = 1024,
                precision=jax.lax.Precision.HIGHEST, similarity_dtype="float32") -> dict:
  """k-NN predictions for every test row (section 10.1).

  Args:
    train_feats: `[N_train, D]` numpy or jax array (the same on every process).
    train_labels: `[N_train]` integer class ids.
    test_feats: `[N_test, D]`.
    k: one k or several (evaluated together from one top-max(k)); k > number of valid train rows
      is skipped, as in the reference.
    tau: temperature of the exp(s / tau) votes.
    standardize: standardise with the train mean and unbiased std + 1e-6 before L2 normalisation.
    num_classes: classes to score; default max(valid train and test labels) + 1, at least 2.
    train_mask, test_mask: `[N]` bool, False for padding rows. Masked train rows are never
      neighbours and do not enter mu / sigma; masked test rows get prediction -1.
    test_labels: only used for the default `num_classes`.
    mesh: devices holding the train bank (rows sharded over all its axes); default all devices.
    chunk: test rows per jitted call; every call has this shape (the last chunk is padded).
      Each device holds a `[chunk, N_train / devices]` fp32 similarity block: lower `chunk` for a
      large bank on few devices (IN-1k on 1 GPU: 1024 x 1.28M x 4 B = 5.2 GB).
    precision: matmul precision of the similarities.
    similarity_dtype: "float32" (default) or "bfloat16" (the paper's runs): the dtype the
      normalised features are rounded to for the similarity matmul (accumulation stays fp32).

  Returns:
    dict with "ks" (the k values kept), "predictions" `[len(ks), N_test]` int32, "similarities"
    `[N_test, max(ks)]` (best first) and "neighbor_labels" `[N_test, max(ks)]`, "num_classes".
  """
  train_x = _to_numpy(train_feats, "train_feats")
  test_x = _to_numpy(test_feats, "test_feats")
  if train_x.ndim != 2 or test_x.ndim != 2:
    raise ValueError(f"features must be 2-D [N, D]; got train {train_x.shape}, test {test_x.shape}")
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train and test feature widths differ: {train_x.shape[1]} vs "
                     f"{test_x.shape[1]}")
  n_train, n_test = len(train_x), len(test_x)
  if n_test == 0:
    raise ValueError("test_feats is empty")
  train_y = _check_labels(train_labels, n_train, "train_labels")
  train_valid = _check_mask(train_mask, n_train, "train_mask")
  test_valid = _check_mask(test_mask, n_test, "test_mask")
  n_valid = int(train_valid.sum())
  if n_valid < (2 if standardize else 1):
    raise ValueError(f"k-NN needs at least {2 if standardize else 1} valid train rows (the "
                     f"unbiased std needs 2), got {n_valid}")

  requested = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
  if not requested or any(int(kk) < 1 for kk in requested):
    raise ValueError(f"k must be a positive int or a non-empty sequence of them, got {k!r}")
  ks = tuple(int(kk) for kk in requested if int(kk) <= n_valid)
  if len(ks) < len(requested):
    logging.warning("k-NN: skipping k=%s (only %d valid train rows)",
                    [kk for kk in requested if kk > n_valid], n_valid)
  if not ks:
    raise ValueError(f"every k in {requested} exceeds the {n_valid} valid train rows")
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}")

  max_label = int(train_y[train_valid].max())
  if num_classes is None:
    if test_labels is not None:
      test_y = _check_labels(test_labels, n_test, "test_labels")
      if test_valid.any():
        max_label = max(max_label, int(test_y[test_valid].max()))
    num_classes = max(max_label + 1, 2)
  elif num_classes <= max_label:
    raise ValueError(f"num_classes={num_classes} but the train labels go up to {max_label}")

  mesh = mesh or default_mesh()
  n_shards = mesh.size
  k_max = max(ks)
  # Each device needs >= k_max rows for its local top-k; padding rows are masked out.
  per_shard = max(-(-n_train // n_shards), k_max)
  n_pad = per_shard * n_shards - n_train
  rows = NamedSharding(mesh, _row_spec(mesh))
  train = _global_array(np.pad(train_x.astype(np.float32), ((0, n_pad), (0, 0))), rows)
  train_lab = _global_array(np.pad(train_y.astype(np.int32), (0, n_pad)), rows)
  train_ok = _global_array(np.pad(train_valid, (0, n_pad)), rows)
  train, mu, sigma = _prepare_train_fn(mesh, bool(standardize))(train, train_ok)

  sim_dtype = jnp.dtype(similarity_dtype)
  if sim_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"similarity_dtype must be float32 or bfloat16, got {similarity_dtype!r}")
  predict = _predict_chunk_fn(mesh, ks, float(tau), int(num_classes), precision, sim_dtype)
  chunk = max(1, min(int(chunk), n_test))
  replicated = NamedSharding(mesh, P())
  outputs = []
  for start in range(0, n_test, chunk):  # dispatch all chunks first, fetch afterwards
    block = test_x[start:start + chunk].astype(np.float32)
    block = np.pad(block, ((0, chunk - len(block)), (0, 0)))
    outputs.append(predict(train, train_lab, train_ok, mu, sigma,
                           _global_array(block, replicated)))
  predictions = np.concatenate([_fetch(o[0]) for o in outputs], axis=1)[:, :n_test]
  predictions[:, ~test_valid] = -1
  return dict(ks=ks, num_classes=int(num_classes), predictions=predictions,
              similarities=np.concatenate([_fetch(o[1]) for o in outputs])[:n_test],
              neighbor_labels=np.concatenate([_fetch(o[2]) for o in outputs])[:n_test])


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *,
                 k: int | Sequence[int] = DEFAULT_K, tau: float = DEFAULT_TAU,
                 standardize: bool = True, num_classes: int | None = None, train_mask=None,
                 test_mask=None, mesh=None, chunk: int = 1024,
                 precision=jax.lax.Precision.HIGHEST, similarity_dtype="float32") -> dict:
  """Top-1 accuracy of the weighted k-NN classifier over the valid test rows (section 10.1).

  Arguments as `knn_predict`. For an int `k` returns `{"accuracy": float, "num_correct": int,
  "num_test": int}`; for a sequence of k, "accuracy" and "num_correct" are dicts keyed by k
  (k values larger than the number of valid train rows are left out).
  """
  out = knn_predict(train_feats, train_labels, test_feats, k=k, tau=tau, standardize=standardize,
                    num_classes=num_classes, train_mask=train_mask, test_mask=test_mask,
                    test_labels=test_labels, mesh=mesh, chunk=chunk, precision=precision,
                    similarity_dtype=similarity_dtype)
  n_test = len(out["similarities"])
  test_y = _check_labels(test_labels, n_test, "test_labels")
  valid = _check_mask(test_mask, n_test, "test_mask")
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("no valid test rows (test_mask is all False)")
  correct = {kk: int(np.sum((pred == test_y) & valid))
             for kk, pred in zip(out["ks"], out["predictions"])}
  accuracy = {kk: c / num_valid for kk, c in correct.items()}
  if isinstance(k, (int, np.integer)):
    return dict(accuracy=accuracy[int(k)], num_correct=correct[int(k)], num_test=num_valid)
  return dict(accuracy=accuracy, num_correct=correct, num_test=num_valid)
