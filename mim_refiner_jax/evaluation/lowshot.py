"""Low-shot evaluation: multinomial logistic regression on k-shot and percent splits.

Reference (../shared/reference/refiner_facts.md section 10.3;
`ml-jku/MIM-Refiner:src/callbacks/offline_callbacks/offline_logreg_callback.py`, after
`facebookresearch/msn:logistic_eval.py`):
  - cyanure `MultiClassifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False)`,
    lambda = 0.00025 / n_train, tol 1e-3 (relative duality gap), max 300 epochs;
  - cyanure's objective is (1/n) sum_i CE(W^T x_i, y_i) + (lambda / 2) ||W||_F^2 with W [D, C]
    and C = max label + 1 (`cyanure.py` ERM docstring, `multi_logistic_loss.h`, `regularizers.h`
    Ridge). scikit-learn's `LogisticRegression` minimises sum_i CE + ||W||^2 / (2 C_sk), the same
    objective times 1 / lambda n, so C_sk = 1 / (lambda n) (= 4000 for lambda = 0.00025 / n;
    tests/test_lowshot.py checks the mapping numerically);
  - preprocessing `preprocess(train_x, normalize=True, columns=False, centering=True)`: cyanure
    transposes X and, with columns=False, runs `Matrix::center()` and `Matrix::normalize()` on the
    columns of X^T, i.e. each *row* (sample) is centred by its own mean over the features, then
    L2-normalised (`cyanure_wrap_module.cpp::preprocess_generic`, `matrix.h`). There is no train
    mean: centering is per sample.
  - MIM-Refiner preprocesses only the train features; `classifier.score(test_x)` sees the raw test
    features (L2 scaling cannot change the arg-max, the per-row centering can). MSN preprocesses
    both. `preprocess_test=False` (default) reproduces MIM-Refiner, True MSN.

Solvers (both minimise exactly the objective above):
  - "jax": L-BFGS (optax.lbfgs, zoom line search) in one jitted while loop on the device, rows
    sharded over the mesh (padded to a power-of-two bucket and masked, so few compiles);
  - "sklearn": `LogisticRegression(C=1/(lambda n), fit_intercept=False, solver="lbfgs")`.
  Both stop as cyanure does: relative duality gap (P - D) / P <= tol = 1e-3 (`duality_gap`), or
  max_iter iterations. The JAX solver checks the gap in fp32 on the device every 10 iterations:
  tolerances below ~1e-5 are below its resolution.
  The default is "jax". `tools/bench_lowshot.py --n 12800 --dim 1024 --classes 1000
  --iterations 20 --noise 4` (1% of ImageNet-1k, 2 shared CPU cores, noisy) gave: scikit-learn
  7.8 s per iteration (gap 1.2e-6 after 20), JAX 3.4 s per iteration (gap 2.8e-3 after 20, so
  it needs more iterations for cyanure's 1e-3: fp32 L-BFGS with optax's zoom line search makes
  less progress per iteration at lambda = 2e-8 than scipy's L-BFGS-B in float64). At 2,560 x 256
  x 200 (`--n 2560 --dim 256 --classes 200`) JAX was ahead on both: 0.019 vs 0.51 s per
  iteration, gap 0.014 vs 0.032 after 20. On a CPU the time to tol 1e-3 is comparable at 1%;
  the full 1.28M x 1024 x 1000 problem costs ~2.6 TFLOP per iteration, which only an
  accelerator makes practical, and only the JAX solver runs there (sharded over rows, one
  compile per shape bucket: 30-60 s on this CPU).

Splits: k images per class and p% of the train set (stratified: round(p/100 n_c), at least 1 per
class), sampled without replacement from `np.random.default_rng([seed, k or p-code])` when no
split files are given. With `split_dir`, MSN's files are read (`facebookresearch/msn`
`imagenet_subsets{1,2,3}/{1,2,5}imgs_class.txt`, `1percent.txt`: one image file name per line,
e.g. `n01440764_10026.JPEG`): file names are matched to `train_names` by base name; lines that
are integers are train-row indices. `split_dir` holds the files directly (one split) or one
sub-directory per split (e.g. MSN's `imagenet_subsets1..3`; its third set names the 5-shot file
`3imgs_class.txt` although it lists 5 images per class: rename it `5imgs_class.txt`).

Defaults: the reference's lambda, preprocessing and tolerance; max_iter=1000 L-BFGS iterations
(cyanure: 300 epochs of its incremental solver). On MNIST-sized data (4,000 x 96, 10 classes) the
4 settings x 3 seeds finish in seconds.
"""

import functools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.evaluation import progress as progress_lib

LAMBDA_TIMES_N = 0.00025   # lambda = 0.00025 / n_train (offline_logreg_callback.py, MSN)
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-3         # relative duality gap, as cyanure's tol (offline_logreg_callback.py)
CHECK_EVERY = 10           # gap checked every 10 iterations (cyanure's it0=10, in epochs)
SKLEARN_CHUNK = 50
NORM_EPS = 1e-10           # cyanure leaves rows with norm <= 1e-10 (it re-draws them at random)
_check_labels = knn._check_labels  # pylint: disable=protected-access  (shared input checks)


def cyanure_preprocess(x: np.ndarray) -> np.ndarray:
  """cyanure `preprocess(x, centering=True, normalize=True, columns=False)`, not in place."""
  x = np.asarray(x, np.float32)
  x = x - x.mean(axis=1, keepdims=True)  # each sample's own mean over its features
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return np.where(norm > NORM_EPS, x / np.maximum(norm, NORM_EPS), x)


def sklearn_c(lambd: float, n_train: int) -> float:
  """scikit-learn's C for cyanure's lambda: C = 1 / (lambda n)."""
  return 1.0 / (lambd * n_train)


def objective(w: np.ndarray, x: np.ndarray, y: np.ndarray, lambd: float) -> float:
  """cyanure's objective (1/n) sum CE + lambda/2 ||W||^2 in float64 (W [D, C])."""
  logits = x.astype(np.float64) @ w.astype(np.float64)
  top = logits.max(axis=1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
  ce = lse - logits[np.arange(len(y)), y]
  return float(ce.mean() + 0.5 * lambd * np.sum(w.astype(np.float64) ** 2))


def relative_gap(w: np.ndarray, x: np.ndarray, y: np.ndarray, lambd: float) -> float:
  """(P - D) / P of `duality_gap` in float64 on the host."""
  w, x = w.astype(np.float64), x.astype(np.float64)
  logits = x @ w
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  kappa = probs.copy()
  kappa[np.arange(len(y)), y] -= 1.0
  value = objective(w, x, y, lambd)
  entropy = -np.mean(np.sum(probs * np.log(np.where(probs > 0, probs, 1.0)), axis=1))
  data_grad = x.T @ kappa / len(x)
  return float((value - (entropy - 0.5 / lambd * np.sum(data_grad ** 2))) / value)


# ------------------------------------------------------------------------------------- solvers

def duality_gap(value, grad, w, probs, valid, lambd):
  """cyanure's stopping quantity: primal minus dual at the dual point kappa_i = grad_i L.

  For P(W) = (1/n) sum_i L_i(x_i W) + lambda/2 ||W||^2 with L_i the multinomial CE, the Fenchel
  dual at kappa_i = p_i - e_{y_i} (the gradient of L_i in the logits) is
  D = (1/n) sum_i H(p_i) - 1/(2 lambda) ||(1/n) X^T kappa||^2, where H is the entropy
  (L*(kappa) = sum_j p_j log p_j, cyanure `MultiClassLogisticLoss::fenchel`) and
  (1/n) X^T kappa = grad P - lambda W. P - D >= 0, and 0 at the optimum.
  """
  n = jnp.sum(valid).astype(jnp.float32)
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
  entropy = -jnp.sum(jnp.where(valid[:, None], plogp, 0.0)) / n
  data_grad = grad - lambd * w
  return value - (entropy - 0.5 / lambd * jnp.sum(data_grad * data_grad))


@functools.lru_cache(maxsize=None)
def _lbfgs_fn(mesh, num_classes: int, check_every: int):
  """Jitted (x [N, D] row-sharded, y, valid, lambda, max_iter, tol) -> (W, value, iters, gap).

  L-BFGS until the relative duality gap (P - D) / P <= tol, checked every `check_every`
  iterations as cyanure does (`it0`), or `max_iter` iterations.
  """
  axes = tuple(mesh.axis_names)
  rows, replicated = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
  hi = jax.lax.Precision.HIGHEST

  def fit(x, y, valid, lambd, max_iter, tol):  # scalars traced: one compile per shape
    n = jnp.sum(valid).astype(jnp.float32)

    def fun(w):
      logits = jnp.dot(x, w, precision=hi)
      picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
      ce = jax.nn.logsumexp(logits, axis=1) - picked
      return jnp.sum(jnp.where(valid, ce, 0.0)) / n + 0.5 * lambd * jnp.sum(w * w)

    def relative_gap(w):
      value, grad = jax.value_and_grad(fun)(w)
      probs = jax.nn.softmax(jnp.dot(x, w, precision=hi), axis=1)
      return duality_gap(value, grad, w, probs, valid, lambd) / value

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
      w, state, gap = carry
      value, grad = value_and_grad(w, state=state)
      updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=fun)
      w = optax.apply_updates(w, updates)
      count = optax.tree_utils.tree_get(state, "count")
      gap = jax.lax.cond(count % check_every == 0, relative_gap, lambda _: gap, w)
      return w, state, gap

    def keep_going(carry):
      _, state, gap = carry
      return (optax.tree_utils.tree_get(state, "count") < max_iter) & (gap > tol)

    w0 = jnp.zeros((x.shape[1], num_classes), jnp.float32)
    w, state, _ = jax.lax.while_loop(keep_going, step, (w0, opt.init(w0), jnp.float32(jnp.inf)))
    return w, fun(w), optax.tree_utils.tree_get(state, "count"), relative_gap(w)

  return jax.jit(fit, in_shardings=(rows, rows, rows) + (replicated,) * 3,
                 out_shardings=replicated)


def _bucket(n: int, n_dev: int) -> int:
  """Rows after padding: a power of two >= 256, a multiple of n_dev (few distinct compiles)."""
  size = max(256, 1 << (n - 1).bit_length())
  return -(-size // n_dev) * n_dev


def fit_logreg(x: np.ndarray, y: np.ndarray, *, lambd: float, num_classes: int | None = None,
               solver: str = "jax", max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL,
               mesh=None) -> dict:
  """Minimises (1/n) sum CE(x_i W, y_i) + lambda/2 ||W||^2 (no intercept) on preprocessed x.

  Returns {"w": [D, C] float32, "objective", "relative_gap", "iterations", "seconds"}.
  Both stop at relative duality gap (P - D) / P <= tol (cyanure's criterion) or max_iter
  L-BFGS iterations; "sklearn" runs warm-started chunks of SKLEARN_CHUNK iterations between
  gap checks (each chunk restarts its L-BFGS memory).
  """
  x = np.asarray(x, np.float32)
  num_classes = int(num_classes or y.max() + 1)
  start = time.perf_counter()
  if solver == "jax":
    mesh = mesh or knn.default_mesh()
    n = len(x)
    pad = _bucket(n, mesh.size) - n  # masked rows: no loss, no gradient
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    put = knn._global_array  # pylint: disable=protected-access
    w, _, iters, gap = _lbfgs_fn(mesh, num_classes, CHECK_EVERY)(
        put(np.pad(x, ((0, pad), (0, 0))), rows), put(np.pad(y.astype(np.int32), (0, pad)), rows),
        put(np.arange(n + pad) < n, rows), np.float32(lambd), np.int32(max_iter),
        np.float32(tol))
    w = np.asarray(jax.device_get(w.addressable_data(0)))
    iters = int(iters.addressable_data(0))
    gap = float(gap.addressable_data(0))
  elif solver == "sklearn":
    import warnings  # pylint: disable=g-import-not-at-top
    from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
    present = np.unique(y)
    if len(present) == 2:
      raise ValueError("solver='sklearn' fits a binomial model for 2 classes (not cyanure's "
                       "multinomial); use solver='jax'")
    # Warm-started chunks of SKLEARN_CHUNK iterations, the gap checked between them.
    clf = LogisticRegression(C=sklearn_c(lambd, len(x)), fit_intercept=False, solver="lbfgs",
                             max_iter=SKLEARN_CHUNK, tol=0.0, warm_start=True)
    iters, gap = 0, np.inf
    while iters < max_iter and gap > tol:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
      iters += int(np.max(clf.n_iter_))
      w = np.zeros((x.shape[1], num_classes), np.float32)
      w[:, present] = clf.coef_.T  # classes absent from the train split keep zero weights
      gap = relative_gap(w, x, y, lambd)
      if np.max(clf.n_iter_) < SKLEARN_CHUNK:  # converged to its own precision
        break
  else:
    raise ValueError(f"solver must be 'jax' or 'sklearn', got {solver!r}")
  seconds = time.perf_counter() - start
  return dict(w=w, objective=objective(w, x, y, lambd), relative_gap=gap, iterations=iters,
              seconds=seconds)


# -------------------------------------------------------------------------------------- splits

def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """`shots` train rows per class (sorted row indices), deterministic in (seed, shots)."""
  rng = np.random.default_rng([seed, shots])
  picked = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    if len(rows) < shots:
      raise ValueError(f"class {c} has {len(rows)} train rows, fewer than {shots} shots")
    picked.append(rng.choice(rows, shots, replace=False))
  return np.sort(np.concatenate(picked))


def sample_percent(labels: np.ndarray, percent: float, seed: int) -> np.ndarray:
  """`percent`% of the train rows, stratified (round(p/100 n_c), at least 1 per class)."""
  rng = np.random.default_rng([seed, 1_000_000 + int(round(percent * 1000))])
  picked = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    count = min(len(rows), max(1, int(round(len(rows) * percent / 100))))
    picked.append(rng.choice(rows, count, replace=False))
  return np.sort(np.concatenate(picked))


def split_file_name(setting: str) -> str:
  """'1shot' -> '1imgs_class.txt', '1percent' -> '1percent.txt' (MSN's names)."""
  if setting.endswith("shot"):
    return f"{setting[:-4]}imgs_class.txt"
  return f"{setting}.txt"


def read_split_file(path: str, n_train: int, train_names: Sequence[str] | None) -> np.ndarray:
  """Train-row indices listed in an MSN split file (file names or integer indices)."""
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise ValueError(f"split file {path} is empty")
  if all(line.lstrip("-").isdigit() for line in lines):
    rows = np.asarray([int(line) for line in lines])
    if rows.min() < 0 or rows.max() >= n_train:
      raise ValueError(f"split file {path}: indices must be in [0, {n_train}), got "
                       f"[{rows.min()}, {rows.max()}]")
    return rows
  if train_names is None:
    raise ValueError(f"split file {path} lists file names; pass train_names (the file name of "
                     "every train row) to match them")
  if len(train_names) != n_train:
    raise ValueError(f"train_names has {len(train_names)} entries for {n_train} train rows")
  by_name = {os.path.basename(str(name)): i for i, name in enumerate(train_names)}
  missing = [line for line in lines if os.path.basename(line) not in by_name]
  if missing:
    raise ValueError(f"split file {path}: {len(missing)} of {len(lines)} names are not among the "
                     f"train names, e.g. {missing[:3]}")
  return np.asarray([by_name[os.path.basename(line)] for line in lines])


def _split_dirs(split_dir: str) -> list[str]:
  if not os.path.isdir(split_dir):
    raise ValueError(f"split_dir {split_dir!r} is not a directory")
  subdirs = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  return [os.path.join(split_dir, d) for d in subdirs] or [split_dir]


# -------------------------------------------------------------------------------------- public

def lowshot_eval(train_feats, train_labels, test_feats, test_labels, *,
                 shots: Sequence[int] = (1, 2, 5), percents: Sequence[float] = (1.0,),
                 seeds: Sequence[int] = (0, 1, 2), split_dir: str | None = None,
                 train_names: Sequence[str] | None = None, lambda_times_n: float = LAMBDA_TIMES_N,
                 preprocess_test: bool = False, solver: str = "jax",
                 max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL, mesh=None,
                 progress: bool = True) -> dict:
  """k-shot and percent logistic-regression accuracy, mean and spread over splits.

  Args:
    train_feats, test_feats: `[N, D]` features (the reference: last-block CLS, no norm).
    train_labels, test_labels: `[N]` integer class ids.
    shots: images per class; percents: percent of the train set.
    seeds: split seeds (ignored with split_dir, whose sub-directories are the splits).
    split_dir, train_names: MSN split files and the file name of every train row (module doc).
    lambda_times_n: lambda = lambda_times_n / n_train.
    preprocess_test: also preprocess the test features (MSN); False is MIM-Refiner.
    solver, max_iter, tol, mesh: see `fit_logreg`.

  Returns:
    {"settings": {"1shot": {"mean", "std", "accuracies", "splits", "num_train", "iterations",
    "seconds"}, ..., "1percent": ...}, "lambda_times_n", "solver", "preprocess_test", "num_test"}.
    std is the population std (ddof=0) over the splits.
  """
  train_x = knn._to_numpy(train_feats, "train_feats")  # pylint: disable=protected-access
  test_x = knn._to_numpy(test_feats, "test_feats")  # pylint: disable=protected-access
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"features must be [N, D] with the same D, got {train_x.shape} and "
                     f"{test_x.shape}")
  train_y = _check_labels(train_labels, len(train_x), "train_labels")
  test_y = _check_labels(test_labels, len(test_x), "test_labels")
  if len(test_x) == 0:
    raise ValueError("the test set is empty")
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  settings = [f"{int(k)}shot" for k in shots] + [f"{p:g}percent" for p in percents]
  if split_dir is not None:
    dirs = _split_dirs(split_dir)
    split_names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    for d in dirs:
      for s in settings:
        if not os.path.exists(os.path.join(d, split_file_name(s))):
          raise ValueError(f"split_dir: {os.path.join(d, split_file_name(s))} is missing; pass "
                           "shots/percents that have files, or add the file")
  else:
    split_names = [int(s) for s in seeds]
  if not split_names:
    raise ValueError("no splits: give at least one seed or a split_dir with split files")

  test_in = cyanure_preprocess(test_x) if preprocess_test else test_x.astype(np.float32)
  results = {}
  jobs = [(s, i) for s in settings for i in range(len(split_names))]
  for setting, i in progress_lib.iterate(jobs, "low-shot", progress):
    if split_dir is not None:
      rows = read_split_file(os.path.join(dirs[i], split_file_name(setting)), len(train_x),
                             train_names)
    elif setting.endswith("shot"):
      rows = sample_shots(train_y, int(setting[:-4]), split_names[i])
    else:
      rows = sample_percent(train_y, float(setting[:-7]), split_names[i])
    x = cyanure_preprocess(train_x[rows])
    fit = fit_logreg(x, train_y[rows], lambd=lambda_times_n / len(rows), num_classes=num_classes,
                     solver=solver, max_iter=max_iter, tol=tol, mesh=mesh)
    accuracy = float(np.mean(np.argmax(test_in @ fit["w"], axis=1) == test_y))
    entry = results.setdefault(setting, dict(accuracies=[], splits=[], num_train=[],
                                             iterations=[], seconds=[]))
    entry["accuracies"].append(accuracy)
    entry["splits"].append(split_names[i])
    entry["num_train"].append(int(len(rows)))
    entry["iterations"].append(fit["iterations"])
    entry["seconds"].append(round(fit["seconds"], 3))
  for entry in results.values():
    entry["mean"] = float(np.mean(entry["accuracies"]))
    entry["std"] = float(np.std(entry["accuracies"]))
  splits_from = (f"MSN split files in {split_dir}" if split_dir is not None
                 else f"seeded splits (seeds {', '.join(str(s) for s in split_names)})")
  return dict(settings=results, splits_from=splits_from, num_splits=len(split_names),
              lambda_times_n=float(lambda_times_n), solver=solver,
              preprocess_test=bool(preprocess_test), num_test=int(len(test_x)),
              max_iter=int(max_iter), tol=float(tol))


def synthetic_features(n: int, dim: int, num_classes: int, seed: int = 0, noise: float = 2.0):
  """Gaussian clusters, `n` rows spread evenly over the classes (benchmarks and tests)."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_classes, dim)).astype(np.float32)
  labels = np.arange(n) % num_classes
  x = centres[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
  return x, labels


def benchmark_solvers(n: int, dim: int, num_classes: int, *, iterations: int = 20,
                      noise: float = 2.0, seed: int = 0, mesh=None) -> dict:
  """Both solvers for the same number of L-BFGS iterations (no early stop) on the same problem:
  seconds, seconds per iteration, objective and relative duality gap (float64, host) reached.

  The JAX time excludes its compilation (paid once per shape bucket), reported separately.
  Used by tools/bench_lowshot.py.
  """
  import warnings  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  x, y = synthetic_features(n, dim, num_classes, seed, noise)
  x = cyanure_preprocess(x)
  lambd = LAMBDA_TIMES_N / n
  start = time.perf_counter()
  clf = LogisticRegression(C=sklearn_c(lambd, n), fit_intercept=False, solver="lbfgs",
                           max_iter=iterations, tol=0.0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    clf.fit(x, y)
  sk_seconds = time.perf_counter() - start
  w_sk = clf.coef_.T.astype(np.float32)
  sk_iters = int(np.max(clf.n_iter_))

  mesh = mesh or knn.default_mesh()
  start = time.perf_counter()
  fit_logreg(x, y, lambd=lambd, num_classes=num_classes, solver="jax", max_iter=1, tol=-1.0,
             mesh=mesh)  # compiles this shape bucket
  first_call = time.perf_counter() - start
  jax_fit = fit_logreg(x, y, lambd=lambd, num_classes=num_classes, solver="jax",
                       max_iter=iterations, tol=-1.0, mesh=mesh)  # tol < 0: no early stop
  result = dict(n=n, dim=dim, num_classes=num_classes, lambd=lambd, noise=noise,
                blas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "default"),
                devices=f"{mesh.size} x {mesh.devices.flat[0].device_kind}")
  result["sklearn"] = dict(seconds=round(sk_seconds, 2), iterations=sk_iters,
                           seconds_per_iteration=round(sk_seconds / sk_iters, 3),
                           objective=objective(w_sk, x, y, lambd),
                           relative_gap=relative_gap(w_sk, x, y, lambd))
  result["jax"] = dict(seconds=round(jax_fit["seconds"], 2), iterations=jax_fit["iterations"],
                       seconds_per_iteration=round(jax_fit["seconds"] / jax_fit["iterations"], 3),
                       objective=jax_fit["objective"],
                       relative_gap=relative_gap(jax_fit["w"], x, y, lambd),
                       compile_and_first_iteration_seconds=round(first_call, 2))
  return result
