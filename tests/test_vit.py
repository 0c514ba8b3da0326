"""ViT unit tests: torch-bicubic pos-table resize, shapes, argument errors, bf16 dtype boundaries.

The resize is checked against torch.nn.functional.interpolate(mode="bicubic",
align_corners=False) itself (refiner_facts.md section 1.1) on N(0, 1) tables: the algorithm in
float64 (1e-12), the model's fp32 path within 1e-6 of the exact result and within 5e-6 of torch's
fp32 kernel (which rounds its source coordinates in fp32 and is itself up to 3.5e-6 off).
Shapes and dtypes are checked with jax.eval_shape (no compile).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mim_refiner_jax.models.vit import ViT, resize_pos_embed, torch_bicubic_matrix, vit_kwargs

MU = dict(patch_size=4, width=32, depth=2, num_heads=2, pos_grid=4)


@pytest.mark.parametrize("src,dst", [((14, 14), (6, 6)), ((16, 16), (7, 7)), ((4, 4), (2, 2)),
                                     ((2, 2), (5, 5)), ((8, 8), (4, 4)), ((3, 3), (8, 8)),
                                     ((14, 14), (16, 16)), ((14, 14), (6, 9)), ((5, 7), (5, 7))])
def test_pos_resize_equals_torch_bicubic(src, dst):
  rng = np.random.default_rng(sum(src) * 31 + sum(dst))
  table = rng.standard_normal((1, *src, 8))

  def torch_resize(x):
    return F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).numpy()

  # The algorithm: in float64 the separable matrices reproduce torch to rounding error.
  exact = np.einsum("oh,pw,bhwd->bopd", torch_bicubic_matrix(src[0], dst[0]),
                    torch_bicubic_matrix(src[1], dst[1]), table)
  np.testing.assert_allclose(exact, torch_resize(table), atol=1e-12, rtol=0)
  # The fp32 path used by the model: within 1e-6 of the exact result. torch's own fp32 kernel
  # rounds its source coordinates in fp32 and is itself up to ~3.5e-6 off (16 -> 7), hence 5e-6.
  got = np.asarray(resize_pos_embed(jnp.asarray(table, jnp.float32), dst))
  assert got.shape == (1, *dst, 8) and got.dtype == np.float32
  np.testing.assert_allclose(got, exact, atol=1e-6, rtol=0)
  np.testing.assert_allclose(got, torch_resize(table.astype(np.float32)), atol=5e-6, rtol=0)


def test_bicubic_matrix_rows_sum_to_one_and_identity():
  for n_in, n_out in [(14, 6), (2, 5), (16, 7)]:
    np.testing.assert_allclose(torch_bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)
  np.testing.assert_array_equal(torch_bicubic_matrix(7, 7), np.eye(7))


def _shapes(prenorm=True, image=16, blocks=(0, 1), dtype=jnp.float32, batch=3, **capture):
  model = ViT(**MU, prenorm=prenorm, dtype=dtype)
  images = jax.ShapeDtypeStruct((batch, image, image, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, blocks=blocks, **capture),
                                   variables, images)


@pytest.mark.parametrize("prenorm", [True, False])
def test_shapes_and_variable_names(prenorm):
  variables, (out, aux) = _shapes(prenorm, image=24, blocks=(1,))  # 6x6 grid from a 4x4 table
  assert out.shape == (3, 1 + 36, 32)
  assert set(aux) == {"block_cls", "block_patch_mean", "cls", "patch_mean"}
  assert set(aux["block_cls"]) == {1} and aux["block_cls"][1].shape == (3, 32)
  assert aux["block_patch_mean"][1].shape == aux["cls"].shape == aux["patch_mean"].shape == (3, 32)
  params = variables["params"]
  assert ("norm" in params) == prenorm and ("embed_norm" in params) == (not prenorm)
  assert params["cls_token"].shape == (1, 1, 32)
  assert params["patch_embed"]["kernel"].shape == (4, 4, 3, 32)
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
  assert params["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (32, 128)
  assert variables["buffers"]["pos_embed"].shape == (1, 4, 4, 32)


@pytest.mark.parametrize("blocks", [(2,), (-1,), (0, 5)])
def test_out_of_range_blocks_raise(blocks):
  with pytest.raises(ValueError, match=r"block indices .* out of range for a ViT of depth 2"):
    _shapes(blocks=blocks)


def test_image_not_divisible_by_patch_raises():
  with pytest.raises(ValueError, match="not divisible by patch size 4"):
    _shapes(image=18)


@pytest.mark.parametrize("prenorm", [True, False])
def test_bf16_compute_keeps_residual_stream_fp32(prenorm):
  # Section 1.5: conv, linears and attention in bf16; LayerNorms, the position table and the
  # residual stream (every block output) in fp32.
  _, ((out, aux), state) = _shapes(prenorm, dtype=jnp.bfloat16, capture_intermediates=True,
                                   mutable=["intermediates"])
  inter = state["intermediates"]
  assert inter["patch_embed"]["__call__"][0].dtype == jnp.bfloat16
  for i in range(2):
    block = inter[f"blocks_{i}"]
    assert block["__call__"][0].dtype == jnp.float32, f"block {i} output"
    assert block["attn"]["__call__"][0].dtype == jnp.bfloat16
    assert block["attn"]["qkv"]["__call__"][0].dtype == jnp.bfloat16
    assert block["mlp"]["__call__"][0].dtype == jnp.bfloat16
    assert block["norm1"]["__call__"][0].dtype == jnp.float32
    assert aux["block_cls"][i].dtype == jnp.float32
  assert out.dtype == aux["cls"].dtype == aux["patch_mean"].dtype == jnp.float32


def test_remat_gives_the_same_outputs_and_gradients():
  """Rematerialisation (for 2B memory) changes what is stored for the backward pass, not results."""
  kwargs = vit_kwargs("mu", 4, image_size=16)
  plain, remat = ViT(**kwargs), ViT(**kwargs, remat=True)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = plain.init(jax.random.key(0), images)

  def loss(model, params):
    out, aux = model.apply({**variables, "params": params}, images, blocks=(0,))
    return (out ** 2).mean() + aux["block_cls"][0].sum()

  value_a, grads_a = jax.value_and_grad(lambda p: loss(plain, p))(variables["params"])
  value_b, grads_b = jax.value_and_grad(lambda p: loss(remat, p))(variables["params"])
  np.testing.assert_allclose(value_a, value_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_a, grads_b)


@pytest.mark.parametrize("prenorm", [True, False])
def test_attention_impls_and_cls_only_agree(prenorm):
  # The head-major einsum attention (default), jax.nn.dot_product_attention and the CLS-only last
  # block give the same CLS features and encoder gradients (fp32, tolerance 1e-5 / 1e-4 rel; the
  # gradients 1e-5 absolute too, for leaves up to ~8: seen 5.9e-6 on an Intel AMX machine).
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 3)), jnp.float32)
  variables = ViT(**MU, prenorm=prenorm).init(jax.random.PRNGKey(0), images)

  def run(attention, cls_only):
    model = ViT(**MU, prenorm=prenorm, attention=attention)

    def loss(params):
      _, aux = model.apply({**variables, "params": params}, images, blocks=(0, 1),
                           cls_only=cls_only)
      feats = (aux["cls"], aux["block_cls"][0], aux["block_cls"][1])
      return jnp.sum(jnp.sin(feats[0])) + jnp.sum(feats[1] * feats[2]), feats

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  ref_grads, ref_feats = run("dot_product_attention", False)
  for attention, cls_only in [("einsum", False), ("einsum", True)]:
    out_grads, out_feats = run(attention, cls_only)
    for a, b in zip(out_feats, ref_feats):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 out_grads, ref_grads)
