"""k-means and clustering metrics (refiner_facts.md 10.3) against scikit-learn and scipy."""

import itertools
import json

import jax
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn.cluster import KMeans

from mim_refiner_jax.evaluation import cluster, lowshot


@pytest.fixture(scope="module")
def blobs():
  x, y = lowshot.synthetic_features(203, 8, 4, seed=3, noise=0.4)  # 203 rows: padded on 8
  return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_lloyd_matches_sklearn_from_the_same_centres(blobs):
  x, _ = blobs
  init = x[[0, 50, 100, 150, 7]]  # 5 clusters for 4 classes: some clusters split
  ours = jax.jit(lambda x, v, c: cluster.lloyd(x, v, c))(x, np.ones(len(x), bool), init)
  centres, labels, inertia, _ = (np.asarray(a) for a in ours)
  ref = KMeans(5, init=init, n_init=1, algorithm="lloyd", max_iter=300, tol=1e-4).fit(x)
  np.testing.assert_array_equal(labels, ref.labels_)
  np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-5)
  np.testing.assert_allclose(centres, ref.cluster_centers_, atol=1e-5)


def test_kmeans_8_devices_equal_1_and_plusplus_picks_rows(blobs):
  x, _ = blobs
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  r8 = cluster.kmeans(x, 4, restarts=2, seed=0)
  r1 = cluster.kmeans(x, 4, restarts=2, seed=0, mesh=one)
  for a, b in zip(r8, r1):
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["inertia"] == pytest.approx(b["inertia"], rel=1e-5)
  # k-means++ centres are distinct data rows.
  init = np.asarray(jax.jit(cluster.kmeans_plusplus, static_argnums=3)(
      x, np.ones(len(x), bool), jax.random.key(0), 4))
  dist = np.abs(init[:, None] - x[None]).max(-1)
  assert np.all(dist.min(1) < 1e-6) and len(np.unique(dist.argmin(1))) == 4


def test_accuracy_is_the_best_permutation():
  rng = np.random.default_rng(0)
  labels, clusters = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
  brute = max(np.mean(np.asarray(perm)[clusters] == labels)
              for perm in itertools.permutations(range(4)))
  assert cluster.cluster_accuracy(labels, clusters) == pytest.approx(brute)
  assert cluster.cluster_accuracy(labels, (labels + 1) % 4) == 1.0


def test_metrics_equal_sklearn(blobs):
  x, y = blobs
  clusters = np.random.default_rng(1).integers(0, 4, len(y))
  clusters[y == 0] = 0
  m = cluster.clustering_metrics(y, clusters)
  assert m["nmi"] == sk_metrics.normalized_mutual_info_score(y, clusters)
  assert m["ami"] == sk_metrics.adjusted_mutual_info_score(y, clusters)
  assert m["ari"] == sk_metrics.adjusted_rand_score(y, clusters)


def test_class_separation_is_sklearn_on_the_labels(blobs):
  """Silhouette / Davies-Bouldin w.r.t. the ground-truth classes (paper 5.3), all rows; the old
  code scored the k-means clusters instead, which differ from the labels here."""
  x, y = blobs
  sep = cluster.class_separation(x, y)
  assert sep["silhouette"] == pytest.approx(sk_metrics.silhouette_score(x, y), rel=1e-6)
  assert sep["davies_bouldin"] == pytest.approx(sk_metrics.davies_bouldin_score(x, y), rel=1e-6)
  assert sep["rows"] == sep["of"] == len(x)
  sampled = cluster.class_separation(x, y, sample=100, seed=0)
  pick = np.sort(np.random.default_rng(0).choice(len(x), 100, replace=False))
  assert sampled["rows"] == 100 and sampled["of"] == len(x)
  assert sampled["silhouette"] == pytest.approx(sk_metrics.silhouette_score(x[pick], y[pick]),
                                                rel=1e-6)
  # clustering_eval reports the labels' separation, not the separation of its clusters
  noisy = np.random.default_rng(1).integers(0, 4, len(y))
  out = cluster.clustering_eval(x, noisy, restarts=1, progress=False)
  normed = x / np.linalg.norm(x, axis=1, keepdims=True)
  assert out["class_separation"]["silhouette"] == pytest.approx(
      sk_metrics.silhouette_score(normed, noisy), rel=1e-5)
  assert out["class_separation"]["silhouette"] < 0.1  # random labels are not separated


def test_clustering_eval_best_and_mean(blobs):
  x, y = blobs
  out = cluster.clustering_eval(x * 5.0, y, restarts=3, progress=False)  # scale: L2-normalised
  inertias = [r["inertia"] for r in out["runs"]]
  assert out["lowest_inertia"]["inertia"] == min(inertias) and out["num_clusters"] == 4
  json.dumps(out)  # plain Python values only
  assert out["mean"]["acc"] == pytest.approx(np.mean([r["acc"] for r in out["runs"]]))
  assert out["lowest_inertia"]["acc"] > 0.9  # separated blobs
  mini = cluster.clustering_eval(x, y, restarts=2, algorithm="minibatch", batch_size=64,
                                 epochs=5, progress=False)
  assert mini["lowest_inertia"]["acc"] > 0.9 and len(mini["runs"]) == 2
  with pytest.raises(ValueError, match="num_clusters"):
    cluster.clustering_eval(x, y, num_clusters=len(x) + 1, progress=False)
