"""MAE pre-training: masking, loss, model wiring, the MNIST source, tools/pretrain_mae.py."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_refiner_jax.data import mnist
from mim_refiner_jax.models import mae as mae_lib
from mim_refiner_jax.models import vit

# 16 px images, patch 4: a 4x4 grid of 16 patches, 4 of them visible at ratio 0.75.
TINY = dict(patch_size=4, width=32, depth=2, num_heads=2, pos_grid=4, decoder_width=32,
            decoder_depth=1, decoder_heads=2, mask_ratio=0.75)


@pytest.fixture(scope="module")
def tiny():
  """The tiny MAE, its variables, and one jitted forward shared by the tests (one compile)."""
  model = mae_lib.MAE(**TINY)
  variables = model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                         jnp.zeros((1, 16, 16, 3)))
  forward = jax.jit(lambda images, ids: model.apply(variables, images, ids))
  return model, variables, forward


def test_random_masking_keeps_a_quarter_per_sample_and_restores_order():
  batch, n = 6, 64
  ids_shuffle = mae_lib.random_masking(jax.random.key(3), batch, n, 0.75)
  num_keep = mae_lib.num_visible(n, 0.75)
  keep, ids_restore, mask = (np.asarray(a) for a in mae_lib.masking_indices(ids_shuffle, num_keep))
  assert num_keep == 16 and keep.shape == (batch, 16)
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(batch, 48))
  for b in range(batch):
    assert len(set(keep[b])) == 16 and keep[b].min() >= 0 and keep[b].max() < n
    np.testing.assert_array_equal(mask[b, keep[b]], 0)  # kept patches are not masked
  kept_sets = {tuple(sorted(k)) for k in keep}
  assert len(kept_sets) == batch, "every sample should get its own mask"
  tokens = np.broadcast_to(np.arange(n), (batch, n))
  shuffled = np.take_along_axis(tokens, np.asarray(ids_shuffle), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(shuffled, ids_restore, axis=1), tokens)
  with pytest.raises(ValueError, match="mask ratio"):
    mae_lib.num_visible(n, 1.0)


def _numpy_norm_pix_patches(images, p):
  """Direct per-patch loop: patch (i, j) flattened as (row, col, channel), MAE's layout."""
  b, h, w, c = images.shape
  out = np.zeros((b, (h // p) * (w // p), p * p * c))
  for i in range(h // p):
    for j in range(w // p):
      patch = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1).astype(np.float64)
      mean = patch.mean(axis=1, keepdims=True)
      var = patch.var(axis=1, ddof=1, keepdims=True)  # torch's default unbiased var, as MAE
      out[:, i * (w // p) + j] = (patch - mean) / np.sqrt(var + 1e-6)
  return out


def test_norm_pix_target_matches_direct_numpy(rng_np):
  images = rng_np.normal(size=(2, 16, 12, 3)).astype(np.float32)
  images[0, :4, :4] = 0.5  # a flat patch: variance 0, target must be 0 (not nan)
  patches = mae_lib.patchify(jnp.asarray(images), 4)
  target = np.asarray(mae_lib.norm_pix_target(patches))
  np.testing.assert_allclose(target, _numpy_norm_pix_patches(images, 4), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(target[0, 0], 0)
  square = jnp.asarray(images[:, :12, :12])
  np.testing.assert_array_equal(mae_lib.unpatchify(mae_lib.patchify(square, 4), 4), square)


def test_loss_counts_masked_patches_only(rng_np):
  images = jnp.asarray(rng_np.normal(size=(3, 16, 16, 3)), jnp.float32)
  ids = mae_lib.random_masking(jax.random.key(5), 3, 16, 0.75)
  _, _, mask = mae_lib.masking_indices(ids, 4)
  target = mae_lib.norm_pix_target(mae_lib.patchify(images, 4))
  garbage = jnp.asarray(rng_np.normal(size=target.shape) * 10, jnp.float32)
  m = mask[:, :, None] > 0
  perfect_on_masked = jnp.where(m, target, garbage)
  assert float(mae_lib.mae_loss(perfect_on_masked, images, mask, 4)) < 1e-8
  perfect_on_visible = jnp.where(m, garbage, target)
  loss = float(mae_lib.mae_loss(perfect_on_visible, images, mask, 4))
  sq = ((np.asarray(garbage) - np.asarray(target)) ** 2).mean(-1)
  expected = (sq * np.asarray(mask)).sum() / np.asarray(mask).sum()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert loss > 10


def test_encoder_variables_are_exactly_a_vit(tiny):
  model, variables, _ = tiny
  encoder = vit.ViT(**model.encoder_kwargs)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  as_shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert as_shapes(variables["params"]["encoder"]) == as_shapes(shapes["params"])
  assert as_shapes(variables["buffers"]["encoder"]) == as_shapes(shapes["buffers"])
  others = set(variables["params"]) - {"encoder"}
  assert all(k.startswith("decoder_") or k == "mask_token" for k in others), others
  assert set(variables["buffers"]) == {"encoder"}
  # The encoder table is MAE's fixed sin-cos (it is never trained).
  np.testing.assert_allclose(variables["buffers"]["encoder"]["pos_embed"],
                             vit.sincos_pos_embed(4, 32), atol=1e-6)


def test_prediction_ignores_masked_pixels_and_uses_visible_ones(tiny, rng_np):
  _, _, forward = tiny
  images = rng_np.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ids = mae_lib.random_masking(jax.random.key(7), 2, 16, 0.75)
  keep, _, mask = (np.asarray(a) for a in mae_lib.masking_indices(ids, 4))
  pred, out_mask = forward(jnp.asarray(images), ids)
  assert pred.shape == (2, 16, 4 * 4 * 3)
  np.testing.assert_array_equal(out_mask, mask)

  def change_patch(x, b, patch):
    x = x.copy()
    r, c = divmod(int(patch), 4)
    x[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
    return x

  masked_patch = np.flatnonzero(mask[0])[0]
  pred_masked_changed, _ = forward(jnp.asarray(change_patch(images, 0, masked_patch)), ids)
  np.testing.assert_allclose(pred_masked_changed, pred, atol=1e-5)
  pred_visible_changed, _ = forward(jnp.asarray(change_patch(images, 0, keep[0, 0])), ids)
  assert np.abs(np.asarray(pred_visible_changed[0] - pred[0])).max() > 1e-3
  np.testing.assert_allclose(pred_visible_changed[1], pred[1], atol=1e-5)  # samples independent


def test_mnist_splits_are_stratified_and_disjoint():
  all_images, all_labels = mnist.load_mnist("all")
  train_images, train_labels = mnist.load_mnist("train")
  val_images, val_labels = mnist.load_mnist("val")
  assert all_images.shape == (5000, 28, 28) and all_images.dtype == np.uint8
  assert all_labels.dtype == np.int64
  np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(val_labels), np.full(10, 100))
  train_rows = {im.tobytes() for im in train_images}
  val_rows = {im.tobytes() for im in val_images}
  assert not train_rows & val_rows
  np.testing.assert_array_equal(mnist.load_mnist("train")[0], train_images)  # deterministic
  with pytest.raises(ValueError, match="unknown MNIST split"):
    mnist.load_mnist("test")


def test_to_rgb_pads_or_resizes():
  images, _ = mnist.load_mnist("val")
  images = images[:5]
  padded = mnist.to_rgb(images, 32)
  assert padded.shape == (5, 32, 32, 3) and padded.dtype == np.uint8
  np.testing.assert_array_equal(padded[:, 2:30, 2:30, 1], images)
  assert padded[:, :2].max() == 0 and padded[:, :, 30:].max() == 0
  np.testing.assert_array_equal(padded[..., 0], padded[..., 2])
  small = mnist.to_rgb(images, 16)
  assert small.shape == (5, 16, 16, 3) and small.max() > 100
  with pytest.raises(ValueError, match="uint8"):
    mnist.to_rgb(images.astype(np.float32), 32)


def _load_tool():
  return importlib.import_module("mim_refiner_jax.tools.pretrain_mae")


def test_pretrain_tool_trains_and_writes_a_loadable_encoder(tmp_path):
  tool = _load_tool()
  out, pth = tmp_path / "mae", tmp_path / "mae.pth"
  summary = tool.main(["--out", str(out), "--torch-out", str(pth), "--width", "32", "--depth", "2",
                       "--heads", "2", "--patch-size", "8", "--image-size", "32",
                       "--decoder-width", "32", "--decoder-depth", "1", "--batch-size", "32",
                       "--steps", "3", "--log-every", "1", "--knn", "none"])
  losses = [h["loss"] for h in summary["history"]]
  assert len(losses) == 3 and all(np.isfinite(losses)), losses
  assert (out / "pretrain_mae.json").exists()
  kwargs = summary["vit_kwargs"]
  assert kwargs == dict(width=32, depth=2, num_heads=2, patch_size=8, mlp_ratio=4.0,
                        prenorm=True, pos_grid=4)
  try:
    from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("mim_refiner_jax.convert.checkpoints is not available to read the checkpoint")
  flax_ckpt = checkpoints.load_flax(out)
  assert flax_ckpt.vit_kwargs == kwargs
  encoder = vit.ViT(**flax_ckpt.vit_kwargs)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  as_shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert as_shapes(flax_ckpt.variables) == as_shapes(dict(shapes))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  tokens, _ = encoder.apply(flax_ckpt.variables, images)
  assert tokens.shape == (2, 1 + 16, 32) and np.isfinite(np.asarray(tokens)).all()
  # The MAE-layout .pth ({"model": timm names}) holds the same encoder.
  torch_ckpt = checkpoints.load_pretrained(pth)
  assert torch_ckpt.info["format"] == "mae" and torch_ckpt.vit_kwargs == kwargs
  jax.tree.map(np.testing.assert_array_equal, torch_ckpt.variables, flax_ckpt.variables)
