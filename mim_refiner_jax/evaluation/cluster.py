"""k-means clustering of features and the paper's clustering metrics.

The reference repo has no clustering code; the paper (section 5.3, App. C.12; refiner_facts.md
section 10.3) clusters the L2-normalised CLS embeddings of the IN-1k validation set with
scikit-learn's mini-batch k-means, 100 runs, reports the lowest-loss run (Table 3) and the
average (Table 9): cluster performance w.r.t. the ground truth (ACC (ClustPy: Hungarian matching),
NMI, AMI, ARI) and the class separation of the embedding "w.r.t. the ground truth classes"
(paper 5.3): silhouette (x100 in the paper, raw here) and Davies-Bouldin of the true labels,
which do not depend on the clustering (computed once).

Here:
  - rows are L2-normalised (clamp 1e-12), then k-means runs on the device, rows sharded over the
    mesh and centres replicated (XLA all-reduces the centre sums):
      * init: greedy k-means++ as scikit-learn's `_kmeans_plusplus` (2 + int(log k) candidates per
        step sampled proportionally to the squared distance, the one lowering the potential most
        kept), sampling by the Gumbel-max trick so it works on sharded rows;
      * "lloyd" (default): scikit-learn's Lloyd loop (stops when the labels do not change or the
        total squared centre shift <= tol x mean column variance; a final E-step makes labels and
        centres consistent). An empty cluster keeps its centre (scikit-learn moves it to the
        farthest point);
      * "minibatch": for sizes beyond one device: host-resident rows streamed in batches,
        scikit-learn's count-weighted centre update (without its low-count reassignment and early
        stopping), init on a random subset of 3 x batch rows, then one streamed pass for labels
        and inertia. The paper used scikit-learn's mini-batch k-means;
  - `restarts` runs from different seeds (one compiled function); the run of lowest inertia
    (the k-means loss the paper selects by) is "lowest_inertia", not the best accuracy;
  - metrics with scipy / scikit-learn on the host: ACC by `linear_sum_assignment` on the
    contingency table, NMI (arithmetic normalisation), AMI, ARI; class separation: silhouette
    (Euclidean) and Davies-Bouldin of the labels on all rows, or on a random sample of
    `separation_sample` rows when N is larger (the silhouette is O(N^2); the sample size is in
    the output).

Defaults fit MNIST-sized checks (1,000 x 96 in seconds): restarts=10; the paper: restarts=100,
algorithm="minibatch" (evaluation/presets.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as sk_metrics

from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.evaluation import progress as progress_lib

NORM_EPS = 1e-12
DEFAULT_RESTARTS = 10
PAPER_RESTARTS = 100
MAX_ITER = 300            # scikit-learn KMeans defaults
TOL = 1e-4
SEPARATION_SAMPLE = 50_000  # all of IN-1k val
MINIBATCH_SIZE = 1024     # scikit-learn MiniBatchKMeans default
MINIBATCH_EPOCHS = 10
HI = jax.lax.Precision.HIGHEST
_put = knn._global_array  # pylint: disable=protected-access  (host array -> global array)


# ---------------------------------------------------------------------------------- metrics

def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
  """Best one-to-one cluster -> class matching (Hungarian), as ClustPy's unsupervised ACC."""
  labels, clusters = np.asarray(labels), np.asarray(clusters)
  classes, label_ids = np.unique(labels, return_inverse=True)
  groups, cluster_ids = np.unique(clusters, return_inverse=True)
  table = np.zeros((len(groups), len(classes)), np.int64)
  np.add.at(table, (cluster_ids, label_ids), 1)
  rows, cols = linear_sum_assignment(table, maximize=True)
  return float(table[rows, cols].sum() / len(labels))


def clustering_metrics(labels: np.ndarray, clusters: np.ndarray) -> dict:
  """ACC, NMI, AMI, ARI of `clusters` against the ground-truth `labels`."""
  return dict(acc=cluster_accuracy(labels, clusters),
              nmi=float(sk_metrics.normalized_mutual_info_score(labels, clusters)),
              ami=float(sk_metrics.adjusted_mutual_info_score(labels, clusters)),
              ari=float(sk_metrics.adjusted_rand_score(labels, clusters)))


def class_separation(feats: np.ndarray, labels: np.ndarray, *,
                     sample: int = SEPARATION_SAMPLE, seed: int = 0) -> dict:
  """Silhouette and Davies-Bouldin of the ground-truth classes in `feats` (paper 5.3), on all rows
  or a random `sample` of them when there are more; "rows" says how many were used."""
  labels = np.asarray(labels)
  rows = len(feats)
  if len(np.unique(labels)) < 2:  # both scores need two classes
    return dict(silhouette=float("nan"), davies_bouldin=float("nan"), rows=rows, of=rows)
  if rows > sample:
    pick = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
    feats, labels = feats[pick], labels[pick]
  return dict(silhouette=float(sk_metrics.silhouette_score(feats, labels)),
              davies_bouldin=float(sk_metrics.davies_bouldin_score(feats, labels)),
              rows=int(len(feats)), of=int(rows))


# ----------------------------------------------------------------------------- device k-means

def _sq_dists(x, sqnorm, centres):
  """[N, k] squared Euclidean distances, clamped at 0."""
  d = sqnorm[:, None] - 2 * jnp.dot(x, centres.T, precision=HI) + jnp.sum(centres ** 2, 1)[None]
  return jnp.maximum(d, 0.0)


def _row_gumbel(key, n: int, trials: int | None = None):
  """Gumbel noise keyed by row index, so padding (which depends on the device count) does not
  change the draws of the real rows: [n] or [trials, n]."""
  shape = () if trials is None else (trials,)
  noise = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), shape))(jnp.arange(n))
  return noise if trials is None else noise.T


def kmeans_plusplus(x, valid, key, num_clusters: int):
  """Greedy k-means++ (scikit-learn's `_kmeans_plusplus`) on the valid rows of x -> [k, D]."""
  n, trials = x.shape[0], 2 + int(math.log(num_clusters))
  sqnorm = jnp.sum(x * x, axis=1)
  key_first, key_rest = jax.random.split(key)
  first = jnp.argmax(jnp.where(valid, _row_gumbel(key_first, n), -jnp.inf))
  centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
  d2 = jnp.where(valid, _sq_dists(x, sqnorm, x[first][None])[:, 0], 0.0)

  def body(i, carry):
    centres, d2 = carry
    # `trials` rows drawn with probability d2 / sum(d2) (Gumbel-max; chosen rows have d2 = 0).
    logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    gumbel = _row_gumbel(jax.random.fold_in(key_rest, i), n, trials)
    candidates = jnp.argmax(logits[None] + gumbel, axis=1)  # [trials]
    cand_d2 = jnp.minimum(d2[None], _sq_dists(x, sqnorm, x[candidates]).T)  # [trials, N]
    cand_d2 = jnp.where(valid[None], cand_d2, 0.0)
    best = jnp.argmin(jnp.sum(cand_d2, axis=1))
    return centres.at[i].set(x[candidates[best]]), cand_d2[best]

  centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, d2))
  return centres


def assign(x, valid, centres):
  """Nearest centre of every row and the inertia over the valid rows."""
  d = _sq_dists(x, jnp.sum(x * x, axis=1), centres)
  labels = jnp.argmin(d, axis=1).astype(jnp.int32)
  inertia = jnp.sum(jnp.where(valid, jnp.min(d, axis=1), 0.0))
  return labels, inertia


def lloyd(x, valid, centres, *, max_iter: int = MAX_ITER, tol: float = TOL):
  """scikit-learn's Lloyd loop from `centres` -> (centres, labels, inertia, iterations)."""
  k = centres.shape[0]
  n_valid = jnp.sum(valid).astype(x.dtype)
  mean = jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0) / n_valid
  variance = jnp.sum(jnp.where(valid[:, None], (x - mean) ** 2, 0.0), axis=0) / n_valid
  tol_abs = jnp.mean(variance) * tol  # scikit-learn's `_tolerance`

  def body(carry):
    centres, old_labels, it, _, _ = carry
    labels, _ = assign(x, valid, centres)
    one_hot = jax.nn.one_hot(labels, k, dtype=x.dtype) * valid[:, None]
    counts = jnp.sum(one_hot, axis=0)
    sums = jnp.dot(one_hot.T, x, precision=HI)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)
    unchanged = jnp.all((labels == old_labels) | ~valid)
    return new, labels, it + 1, jnp.sum((new - centres) ** 2), unchanged

  def keep_going(carry):
    _, _, it, shift, unchanged = carry
    return (it < max_iter) & ~unchanged & (shift > tol_abs)

  init = (centres, jnp.full(x.shape[0], -1, jnp.int32), 0, jnp.inf, False)
  centres, _, iters, _, _ = jax.lax.while_loop(keep_going, body, init)
  labels, inertia = assign(x, valid, centres)  # final E-step: labels match the centres
  return centres, labels, inertia, iters


@functools.lru_cache(maxsize=None)
def _lloyd_run_fn(mesh, num_clusters: int, max_iter: int, tol: float):
  rows, replicated = NamedSharding(mesh, P(tuple(mesh.axis_names))), NamedSharding(mesh, P())

  def run(x, valid, key):
    centres = kmeans_plusplus(x, valid, key, num_clusters)
    return lloyd(x, valid, centres, max_iter=max_iter, tol=tol)

  return jax.jit(run, in_shardings=(rows, rows, replicated),
                 out_shardings=(replicated, rows, replicated, replicated))


@functools.lru_cache(maxsize=None)
def _prepare_fn(mesh):
  rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))

  def normalise(x, valid):
    x = x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True)), NORM_EPS)
    return jnp.where(valid[:, None], x, 0.0)

  return jax.jit(normalise, out_shardings=rows)


@functools.lru_cache(maxsize=None)
def _minibatch_fns(mesh, num_clusters: int):
  rows, replicated = NamedSharding(mesh, P(tuple(mesh.axis_names))), NamedSharding(mesh, P())

  def init(x, valid, key):
    return kmeans_plusplus(x, valid, key, num_clusters)

  def update(centres, counts, x, valid):
    labels, _ = assign(x, valid, centres)
    one_hot = jax.nn.one_hot(labels, num_clusters, dtype=x.dtype) * valid[:, None]
    batch_counts = jnp.sum(one_hot, axis=0)
    new_counts = counts + batch_counts
    sums = jnp.dot(one_hot.T, x, precision=HI)
    new = (centres * counts[:, None] + sums) / jnp.maximum(new_counts, 1.0)[:, None]
    return jnp.where(batch_counts[:, None] > 0, new, centres), new_counts

  return (jax.jit(init, in_shardings=(rows, rows, replicated), out_shardings=replicated),
          jax.jit(update, out_shardings=replicated),
          jax.jit(assign, out_shardings=(rows, replicated)))


def _put_rows(mesh, x: np.ndarray, n_rows: int):
  """Host rows -> (x, valid) padded to `n_rows` (a multiple of the mesh size), row-sharded."""
  rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  pad = n_rows - len(x)
  return (_put(np.pad(x.astype(np.float32), ((0, pad), (0, 0))), rows),
          _put(np.arange(n_rows) < len(x), rows))


def _fetch(a) -> np.ndarray:
  return knn._to_numpy(a, "result")  # pylint: disable=protected-access


def kmeans(feats: np.ndarray, num_clusters: int, *, restarts: int = DEFAULT_RESTARTS,
           seed: int = 0, algorithm: str = "lloyd", max_iter: int = MAX_ITER, tol: float = TOL,
           batch_size: int = MINIBATCH_SIZE, epochs: int = MINIBATCH_EPOCHS, mesh=None,
           progress: bool = False) -> list[dict]:
  """k-means on the L2-normalised rows of `feats`, `restarts` runs.

  Returns one dict per run: {"labels" [N] int, "inertia", "centres" [k, D], "iterations"}.
  """
  mesh = mesh or knn.default_mesh()
  n, n_dev = len(feats), mesh.size
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters must be in [1, {n}] (the number of rows), got {num_clusters}")
  padded = -(-n // n_dev) * n_dev
  runs = []
  if algorithm == "lloyd":
    x, valid = _put_rows(mesh, feats, padded)
    x = _prepare_fn(mesh)(x, valid)
    run = _lloyd_run_fn(mesh, int(num_clusters), int(max_iter), float(tol))
    for r in progress_lib.trange(restarts, "k-means", progress):
      centres, labels, inertia, iters = run(x, valid, jax.random.fold_in(jax.random.key(seed), r))
      runs.append(dict(labels=_fetch(labels)[:n], inertia=float(_fetch(inertia)),
                       centres=_fetch(centres), iterations=int(_fetch(iters))))
    return runs
  if algorithm != "minibatch":
    raise ValueError(f"algorithm must be 'lloyd' or 'minibatch', got {algorithm!r}")
  # Rows stay on the host; every device step sees one batch.
  norms = np.linalg.norm(feats, axis=1, keepdims=True)
  feats = (feats / np.maximum(norms, NORM_EPS)).astype(np.float32)
  batch = max(n_dev, min(batch_size, n) // n_dev * n_dev)  # whole rows on every device
  init_rows = -(-min(n, max(3 * batch, 3 * num_clusters)) // n_dev) * n_dev
  init_fn, update_fn, assign_fn = _minibatch_fns(mesh, int(num_clusters))
  replicated = NamedSharding(mesh, P())
  for r in progress_lib.trange(restarts, "mini-batch k-means", progress):
    rng = np.random.default_rng([seed, r])
    subset = rng.choice(n, min(n, init_rows), replace=False)
    centres = init_fn(*_put_rows(mesh, feats[subset], init_rows),
                      jax.random.fold_in(jax.random.key(seed), r))
    counts = _put(np.zeros(num_clusters, np.float32), replicated)
    for _ in range(max(1, epochs * n // batch)):
      centres, counts = update_fn(centres, counts,
                                  *_put_rows(mesh, feats[rng.choice(n, batch, replace=batch > n)],
                                             batch))
    labels, inertia = [], 0.0
    for start in range(0, n, batch):
      chunk = feats[start:start + batch]
      lab, part = assign_fn(*_put_rows(mesh, chunk, batch), centres)
      labels.append(_fetch(lab)[:len(chunk)])
      inertia += float(_fetch(part))
    runs.append(dict(labels=np.concatenate(labels), inertia=inertia, centres=_fetch(centres),
                     iterations=max(1, epochs * n // batch)))
  return runs


# ------------------------------------------------------------------------------------ public

def clustering_eval(feats, labels, *, num_clusters: int | None = None,
                    restarts: int = DEFAULT_RESTARTS, seed: int = 0, mesh=None,
                    progress: bool = True, algorithm: str = "lloyd",
                    separation_sample: int = SEPARATION_SAMPLE, **kmeans_kwargs) -> dict:
  """k-means of the L2-normalised features: the paper's metrics of the lowest-inertia run and the
  mean over runs, and the class separation of the ground-truth labels.

  Args:
    feats: `[N, D]` features (the paper: CLS of the IN-1k validation set).
    labels: `[N]` class ids.
    num_clusters: default the number of distinct labels.
    restarts: k-means runs (paper: 100).
    algorithm: "lloyd" (full batch, on device) or "minibatch" (streamed from the host).
    separation_sample: silhouette / Davies-Bouldin on this many random rows when N is larger.
    kmeans_kwargs: max_iter, tol, batch_size, epochs of `kmeans`.

  Returns:
    {"lowest_inertia": {"acc", "nmi", "ami", "ari", "inertia", "run"} (the run the paper reports:
    lowest k-means loss), "mean": {same, mean over runs}, "std": {...}, "runs": [per-run],
    "class_separation": {"silhouette", "davies_bouldin", "rows", "of"} (ground-truth classes of
    the L2-normalised features), "num_clusters", "restarts", "algorithm"}.
  """
  x = knn._to_numpy(feats, "feats")  # pylint: disable=protected-access
  if x.ndim != 2:
    raise ValueError(f"feats must be [N, D], got {x.shape}")
  y = knn._check_labels(labels, len(x), "labels")  # pylint: disable=protected-access
  if restarts < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")
  k = int(num_clusters or len(np.unique(y)))
  runs = kmeans(x, k, restarts=restarts, seed=seed, algorithm=algorithm, mesh=mesh,
                progress=progress, **kmeans_kwargs)
  normed = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_EPS)
  per_run = [dict(clustering_metrics(y, run["labels"]), inertia=run["inertia"], run=i,
                  iterations=run["iterations"]) for i, run in enumerate(runs)]
  lowest = min(per_run, key=lambda r: r["inertia"])
  keys = ("acc", "nmi", "ami", "ari", "inertia")
  return dict(lowest_inertia=lowest,
              mean={key: float(np.mean([r[key] for r in per_run])) for key in keys},
              std={key: float(np.std([r[key] for r in per_run])) for key in keys},
              runs=per_run,
              class_separation=class_separation(normed, y, sample=separation_sample, seed=seed),
              num_clusters=k, restarts=int(restarts), algorithm=algorithm)
