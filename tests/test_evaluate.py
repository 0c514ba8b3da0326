"""Evaluation suite: dataset feature extraction (devices, padding, cache), poolings, encoder
loading from every kind of checkpoint, multi-k / bf16 k-NN, per-block output, tools/evaluate.py.

The tiny encoder is ViT "mu" (width 32, depth 2, patch 4) at 16 px on synthetic images; 37 test
images with batch 16 leave a padded last batch, and 16 rows split over 8 devices.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_refiner_jax import checkpoint as checkpoint_lib
from mim_refiner_jax.convert import checkpoints as convert_lib
from mim_refiner_jax.data import multicrop, sources
from mim_refiner_jax.evaluation import dataset_features as dataset_lib
from mim_refiner_jax.evaluation import encoders as encoders_lib
from mim_refiner_jax.evaluation import features as features_lib
from mim_refiner_jax.evaluation import knn as knn_lib
from mim_refiner_jax.evaluation import per_block as per_block_lib
from mim_refiner_jax.evaluation import pooling
from mim_refiner_jax.models.vit import ViT, vit_kwargs
from mim_refiner_jax.tools import evaluate as evaluate_tool

KWARGS = vit_kwargs("mu", 4, image_size=16)
KEYS = ("cls", "patch_mean", "cls_patch_mean", "block0_cls", "block1_patch_mean",
        "block1_cls_patch_mean", "last2_cls", "last2_cls_patch_mean", "last2_cls_patch_mean_dinov2",
        "block1_patch_tokens")
SOURCE = dict(name="synthetic", num_examples=37, num_classes=4, image_size=20, seed=3)
TRANSFORM = dict(resize_size=18, crop_size=16)
BATCH = 16


def _variables(seed):
  v = ViT(**KWARGS).init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)))
  return jax.tree.map(np.asarray, v)


@pytest.fixture(scope="module")
def flax_checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "mu_flax")
  convert_lib.save_flax(path, _variables(0), KWARGS)
  return path


@pytest.fixture(scope="module")
def encoder(flax_checkpoint):
  return encoders_lib.load_encoder(flax_checkpoint)


def _mesh(n):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


@pytest.fixture(scope="module")
def eight_devices(encoder):
  return dataset_lib.dataset_features(encoder, SOURCE, KEYS, transform=TRANSFORM,
                                      batch_size=BATCH, mesh=_mesh(8))


def test_extraction_every_example_once_and_poolings(encoder, eight_devices):
  out = eight_devices
  np.testing.assert_array_equal(out["index"], np.arange(37))  # once each, none dropped
  source = sources.make_source(SOURCE)
  np.testing.assert_array_equal(out["label"], [source[i]["label"] for i in range(37)])
  # Independent reference: the ViT's own aux outputs on the unpadded, transformed images.
  transform = multicrop.EvalTransform(multicrop.EvalConfig.from_config(TRANSFORM))
  images = np.stack([transform(source[i])["image"] for i in range(37)])
  model = ViT(**KWARGS)
  main, aux = model.apply(encoder.variables, images, blocks=(0, 1))
  cls1, mean1 = aux["block_cls"][1], aux["block_patch_mean"][1]
  expected = {
      "cls": aux["cls"], "patch_mean": aux["patch_mean"],
      "cls_patch_mean": np.concatenate([aux["cls"], aux["patch_mean"]], 1),
      "block0_cls": aux["block_cls"][0], "block1_patch_mean": mean1,
      "block1_cls_patch_mean": np.concatenate([cls1, mean1], 1),
      "last2_cls": np.concatenate([aux["block_cls"][0], cls1], 1),
      # the reference's last-n input: n CLS tokens, then the n mean patch tokens
      "last2_cls_patch_mean": np.concatenate([aux["block_cls"][0], cls1,
                                              aux["block_patch_mean"][0], mean1], 1),
      # DINOv2's: n CLS tokens, then the last block's mean patch token
      "last2_cls_patch_mean_dinov2": np.concatenate([aux["block_cls"][0], cls1, mean1], 1)}
  for key, value in expected.items():
    np.testing.assert_allclose(out[key], value, atol=2e-5, rtol=1e-5, err_msg=key)
  tokens = out["block1_patch_tokens"]
  assert tokens.shape == (37, 16, 32)  # 4x4 patches, no CLS
  np.testing.assert_allclose(tokens.mean(1), mean1, atol=2e-5, rtol=1e-5)
  # The final LayerNorm of the raw last-block tokens is the main output (pre-norm model).
  norm = encoder.variables["params"]["norm"]
  mu, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  normed = (tokens - mu) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
  np.testing.assert_allclose(normed, main[:, 1:], atol=1e-4, rtol=1e-4)


def test_one_device_equals_eight(encoder, eight_devices):
  one = dataset_lib.dataset_features(encoder, SOURCE, KEYS, transform=TRANSFORM,
                                     batch_size=BATCH, mesh=_mesh(1))
  assert set(one) == set(eight_devices)
  for key in one:
    np.testing.assert_allclose(one[key], eight_devices[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_cache_hits_and_keys(encoder, flax_checkpoint, tmp_path, monkeypatch):
  passes = []
  real = features_lib.extract_features
  monkeypatch.setattr(features_lib, "extract_features",
                      lambda *a, **kw: passes.append(kw["feature_keys"]) or real(*a, **kw))
  cache = str(tmp_path / "cache")
  get = lambda enc=encoder, source=SOURCE, transform=TRANSFORM, keys=("cls", "block1_cls"): \
      dataset_lib.dataset_features(enc, source, keys, transform=transform, batch_size=BATCH,
                                   mesh=_mesh(8), cache_dir=cache)
  first = get()
  assert len(passes) == 1
  again = get()
  subset = get(keys=("block1_cls",))
  assert len(passes) == 1, "a cached request ran the model again"
  np.testing.assert_array_equal(again["block1_cls"], first["block1_cls"])
  assert set(subset) == {"block1_cls", "label", "index"}
  # Each part of the key forces a new pass: source, transform, checkpoint, more keys.
  get(source=dict(SOURCE, seed=4))
  get(transform=dict(TRANSFORM, resize_size=20))
  os.utime(os.path.join(flax_checkpoint, "vit_kwargs.json"), ns=(1, 1))
  get(enc=encoders_lib.load_encoder(flax_checkpoint))
  assert len(passes) == 4
  wider = get(keys=("cls", "patch_mean"))  # recomputes the union and replaces the file
  assert len(passes) == 5 and set(passes[-1]) == {"cls", "patch_mean", "block1_cls"}
  np.testing.assert_allclose(wider["cls"], first["cls"], atol=1e-6)
  get(keys=("block1_cls", "patch_mean"))
  assert len(passes) == 5
  digests = {dataset_lib.cache_digest(encoder.identity, SOURCE, TRANSFORM, d)
             for d in ("float32", "bfloat16")}
  assert len(digests) == 2


def _fake_workdir(root, ema: bool):
  """A workdir as the trainer leaves it: run.json and an Orbax checkpoint of the state."""
  live, ema_vars = _variables(1), _variables(2)
  state = {"step": np.int32(5), "params": {"encoder": live["params"], "heads": {}},
           "buffers": live["buffers"], "opt": {"count": np.zeros((), np.int32)}}
  if ema:
    state["ema"] = ema_vars["params"]
  os.makedirs(root)
  with open(os.path.join(root, "run.json"), "w") as f:
    json.dump({"vit_kwargs": KWARGS, "config": {}}, f)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(root, "checkpoints"), every_steps=1, keep=1,
                                     async_save=False)
  ckpt.save(5, state, None, {"step": 5})
  ckpt.close()
  return live, ema_vars


def test_load_encoder_from_every_kind(tmp_path, flax_checkpoint):
  torch_file = str(tmp_path / "mu.th")
  convert_lib.save_torch(torch_file, _variables(0), KWARGS, layout="refined")
  from_torch = encoders_lib.load_encoder(torch_file)
  from_flax = encoders_lib.load_encoder(flax_checkpoint)
  assert from_torch.image_size == 16
  np.testing.assert_allclose(from_torch.variables["params"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                             from_flax.variables["params"]["blocks_1"]["mlp"]["fc1"]["kernel"])
  wd = str(tmp_path / "wd")
  live, ema_vars = _fake_workdir(wd, ema=True)
  auto = encoders_lib.load_encoder(wd)
  trained = encoders_lib.load_encoder(wd, weights="live")
  assert auto.identity["weights"] == "ema" and auto.identity["step"] == 5
  leaf = lambda v: v["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(leaf(auto.variables), leaf(ema_vars))
  np.testing.assert_array_equal(leaf(trained.variables), leaf(live))
  assert auto.identity != trained.identity
  s2 = str(tmp_path / "wd_stage2")
  _fake_workdir(s2, ema=False)
  with pytest.raises(ValueError, match="no EMA"):
    encoders_lib.load_encoder(s2, weights="ema")
  with pytest.raises(ValueError, match="no checkpoint of step 7"):
    encoders_lib.load_encoder(wd, step=7)
  with pytest.raises(ValueError, match="inside a training workdir"):
    encoders_lib.load_encoder(torch_file, weights="ema")


def test_pooling_keys():
  assert pooling.key_blocks(("block1_cls", "last4_cls_patch_mean", "cls"), 12) == (1, 8, 9, 10, 11)
  with pytest.raises(ValueError, match="cannot be concatenated"):
    pooling.parse_key("last2_patch_tokens", 4)
  with pytest.raises(ValueError, match="unknown feature key"):
    pooling.parse_key("block1_max")


# ------------------------------------------------------------------------------------- k-NN


@pytest.fixture(scope="module")
def knn_data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(6, 24)) * 1.2
  def draw(n):
    y = rng.integers(0, 6, n)
    return (centres[y] + 2.0 * rng.normal(size=(n, 24))).astype(np.float32), y
  return draw(203) + draw(61)


def test_multi_k_equals_single_k_and_float64(knn_data):
  from tests.test_knn import numpy_knn  # the float64 transcription of the reference
  train_x, train_y, test_x, test_y = knn_data
  ks = (1, 5, 20)
  mesh = _mesh(8)
  several = knn_lib.knn_accuracy(train_x, train_y, test_x, test_y, k=ks, mesh=mesh, chunk=32)
  expected, _ = numpy_knn(train_x, train_y, test_x, ks)
  for i, k in enumerate(ks):
    single = knn_lib.knn_accuracy(train_x, train_y, test_x, test_y, k=k, mesh=mesh, chunk=32)
    assert single["num_correct"] == several["num_correct"][k]
    assert several["num_correct"][k] == int((expected[i] == test_y).sum())
  accs = list(several["accuracy"].values())
  assert 0.3 < min(accs) and max(accs) < 1.0, "data should be neither trivial nor random"


def test_bf16_similarity(knn_data):
  train_x, train_y, test_x, _ = knn_data
  f32 = knn_lib.knn_predict(train_x, train_y, test_x, k=(1, 10), chunk=32)
  bf16 = knn_lib.knn_predict(train_x, train_y, test_x, k=(1, 10), chunk=32,
                             similarity_dtype="bfloat16")
  # bf16 keeps 8 mantissa bits: unit vectors' dot products move by at most ~2^-8 * |x||y|.
  np.testing.assert_allclose(bf16["similarities"], f32["similarities"], atol=1.5e-2, rtol=0)
  assert np.abs(bf16["similarities"] - f32["similarities"]).max() > 1e-6, "bf16 not applied"
  assert (bf16["predictions"] == f32["predictions"]).mean() > 0.9
  with pytest.raises(ValueError, match="similarity_dtype"):
    knn_lib.knn_predict(train_x, train_y, test_x, similarity_dtype="float16")


# ----------------------------------------------------------------------------- per block, CLI


def test_per_block_writes_json_and_png(tmp_path):
  results = dict(k=10, tau=0.07, pooling="cls", test="mnist:val", num_test=1000,
                 checkpoints={"mae": dict(blocks=[0.5, 0.6, 0.7], main=0.65),
                              "refined": dict(blocks=[0.5, 0.7, 0.9], main=0.85,
                                              probe_blocks=[0.6, 0.8, 0.95])})
  json_path, png_path = per_block_lib.write(results, str(tmp_path / "out"))
  with open(json_path) as f:
    assert json.load(f)["checkpoints"]["refined"]["blocks"] == [0.5, 0.7, 0.9]
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_knn_and_per_block(tmp_path, flax_checkpoint, capsys):
  wd = str(tmp_path / "wd")
  _fake_workdir(wd, ema=True)
  before = sorted(os.listdir(wd))
  out = str(tmp_path / "eval")
  results = evaluate_tool.main([
      "--checkpoint", wd, "--checkpoint", flax_checkpoint, "--name", "refined", "--name", "mae",
      "--train", "synthetic:64", "--test", "synthetic:37,seed=1", "--protocols", "knn,per_block",
      "--k", "1,5", "--resize", "18", "--batch-size", "16", "--out", out,
      "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
  assert set(results) == {"refined", "mae"}
  knn = results["refined"]["protocols"]["knn"]["accuracy"]
  assert set(knn) == {"block1_cls", "block1_patch_mean"} and set(knn["block1_cls"]) == {"1", "5"}
  blocks = results["mae"]["protocols"]["per_block"]["blocks"]
  assert len(blocks) == 2 and all(0.0 <= a <= 1.0 for a in blocks)
  assert results["mae"]["num_test"] == 37 and results["mae"]["transform"]["crop_size"] == 16
  for name in ("results.json", "per_block.json", "per_block.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert results["mae"]["preset"] == "default"
  assert results["mae"]["settings"]["k"] == (1, 5) and results["mae"]["settings"]["tau"] == 0.07
  # With --out nothing is written next to the model: no events, no feature cache in the workdir.
  assert sorted(os.listdir(wd)) == before
  printed = capsys.readouterr().out
  assert "eval view: resize 18, centre crop 16" in printed and "feature cache: " in printed
  assert re.search(r"knn/block1_cls/k5 +\d+\.\d\d  %", printed)  # one unit column: percent
  evaluate_tool.main([  # asked for: the workdir gets its eval scalars (cached features, fast)
      "--checkpoint", wd, "--train", "synthetic:64", "--test", "synthetic:37,seed=1",
      "--k", "1,5", "--resize", "18", "--batch-size", "16", "--out", out, "--tensorboard",
      "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    record = json.loads(f.readlines()[-1])
  assert record["step"] == 5 and 0 <= record["eval/knn/block1_cls/k5"] <= 100  # percent
  assert os.listdir(os.path.join(wd, "tb"))
  for argv, message in (
      (["--protocols", "knn,nope"], "unknown"),
      (["--features", "block1_patch_tokens", "--out", out], "one vector per image"),
      (["--test", "synthetic:8,num_classes=8", "--out", out], "the train set lacks"),
      (["--train", "cifar:train"], "unknown data source kind 'cifar'")):
    base = {"--checkpoint": wd, "--train": "synthetic:8", "--test": "synthetic:8"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    with pytest.raises(SystemExit) as exit_info:
      evaluate_tool.main([x for kv in base.items() for x in kv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ train monitor


def test_monitor_head_projector0_in_eval_mode():
  """The monitor's head features are projector.0 = GELU(BN_eval(x W)) of the head's own input
  (section 10.1), checked against numpy with non-trivial running statistics."""
  import ml_collections
  from scipy.special import erf
  from mim_refiner_jax.evaluation import monitor as monitor_lib
  from tests import tiny_refiner
  model = tiny_refiner.make_model()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 2, 16, 16, 3)))
  rng = np.random.default_rng(0)
  stats = jax.tree.map(lambda x: np.asarray(rng.uniform(0.5, 2.0, x.shape), np.float32),
                       variables["batch_stats"])
  state = {"params": variables["params"], "buffers": variables["buffers"], "batch_stats": stats}
  synthetic = dict(name="synthetic", num_examples=24, num_classes=4, image_size=16)
  cfg = ml_collections.ConfigDict(dict(
      train=synthetic, test=dict(synthetic, num_examples=13, seed=1), resize_size=16,
      crop_size=16, batch_size=16, k=3, tau=0.07, features="block1_cls"))
  monitor = monitor_lib.KnnMonitor(cfg, model, _mesh(8))
  results = monitor.run(state)
  assert set(results) == {"knn/block1_cls"} | {f"knn/head/{h.name}/projector0"
                                                for h in tiny_refiner.HEADS}
  enc_vars = {"params": variables["params"]["encoder"], "buffers": variables["buffers"]}
  feats = monitor._features({"encoder": enc_vars, "heads": variables["params"]["heads"],
                             "batch_stats": stats})["test"]
  source = sources.make_source(cfg.test.to_dict())
  images = np.stack([multicrop.EvalTransform(multicrop.EvalConfig.from_config(
      dict(resize_size=16, crop_size=16)))(source[i])["image"] for i in range(13)])
  _, aux = model.encoder.apply(enc_vars, images, blocks=(0,))
  inputs = {"main": aux["cls"], 0: aux["block_cls"][0]}
  for h in tiny_refiner.HEADS:
    p = variables["params"]["heads"][h.name]["projector_0"]
    s = stats[h.name]["projector_0"]["bn"]
    x = np.asarray(inputs[h.block], np.float64) @ np.asarray(p["dense"]["kernel"], np.float64)
    x = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    expected = 0.5 * x * (1 + erf(x / np.sqrt(2)))  # exact GELU
    np.testing.assert_allclose(feats[f"head/{h.name}/projector0"], expected, atol=1e-4,
                               rtol=1e-4, err_msg=h.name)


def test_other_protocols_get_the_right_features(tmp_path, flax_checkpoint, monkeypatch):
  """probe / lowshot / cluster (evaluation/{probe,lowshot,cluster}.py, another module's work) are
  called through their interface with the features section 10 names; stand-ins record the calls."""
  import sys
  import types
  import mim_refiner_jax.evaluation as evaluation_pkg
  calls = {}
  best = {"best": {"accuracy": 0.5, "feature": "x", "lr": 0.1, "epoch": 1}}
  fakes = {
      "probe": dict(linear_probe_grid=lambda tr, ytr, te, yte, **kw: calls.setdefault(
          "grid", (tr, te, kw)) and best,
                    selective_aggregation_probe=lambda tr, ytr, te, yte, **kw: calls.setdefault(
                        "sa", (tr, te)) and best),
      "lowshot": dict(lowshot_eval=lambda tr, ytr, te, yte, **kw: calls.setdefault(
          "lowshot", (tr, te, kw)) and {"settings": {"1shot": {"mean": 0.3, "std": 0.01}},
                                        "splits_from": "seeded splits", "num_splits": 3}),
      "cluster": dict(clustering_eval=lambda x, y, **kw: calls.setdefault(
          "cluster", (x, y, kw)) and {
              "lowest_inertia": dict(acc=0.4, nmi=0.2, ami=0.2, ari=0.1), "restarts": 10,
              "mean": dict(acc=0.3, nmi=0.1, ami=0.1, ari=0.1),
              "class_separation": dict(silhouette=0.05, davies_bouldin=2.0)})}
  for name, attrs in fakes.items():
    module = types.SimpleNamespace(**attrs)
    monkeypatch.setitem(sys.modules, f"mim_refiner_jax.evaluation.{name}", module)
    monkeypatch.setattr(evaluation_pkg, name, module, raising=False)
  results = evaluate_tool.main([
      "--checkpoint", flax_checkpoint, "--train", "synthetic:24", "--test", "synthetic:13,seed=1",
      "--protocols", "probe,lowshot,cluster", "--selective-aggregation", "--resize", "18",
      "--batch-size", "16", "--out", str(tmp_path / "out"), "--no-cache", "--no-progress",
      "--probe-augment", "2"])
  train, test, kwargs = calls["grid"]
  assert set(train) == {"last1_cls", "last1_cls+patch", "last2_cls", "last2_cls+patch"}  # depth 2
  # --probe-augment 2: two differently augmented copies of the train set for the probe grid.
  # last-n CLS || patch is the reference's: n CLS + n mean patch tokens (2 x 2 x 32)
  assert {k: v.shape for k, v in train.items()} == {
      "last1_cls": (2, 24, 32), "last1_cls+patch": (2, 24, 64), "last2_cls": (2, 24, 64),
      "last2_cls+patch": (2, 24, 128)}
  assert not np.allclose(train["last1_cls"][0], train["last1_cls"][1])
  assert test["last1_cls"].shape == (13, 32) and "mesh" in kwargs
  assert calls["sa"][0].shape == (24, 16, 32) and calls["sa"][1].shape == (13, 16, 32)
  assert calls["lowshot"][0].shape == (24, 32) and calls["lowshot"][1].shape == (13, 32)
  assert calls["cluster"][0].shape == (13, 32) and calls["cluster"][1].shape == (13,)
  protocols = results[next(iter(results))]["protocols"]
  assert protocols["probe"]["selective_aggregation"]["best"]["accuracy"] == 0.5
  assert protocols["cluster"]["features"] == "block1_cls"
  assert (kwargs["epochs"], kwargs["batch_size"]) == (10, 256)  # the default preset
  assert calls["cluster"][2]["restarts"] == 10 and calls["cluster"][2]["algorithm"] == "lloyd"
  # --preset paper reaches every protocol; a flag overrides one value
  calls.clear()
  results = evaluate_tool.main([
      "--checkpoint", flax_checkpoint, "--train", "synthetic:24", "--test", "synthetic:13,seed=1",
      "--protocols", "probe,lowshot,cluster", "--resize", "18", "--batch-size", "16",
      "--out", str(tmp_path / "out"), "--no-cache", "--no-progress", "--preset", "paper",
      "--probe-augmentation", "none", "--lowshot-seeds", "4,5,6,7"])
  _, _, kwargs = calls["grid"]
  assert (kwargs["epochs"], kwargs["batch_size"], len(kwargs["lrs"])) == (50, 1024, 13)
  assert calls["lowshot"][2]["seeds"] == (4, 5, 6, 7) and calls["lowshot"][2]["split_dir"] is None
  assert (calls["cluster"][2]["restarts"], calls["cluster"][2]["algorithm"]) == (100, "minibatch")
  settings = results[next(iter(results))]["settings"]
  assert settings["dtype"] == "bfloat16" and settings["probe_augmentation"] == "none"
  assert results[next(iter(results))]["preset"] == "paper"


def test_encoder_without_cls_token_evaluates_on_the_mean_patch(tmp_path, capsys):
  """An I-JEPA-style encoder (no CLS token): every protocol's CLS default becomes the mean patch
  token, said once; an explicit CLS key is a one-line error naming the fix."""
  kwargs = dict(KWARGS, class_token=False, global_pool="avg", fc_norm=False)
  variables = ViT(**kwargs).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  path = str(tmp_path / "no_cls")
  convert_lib.save_flax(path, jax.tree.map(np.asarray, variables), kwargs)
  common = ["--checkpoint", path, "--train", "synthetic:32", "--test", "synthetic:16,seed=1",
            "--resize", "18", "--batch-size", "16", "--no-cache", "--no-progress",
            "--out", str(tmp_path / "eval")]
  results, = evaluate_tool.main(common + [
      "--protocols", "knn,per_block,probe,cluster", "--probe-epochs", "1",
      "--probe-lrs", "0.1", "--cluster-restarts", "1"]).values()
  assert "no CLS token: the mean patch token instead" in capsys.readouterr().out
  protocols = results["protocols"]
  assert set(protocols["knn"]["accuracy"]) == {"block1_patch_mean"}
  assert len(protocols["per_block"]["blocks"]) == 2
  assert protocols["cluster"]["features"] == "block1_patch_mean"
  assert results["settings"]["per_block_pooling"] == "patch_mean"
  with pytest.raises(SystemExit) as exit_info:
    evaluate_tool.main(common + ["--protocols", "knn", "--features", "block1_cls"])
  assert exit_info.value.code == 2
  assert "without a CLS token" in capsys.readouterr().err
