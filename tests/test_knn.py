"""k-NN classifier (refiner_facts.md section 10.1) and feature extraction.

The k-NN is checked against a float64 numpy transcription of the reference procedure
(`ml-jku/MIM-Refiner:src/metrics/knn.py::multiclass_knn`), on 8 simulated devices and on 1.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_refiner_jax.evaluation import features as feats_lib
from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.models.vit import ViT, vit_kwargs

KS = (1, 3, 10, 20)
TAU = 0.07
CHUNK = 32  # 101 test rows -> 4 chunks, the last one padded
SIM_TOL = 2e-6  # fp32 HIGHEST vs float64 cosine similarities in [-1, 1]


def numpy_knn(train_x, train_y, test_x, ks, tau=TAU, standardize=True, num_classes=None):
  """Reference procedure in float64, written out plainly: returns (predictions, sorted sims)."""
  train_x, test_x = train_x.astype(np.float64), test_x.astype(np.float64)
  if standardize:
    mu = train_x.mean(axis=0)
    sigma = train_x.std(axis=0, ddof=1) + 1e-6  # unbiased, as torch.std
    train_x, test_x = (train_x - mu) / sigma, (test_x - mu) / sigma
  train_x = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
  test_x = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
  sims = test_x @ train_x.T  # [test, train]
  order = np.argsort(-sims, axis=1, kind="stable")
  num_classes = num_classes or max(train_y.max() + 1, 2)
  one_hot = np.eye(num_classes)[train_y]  # [train, classes]
  predictions = []
  for k in ks:
    top = order[:, :k]
    votes = np.exp(np.take_along_axis(sims, top, axis=1) / tau)  # [test, k]
    scores = np.einsum("tk,tkc->tc", votes, one_hot[top])
    predictions.append(scores.argmax(axis=1))
  return np.stack(predictions), np.take_along_axis(sims, order[:, :max(ks)], axis=1)


def clustered(rng, n, centres, noise=2.5, scale=None):
  labels = rng.integers(0, len(centres), n)
  x = centres[labels] + noise * rng.normal(size=(n, centres.shape[1]))
  if scale is not None:  # unequal column scales make the standardisation matter
    x = x * scale
  return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16)) * 1.5
  scale = np.exp(rng.normal(size=16))
  train_x, train_y = clustered(rng, 300, centres, scale=scale)  # 300: not a multiple of 8
  test_x, test_y = clustered(rng, 101, centres, scale=scale)
  return train_x, train_y, test_x, test_y


def one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def eight_device_result(data):
  assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
  train_x, train_y, test_x, _ = data
  return knn.knn_predict(train_x, train_y, test_x, k=KS, chunk=CHUNK)


def test_matches_numpy_for_several_k(data, eight_device_result):
  train_x, train_y, test_x, test_y = data
  expected, expected_sims = numpy_knn(train_x, train_y, test_x, KS)
  out = eight_device_result
  assert out["ks"] == KS and out["num_classes"] == 5
  np.testing.assert_array_equal(out["predictions"], expected)
  np.testing.assert_allclose(out["similarities"], expected_sims, atol=SIM_TOL, rtol=0)
  accuracy = (expected == test_y).mean(axis=1)
  assert 0.4 < accuracy.min() and accuracy.max() < 1.0, "data should be neither trivial nor random"
  result = knn.knn_accuracy(train_x, train_y, test_x, test_y, k=KS, chunk=CHUNK)
  assert result["num_test"] == 101
  for i, k in enumerate(KS):
    assert result["accuracy"][k] == pytest.approx(accuracy[i])
  # Every chunk, the padded last one included, ran through a single compilation.
  predict = knn._predict_chunk_fn(knn.default_mesh(), KS, TAU, 5, jax.lax.Precision.HIGHEST,
                                  jnp.dtype("float32"))
  assert predict._cache_size() == 1


def test_one_device_equals_eight(data, eight_device_result):
  train_x, train_y, test_x, _ = data
  out = knn.knn_predict(train_x, train_y, test_x, k=KS, chunk=CHUNK, mesh=one_device_mesh())
  np.testing.assert_array_equal(out["predictions"], eight_device_result["predictions"])
  np.testing.assert_allclose(out["similarities"], eight_device_result["similarities"],
                             atol=1e-6, rtol=0)


def test_train_bank_is_never_gathered(data):
  """Only the k candidates per device cross devices: no collective carries the [N, D] bank."""
  train_x, _, _, _ = data
  mesh = knn.default_mesh()
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  n = 8 * 40
  args = [jax.device_put(np.zeros((n, 16), np.float32), rows),
          jax.device_put(np.zeros(n, np.int32), rows), jax.device_put(np.ones(n, bool), rows),
          jax.device_put(np.zeros(16, np.float32), replicated),
          jax.device_put(np.ones(16, np.float32), replicated),
          jax.device_put(np.zeros((CHUNK, 16), np.float32), replicated)]
  predict = knn._predict_chunk_fn(mesh, KS, TAU, 5, jax.lax.Precision.HIGHEST)
  hlo = predict.lower(*args).compile().as_text()
  shapes = re.findall(r"= \w+\[([\d,]*)\][^=]*? (?:all-gather|all-reduce|all-to-all)\(", hlo)
  assert shapes, "expected the candidates to be gathered by a collective"
  for shape in shapes:
    dims = [int(d) for d in shape.split(",") if d]
    assert int(np.prod(dims)) <= CHUNK * 8 * max(KS), f"collective of shape {dims}"
    assert n not in dims


def test_masked_rows(data):
  """Masked train rows (here: copies of the test rows with wrong labels) are never neighbours and
  stay out of mu / sigma; masked test rows are left out of the accuracy."""
  train_x, train_y, test_x, test_y = data
  poison_x = test_x[:40] * 1.0001
  poison_y = (test_y[:40] + 1) % 5
  junk_test = np.full((7, 16), 1e3, np.float32)
  all_train_x = np.concatenate([train_x[:150], poison_x, train_x[150:]])
  all_train_y = np.concatenate([train_y[:150], poison_y, train_y[150:]])
  train_mask = np.concatenate([np.ones(150, bool), np.zeros(40, bool), np.ones(150, bool)])
  all_test_x = np.concatenate([test_x, junk_test])
  all_test_y = np.concatenate([test_y, np.zeros(7, int)])
  test_mask = np.concatenate([np.ones(101, bool), np.zeros(7, bool)])

  expected, expected_sims = numpy_knn(train_x, train_y, test_x, KS)
  out = knn.knn_predict(all_train_x, all_train_y, all_test_x, k=KS, chunk=CHUNK,
                        train_mask=train_mask, test_mask=test_mask)
  np.testing.assert_array_equal(out["predictions"][:, :101], expected)
  assert np.all(out["predictions"][:, 101:] == -1)
  np.testing.assert_allclose(out["similarities"][:101], expected_sims, atol=SIM_TOL, rtol=0)
  masked = knn.knn_accuracy(all_train_x, all_train_y, all_test_x, all_test_y, k=10,
                            chunk=CHUNK, train_mask=train_mask, test_mask=test_mask)
  assert masked["num_test"] == 101
  assert masked["accuracy"] == pytest.approx((expected[KS.index(10)] == test_y).mean())
  # Without the train mask the poison rows win for the first 40 test rows: the mask is load-bearing.
  unmasked = knn.knn_accuracy(all_train_x, all_train_y, all_test_x, all_test_y, k=1,
                              chunk=CHUNK, test_mask=test_mask)
  assert unmasked["accuracy"] < masked["accuracy"] - 0.2


def test_without_standardization_and_single_k(data):
  train_x, train_y, test_x, test_y = data
  expected, _ = numpy_knn(train_x, train_y, test_x, (10,), standardize=False)
  standardized, _ = numpy_knn(train_x, train_y, test_x, (10,))
  assert (expected != standardized).any(), "data should make the standardisation matter"
  result = knn.knn_accuracy(jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(test_x),
                            test_y, standardize=False, chunk=CHUNK, mesh=one_device_mesh())
  assert set(result) == {"accuracy", "num_correct", "num_test"}
  assert result["num_correct"] == int((expected[0] == test_y).sum())


def test_input_checks_and_large_k(data):
  train_x, train_y, test_x, test_y = data
  with jax.transfer_guard("disallow"):  # the trainer runs evals under this guard (item 17)
    small = knn.knn_accuracy(train_x[:12], train_y[:12], test_x, test_y, k=(1, 12, 50),
                             chunk=CHUNK, mesh=one_device_mesh())
  assert set(small["accuracy"]) == {1, 12}  # k > number of train rows is skipped (reference)
  with pytest.raises(ValueError, match="exceeds"):
    knn.knn_accuracy(train_x[:12], train_y[:12], test_x, test_y, k=50)
  with pytest.raises(ValueError, match="widths differ"):
    knn.knn_accuracy(train_x, train_y, test_x[:, :8], test_y)
  with pytest.raises(ValueError, match="one label per feature row"):
    knn.knn_accuracy(train_x, train_y[:-1], test_x, test_y)
  with pytest.raises(ValueError, match="num_classes=3"):
    knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=3)


# ------------------------------------------------------------------------------ features

KEYS = ("cls", "patch_mean", "block0_cls", "block1_patch_mean", "last2_cls")


@pytest.fixture(scope="module")
def tiny_vit():
  model = ViT(**vit_kwargs("mu", 4, image_size=16))
  images = np.random.default_rng(1).normal(size=(13, 16, 16, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])
  apply_fn = functools.partial(model.apply, blocks=feats_lib.feature_blocks(KEYS, model.depth))
  _, aux = jax.jit(apply_fn)(variables, images)  # direct apply on the unpadded data
  return model, variables, apply_fn, images, aux


def padded_batches(images, labels, batch_size):
  """Per-host batches padded to a fixed size with mask False, as make_eval_loader yields them."""
  for start in range(0, len(images), batch_size):
    image, label = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(image)
    index = np.arange(start, start + batch_size)
    yield dict(image=np.pad(image, ((0, pad), (0, 0), (0, 0), (0, 0))),
               label=np.pad(label, (0, pad)), index=np.where(index < len(images), index, -1),
               mask=np.arange(batch_size) < len(image))


# (8, 5): batches that do not divide over the devices (the demo's k-NN monitor, 500 rows on 8
# devices) are padded with masked rows, to the same compiled shape as (8, 8).
@pytest.mark.parametrize("num_devices,batch_size", [(8, 8), (1, 8), (8, 5)])
def test_extract_features_matches_direct_apply(tiny_vit, num_devices, batch_size):
  model, variables, apply_fn, images, aux = tiny_vit
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
  labels = np.arange(13) % 4
  out = feats_lib.extract_features(apply_fn, variables, padded_batches(images, labels, batch_size),
                                   feature_keys=KEYS, depth=model.depth, mesh=mesh)
  assert set(out) == set(KEYS) | {"label", "index"}
  np.testing.assert_array_equal(out["label"], labels)
  np.testing.assert_array_equal(out["index"], np.arange(13))
  expected = {"cls": aux["cls"], "patch_mean": aux["patch_mean"],
              "block0_cls": aux["block_cls"][0], "block1_patch_mean": aux["block_patch_mean"][1],
              "last2_cls": np.concatenate([aux["block_cls"][0], aux["block_cls"][1]], axis=1)}
  for key in KEYS:
    assert out[key].shape == (13, 64 if key == "last2_cls" else 32), key
    np.testing.assert_allclose(out[key], expected[key], atol=1e-5, rtol=1e-5, err_msg=key)
  # The pre-norm main CLS includes the final LN, unlike the raw last-block CLS (section 10.1).
  assert not np.allclose(out["cls"], aux["block_cls"][1], atol=1e-3)
  # A second pass (under the trainer's transfer guard) reuses the compiled function.
  with jax.transfer_guard("disallow"):
    again = feats_lib.extract_features(apply_fn, variables,
                                       padded_batches(images, labels, batch_size),
                                       feature_keys=KEYS, depth=model.depth, mesh=mesh)
  np.testing.assert_array_equal(again["cls"], out["cls"])
  assert feats_lib._feature_fn(apply_fn, KEYS, model.depth, mesh)._cache_size() == 1


def test_feature_key_errors(tiny_vit):
  model, variables, apply_fn, images, _ = tiny_vit
  assert feats_lib.feature_blocks(("block1_cls", "last4_cls", "cls"), 12) == (1, 8, 9, 10, 11)
  with pytest.raises(ValueError, match="unknown feature key"):
    feats_lib.feature_blocks(("block_cls",))
  with pytest.raises(ValueError, match="needs the model depth"):
    feats_lib.feature_blocks(("last4_cls",))
  with pytest.raises(ValueError, match="does not exist"):
    feats_lib.feature_blocks(("block2_cls",), model.depth)
  out, aux = jax.eval_shape(model.apply, variables, images[:1])  # no blocks requested
  with pytest.raises(ValueError, match="did not return"):
    feats_lib.select_features(out, aux, ("block1_cls",))
