"""Evaluation as the paper ran it (issue 20): the reference's probe input and head, the
fresh-augmentation probe, the presets' values, the one eval view.

The torch side transcribes ml-jku/MIM-Refiner: `vit_block_extractor(num_last_blocks=n)` +
`concat_finalizer(dim=-1)` + `ConcatClassAverage` (models/poolings/concat_class_average.py), then
`probe_model.norms` = BatchNorm1d(affine=False) and `LinearProbe` = nn.Linear. Tiny ViT "mu"
(width 32, depth 2, patch 4) at 16 px on synthetic images.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_refiner_jax.convert import checkpoints as convert_lib
from mim_refiner_jax.evaluation import dataset_features as dataset_lib
from mim_refiner_jax.evaluation import encoders as encoders_lib
from mim_refiner_jax.evaluation import features as features_lib
from mim_refiner_jax.evaluation import presets, probe, probe_stream, suite
from mim_refiner_jax.models.vit import ViT, vit_kwargs

KWARGS = vit_kwargs("mu", 4, image_size=16)
SOURCE = dict(name="synthetic", num_examples=40, num_classes=4, image_size=20, seed=3)
TEST_SOURCE = dict(SOURCE, num_examples=24, seed=4)
TRANSFORM = dict(resize_size=18, crop_size=16)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "mu_flax")
  variables = jax.jit(ViT(**KWARGS).init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  convert_lib.save_flax(path, jax.tree.map(np.asarray, variables), KWARGS)
  return encoders_lib.load_encoder(path)


def torch_reference_probe_input(block_outputs: list, num_last_blocks: int) -> torch.Tensor:
  """VitBlockExtractor(num_last_blocks) hooks the raw block outputs, ConcatFinalizer(dim=-1)
  concatenates them along channels, ConcatClassAverage pools: [cls, mean of tokens 1:]."""
  concat = torch.concat(block_outputs[-num_last_blocks:], dim=-1)  # [B, 1 + T, n D]
  cls = concat[:, 0]
  avg = concat[:, 1:].mean(dim=1)
  return torch.concat([cls, avg], dim=1)


def test_last_n_pooling_and_probe_head_match_the_reference_in_torch(encoder):
  """Same block outputs -> our "last2_cls_patch_mean" and LinearGrid head vs the torch
  transcription (fp32 both; tolerance 1e-5 absolute on features, 1e-4 on logits: summation
  order). The DINOv2 variant (2 CLS + the last mean patch, the old default) is a different
  vector, so this fails on the old pooling."""
  images = np.asarray(jax.random.normal(jax.random.key(1), (6, 16, 16, 3)), np.float32)
  keys = ("last2_cls_patch_mean", "last2_cls_patch_mean_dinov2", "last2_cls")
  vit = ViT(**KWARGS)
  out, aux = jax.jit(features_lib.encoder_apply_fn(vit, keys))(encoder.variables, images)
  ours = features_lib.select_features(out, aux, keys, depth=2)
  blocks = [torch.from_numpy(np.array(aux["block_tokens"][i])) for i in (0, 1)]
  expected = torch_reference_probe_input(blocks, 2)
  assert expected.shape == (6, 4 * 32)
  np.testing.assert_allclose(ours["last2_cls_patch_mean"], expected.numpy(), atol=1e-5)
  assert ours["last2_cls_patch_mean_dinov2"].shape == (6, 3 * 32)
  np.testing.assert_allclose(ours["last2_cls"], torch.concat([b[:, 0] for b in blocks], 1),
                             atol=1e-5)

  # The probe head on these features: BatchNorm1d(affine=False) in train mode -> Linear.
  x = np.array(ours["last2_cls_patch_mean"])
  model = probe.LinearGrid(1, 1, x.shape[1], 4)
  params, stats = model.init(np.random.default_rng(0))
  logits, new_stats = model.apply(jax.tree.map(jnp.asarray, params),
                                  jax.tree.map(jnp.asarray, stats), x[None], train=True)
  bn = torch.nn.BatchNorm1d(x.shape[1], affine=False)
  linear = torch.nn.Linear(x.shape[1], 4)
  with torch.no_grad():
    linear.weight.copy_(torch.from_numpy(params["kernel"][0, 0].T.astype(np.float32)))
    linear.bias.zero_()
    torch_logits = linear(bn(torch.from_numpy(x)))
  np.testing.assert_allclose(np.asarray(logits[0, 0]), torch_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(new_stats["var"][0]), bn.running_var.numpy(), rtol=1e-4)


def test_fresh_augmentation_probe_equals_the_cached_probe_on_the_same_views(encoder):
  """The streamed probe (views extracted on the fly on 8 devices, epoch e under augment_seed e)
  trains exactly what linear_probe_grid trains on the cached copies e = 0..E-1 (same shuffles,
  same init): the same accuracy after every epoch. And epoch views differ (fresh crops)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  assert mesh.size == 8
  sets = {"last1_cls": "cls", "last2_cls+patch": "last2_cls_patch_mean"}
  keys = sorted(set(sets.values()))
  test = dataset_lib.dataset_features(encoder, TEST_SOURCE, keys, transform=TRANSFORM,
                                      batch_size=8, mesh=mesh)
  epochs, kwargs = 2, dict(lrs=(0.05, 0.5), batch_size=16, seed=0, progress=False, mesh=mesh)
  copies = [dataset_lib.dataset_features(encoder, SOURCE, keys, batch_size=8, mesh=mesh,
                                         transform=dict(TRANSFORM, augment_seed=e))
            for e in range(epochs)]
  assert not np.allclose(copies[0]["cls"], copies[1]["cls"])  # a new view each epoch
  cached = probe.linear_probe_grid(
      {n: np.stack([c[k] for c in copies]) for n, k in sets.items()}, copies[0]["label"],
      {n: test[k] for n, k in sets.items()}, test["label"], epochs=epochs, **kwargs)
  fresh = probe_stream.fresh_augmentation_probe(
      encoder, SOURCE, TRANSFORM, sets, copies[0]["label"], {n: test[k] for n, k in sets.items()},
      test["label"], epochs=epochs, dtype="float32", **kwargs)
  assert fresh["features"] == cached["features"] and fresh["best"] == cached["best"]
  assert fresh["augmentation"] == "fresh per epoch" and len(fresh["epoch_seconds"]) == epochs
  json.dumps(fresh)


# (setting, paper value, source) -- from the reference, independent of presets.py
PAPER = [
    ("features", "last", "yamls/eval/knn/template_tracked.yaml: block_indices [-1], "
     "use_next_norm false, class_token and mean_patch"),
    ("k", (10,), "offline_knn_metrics_callback.py: knns or [10]"),
    ("tau", 0.07, "metrics/knn.py: tau=0.07"),
    ("knn_dtype", "float32", "multiclass_knn outside trainer.autocast_context"),
    ("dtype", "bfloat16", "template_tracked.yaml: precision bfloat16"),
    ("probe_lrs", (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
     "probe_processor.py grid dinov2"),
    ("probe_last4_pooling", "reference", "probe_processor.py: concat_finalizer + "
     "concat_class_average"),
    ("probe_epochs", 50, "template_tracked_dinov2grid.yaml / 7mzhpufg.yaml: epochs 50"),
    ("probe_batch_size", 1024, "template_tracked_dinov2grid.yaml: effective_batch_size 1024"),
    ("probe_augmentation", "fresh", "template_tracked_dinov2grid.yaml: train_minaug"),
    ("probe_dtype", "bfloat16", "template_tracked_dinov2grid.yaml: precision bfloat16"),
    ("lowshot_shots", (1, 2, 5), "refiner_facts 10.3: 1/2/5-shot"),
    ("lowshot_percents", (1.0,), "refiner_facts 10.3 / MSN 1percent.txt"),
    ("lowshot_seeds", (0, 1, 2), "refiner_facts 10.3: 3 MSN splits"),
    ("cluster_algorithm", "minibatch", "paper 5.3: mini-batch k-means"),
    ("cluster_restarts", 100, "paper 5.3: 100 runs"),
]


def test_paper_preset_values_match_the_reference():
  paper = presets.values("paper")
  for setting, value, source in PAPER:
    assert paper[setting] == value, f"{setting}: {paper[setting]!r} != {value!r} ({source})"
  assert paper["separation_sample"] >= 50_000  # IN-1k val scored on all its rows
  default = presets.values("default")
  assert default["probe_epochs"] < 50 and default["probe_augmentation"] == "none"  # stays fast
  # Options' field defaults are the default preset; from_preset overrides any field.
  opts = suite.Options(train="a", test="b")
  assert all(getattr(opts, k) == v for k, v in default.items())
  custom = suite.Options.from_preset("paper", train="a", test="b", k=(20,))
  assert custom.k == (20,) and custom.probe_epochs == 50 and custom.preset == "paper"
  with pytest.raises(ValueError, match="unknown evaluation settings"):
    suite.Options.from_preset("paper", train="a", test="b", probe_epoch=3)
  with pytest.raises(ValueError, match="unknown preset"):
    presets.values("fast")
  assert presets.markdown_table().count("\n") == len(presets.TABLE) + 1


def test_a_workdir_is_evaluated_at_its_monitors_view(tmp_path):
  """One eval view: the demo's monitor resizes 32 and crops 32; the tools used 37/32 for the same
  workdir (93.3% vs 90.0% k-NN). Now a workdir's default view is its monitor's, and stated."""
  wd = tmp_path / "wd"
  (wd / "checkpoints").mkdir(parents=True)
  (wd / "run.json").write_text(json.dumps(
      {"config": {"evals": {"knn": {"resize_size": 32, "crop_size": 32}}}}))
  enc = types.SimpleNamespace(identity={"path": str(wd)}, image_size=32)
  transform, where = suite.eval_view(enc, suite.Options(train="a", test="b"))
  assert transform == dict(resize_size=32, crop_size=32) and "monitor" in where
  transform, _ = suite.eval_view(enc, suite.Options(train="a", test="b", resize=40))
  assert transform == dict(resize_size=40, crop_size=32)
  plain = types.SimpleNamespace(identity={"path": str(tmp_path / "x.th")}, image_size=32)
  transform, where = suite.eval_view(plain, suite.Options(train="a", test="b"))
  assert transform == dict(resize_size=37, crop_size=32) and "resolution" in where
  assert os.path.exists(wd / "run.json")


def test_label_sets_must_match():
  assert suite.check_label_sets([0, 1, 2, 2], [0, 2], allow=False) == []
  with pytest.raises(ValueError, match="lacks"):
    suite.check_label_sets([0, 1, 2], np.arange(10), allow=False)
  assert suite.check_label_sets([0, 1, 2], [0, 5], allow=True) == [5]


def test_progress_is_plain_lines_off_a_terminal(capsys):
  """Output to a file or pipe gets whole lines (about ten per loop), never a bar's carriage
  returns spliced into log lines; the low-shot, k-means and probe loops all report this way."""
  from mim_refiner_jax.evaluation import progress
  assert list(progress.iterate(range(20), "low-shot")) == list(range(20))
  err = capsys.readouterr().err
  assert "\r" not in err and len(err.splitlines()) == 10
  assert err.splitlines()[-1].startswith("low-shot: 20/20 (")
  list(progress.trange(5, "k-means", enabled=False))
  assert capsys.readouterr().err == ""
