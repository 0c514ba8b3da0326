"""Low-shot logistic regression (refiner_facts.md 10.3) against scikit-learn.

cyanure's objective (1/n) sum CE + lambda/2 ||W||^2 maps onto scikit-learn's C = 1/(lambda n); the
on-device L-BFGS must give scikit-learn's predictions and log-loss on the same data.
"""

import json
import os

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from mim_refiner_jax.evaluation import lowshot


@pytest.fixture(scope="module")
def data():
  x, y = lowshot.synthetic_features(360, 16, 6, seed=0, noise=1.5)
  return lowshot.cyanure_preprocess(x[:300]), y[:300], lowshot.cyanure_preprocess(x[300:]), y[300:]


def test_preprocess_is_cyanure_rows_mode():
  # cyanure preprocess(columns=False): X^T's columns (= samples) centred by their own mean, then
  # L2-normalised (Matrix::center, Matrix::normalize); written out per row here.
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) + 3
  out = lowshot.cyanure_preprocess(x)
  for row, got in zip(x, out):
    centred = row - row.sum() / len(row)
    np.testing.assert_allclose(got, centred / np.sqrt(np.sum(centred ** 2)), rtol=1e-5)


def test_sklearn_c_maps_cyanure_lambda(data):
  """sklearn's optimum at C = 1/(lambda n) is the optimum of cyanure's objective."""
  x, y, _, _ = data
  lambd = 0.00025 / len(x)
  assert lowshot.sklearn_c(lambd, len(x)) == pytest.approx(4000.0)
  lambd = 0.01  # well conditioned: both reach the optimum to high precision
  clf = LogisticRegression(C=lowshot.sklearn_c(lambd, len(x)), fit_intercept=False, tol=1e-10,
                           max_iter=5000).fit(x.astype(np.float64), y)
  w = clf.coef_.T
  # Zero gradient of (1/n) sum CE + lambda/2 ||W||^2 (float64, written out).
  logits = x.astype(np.float64) @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  grad = x.T.astype(np.float64) @ p / len(x) + lambd * w
  assert np.abs(grad).max() < 1e-7
  assert 0 <= lowshot.relative_gap(w, x, y, lambd) < 1e-9  # the duality gap vanishes there...
  # ...and is a positive upper bound elsewhere, as weak duality demands.
  assert lowshot.relative_gap(w * 0.5, x, y, lambd) > 1e-4
  # With C twice as large the gradient of cyanure's objective is not zero: the mapping is tight.
  w2 = LogisticRegression(C=2 * lowshot.sklearn_c(lambd, len(x)), fit_intercept=False,
                          tol=1e-10, max_iter=5000).fit(x.astype(np.float64), y).coef_.T
  assert lowshot.objective(w2, x, y, lambd) > lowshot.objective(w, x, y, lambd) + 1e-6


def test_jax_lbfgs_matches_sklearn(data):
  x, y, test_x, test_y = data
  x, y = x[:240], y[:240]  # <= 256 rows: the same padded shape (one compile) as the splits below
  lambd = 0.002
  jax_fit = lowshot.fit_logreg(x, y, lambd=lambd, solver="jax", tol=1e-6, max_iter=500)
  clf = LogisticRegression(C=lowshot.sklearn_c(lambd, len(x)), fit_intercept=False, tol=1e-10,
                           max_iter=5000).fit(x, y)
  np.testing.assert_array_equal(np.argmax(test_x @ jax_fit["w"], 1), clf.predict(test_x))
  ours = log_loss(test_y, _softmax(test_x @ jax_fit["w"]), labels=np.arange(6))
  theirs = log_loss(test_y, clf.predict_proba(test_x), labels=np.arange(6))
  assert ours == pytest.approx(theirs, rel=1e-4)
  assert jax_fit["objective"] == pytest.approx(lowshot.objective(clf.coef_.T, x, y, lambd),
                                               rel=1e-5)


def _softmax(z):
  z = np.exp(z - z.max(1, keepdims=True))
  return z / z.sum(1, keepdims=True)


def test_splits_are_deterministic_and_balanced():
  labels = np.repeat(np.arange(4), 25)
  a, b = lowshot.sample_shots(labels, 2, seed=0), lowshot.sample_shots(labels, 2, seed=0)
  np.testing.assert_array_equal(a, b)
  assert np.all(np.bincount(labels[a]) == 2)
  assert not np.array_equal(a, lowshot.sample_shots(labels, 2, seed=1))
  p = lowshot.sample_percent(labels, 10.0, seed=0)
  assert np.all(np.bincount(labels[p]) == 2) and len(np.unique(p)) == len(p)
  with pytest.raises(ValueError, match="fewer than 30 shots"):
    lowshot.sample_shots(labels, 30, seed=0)


def test_msn_split_files(tmp_path, data):
  x, y, test_x, test_y = data
  names = [f"n{c:08d}_{i}.JPEG" for i, c in enumerate(y)]  # MSN: one file name per line
  rows = lowshot.sample_shots(y, 2, seed=5)
  for split in ("subsets1", "subsets2"):
    os.makedirs(tmp_path / split)
    (tmp_path / split / "2imgs_class.txt").write_text("".join(names[r] + "\n" for r in rows))
  out = lowshot.lowshot_eval(x, y, test_x, test_y, shots=(2,), percents=(),
                             split_dir=str(tmp_path), train_names=names, progress=False)
  entry = out["settings"]["2shot"]
  assert entry["splits"] == ["subsets1", "subsets2"] and entry["num_train"] == [12, 12]
  seeded = lowshot.lowshot_eval(x, y, test_x, test_y, shots=(2,), percents=(), seeds=(5,),
                                progress=False)
  assert entry["accuracies"][0] == seeded["settings"]["2shot"]["accuracies"][0]
  index_file = tmp_path / "indices.txt"
  index_file.write_text("\n".join(str(r) for r in rows))
  np.testing.assert_array_equal(lowshot.read_split_file(str(index_file), len(y), None), rows)
  with pytest.raises(ValueError, match="train_names"):
    lowshot.read_split_file(str(tmp_path / "subsets1" / "2imgs_class.txt"), len(y), None)
  with pytest.raises(ValueError, match="missing"):
    lowshot.lowshot_eval(x, y, test_x, test_y, shots=(1,), percents=(), split_dir=str(tmp_path),
                         train_names=names, progress=False)


def test_lowshot_eval_reports_mean_and_spread(data):
  x, y, test_x, test_y = data
  out = lowshot.lowshot_eval(x, y, test_x, test_y, shots=(1, 5), percents=(10.0,),
                             progress=False)
  assert set(out["settings"]) == {"1shot", "5shot", "10percent"}
  json.dumps(out)  # plain Python values only
  for entry in out["settings"].values():
    assert len(entry["accuracies"]) == 3
    assert entry["mean"] == pytest.approx(np.mean(entry["accuracies"]))
    assert entry["std"] == pytest.approx(np.std(entry["accuracies"]))
  assert out["settings"]["5shot"]["num_train"] == [30, 30, 30]
  assert out["settings"]["5shot"]["mean"] > 1 / 6 + 0.2  # well above chance
  # scikit-learn as the solver gives the same accuracies up to a near-tie test point or two.
  sk = lowshot.lowshot_eval(x, y, test_x, test_y, shots=(5,), percents=(), solver="sklearn",
                            progress=False)
  np.testing.assert_allclose(sk["settings"]["5shot"]["accuracies"],
                             out["settings"]["5shot"]["accuracies"], atol=2 / len(test_y))
  assert jax.device_count() == 8  # the JAX solver ran with rows sharded over 8 devices
