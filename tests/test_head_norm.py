"""heads.norm (models/heads.py): sync_batch unchanged, async_stats, batch_renorm and local_batch
against numpy transcriptions on 1 and 8 devices, the compiled forward's wait on all-reduces
(hlo_deps), and stage 2 -> 3 carrying the async statistics."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mim_refiner_jax import hlo_deps
from mim_refiner_jax import sharding
from mim_refiner_jax import state as state_lib
from mim_refiner_jax import train_step
from mim_refiner_jax.models import heads
from mim_refiner_jax.models.heads import IDHead
from tests import tiny_refiner

V, B, D = 3, 16, 8      # views, global batch, input features
HEAD = dict(proj_hidden_dim=12, pred_hidden_dim=10, output_dim=6)
M = heads.BN_MOMENTUM


# ----------------------------------------------------------------------------- numpy transcription
def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_head(params, stats, x, norm, groups=1):
  """float64 IDHead train-mode forward: `(z, p, new stats)` (the maths of models/heads.py)."""
  new_stats = {}

  def layer(name, h, gelu):
    p, s = params[name], stats[name]["bn"]
    h = h @ np.asarray(p["dense"]["kernel"], np.float64)
    scale, bias = (np.asarray(p["bn"][k], np.float64) for k in ("scale", "bias"))
    mean, var = np.asarray(s["mean"], np.float64), np.asarray(s["var"], np.float64)
    if norm in ("async_stats", "batch_renorm"):  # previous statistics; this batch's for the EMA
      y = (h - mean) / np.sqrt(var + heads.BN_EPS)
      if norm == "batch_renorm":  # Ioffe's r and d per group (the value's, without gradient)
        hg = h.reshape(h.shape[0], groups, -1, h.shape[-1])
        gm, gs = hg.mean(axis=(0, 2), keepdims=True), np.sqrt(hg.var(axis=(0, 2), keepdims=True)
                                                                + heads.BN_EPS)
        std = np.sqrt(var + heads.BN_EPS)
        r, d = np.clip(gs / std, 1 / 3, 3), np.clip((gm - mean) / std, -5, 5)
        if float(s["weight"]) == 0:
          r, d = 1.0, 0.0
        y = ((hg - gm) / gs * r + d).reshape(h.shape)
      w = (1 - M) * float(s["weight"]) + M
      bm, bv = h.reshape(-1, h.shape[-1]).mean(0), h.reshape(-1, h.shape[-1]).var(0)
      new = {"mean": mean + M / w * (bm - mean), "var": var + M / w * (bv - var), "weight": w}
    else:  # local_batch: groups of consecutive samples of the batch axis (axis 1)
      hg = h.reshape(h.shape[0], groups, -1, h.shape[-1])
      gm, gv = hg.mean(axis=(0, 2), keepdims=True), hg.var(axis=(0, 2), keepdims=True)
      y = ((hg - gm) / np.sqrt(gv + heads.BN_EPS)).reshape(h.shape)
      n = hg.shape[0] * hg.shape[2]
      new = {"mean": (1 - M) * mean + M * gm.reshape(groups, -1).mean(0),
             "var": (1 - M) * var + M * (gv.reshape(groups, -1) * n / (n - 1)).mean(0)}
    new_stats[name] = {"bn": new}
    y = y * scale + bias
    return np_gelu(y) if gelu else y

  z = np.asarray(x, np.float64)
  for i in range(3):
    z = layer(f"projector_{i}", z, gelu=i < 2)
  p = z
  for i in range(2):
    p = layer(f"predictor_{i}", p, gelu=i < 1)
  return z, p, new_stats


# ----------------------------------------------------------------------------- jitted head
def mesh_of(n):
  return sharding.make_mesh(devices=jax.devices()[:n])


def head_step(mesh, norm, groups):
  """`(variables, x) -> (z, p, new batch_stats)` jitted with x's batch axis sharded on `mesh`."""
  head = IDHead(**HEAD, norm=norm, norm_groups=groups)
  rows = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  rep = NamedSharding(mesh, P())

  def apply(variables, x):
    (z, p), new = head.apply(variables, x, train=True, mutable=["batch_stats"])
    return z, p, new["batch_stats"]
  return head, jax.jit(apply, in_shardings=(rep, rows), out_shardings=(rows, rows, rep))


def inputs(step):
  rng = np.random.default_rng(step)
  return (rng.normal(size=(V, B, D)) * (1 + step) + step).astype(np.float32)


def three_steps(norm, n):
  """Three train-mode steps of a head with `norm` on `n` devices (groups = n), from key 0."""
  head, fn = head_step(mesh_of(n), norm, n)
  variables = head.init(jax.random.key(0), jnp.zeros((V, 2, D)), train=False)
  stats, out = variables["batch_stats"], []
  for t in range(3):
    z, p, stats = fn({"params": variables["params"], "batch_stats": stats}, inputs(t))
    out.append(jax.device_get((z, p, stats)))
  return jax.device_get(variables), out


@pytest.fixture(scope="module")
def async_runs():
  """Three async_stats steps on 1 and on 8 devices, from the same variables."""
  return {n: three_steps("async_stats", n) for n in (1, 8)}


@pytest.mark.parametrize("norm,n", [("async_stats", 1), ("async_stats", 8), ("batch_renorm", 1),
                                    ("batch_renorm", 8)])
def test_stored_statistics_modes_match_numpy_over_three_steps(async_runs, norm, n):
  variables, out = async_runs[n] if norm == "async_stats" else three_steps(norm, n)
  stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
  assert float(stats["projector_0"]["bn"]["weight"]) == 0.0
  for t in range(3):
    z, p, stats = np_head(variables["params"], stats, inputs(t), norm, groups=n)
    got_z, got_p, got_stats = out[t]
    # fp32 against float64; tolerances 1e-4 relative (activations of order 1..10)
    np.testing.assert_allclose(got_z, z, rtol=1e-4, atol=1e-4, err_msg=f"z step {t}")
    np.testing.assert_allclose(got_p, p, rtol=1e-4, atol=1e-4, err_msg=f"p step {t}")
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
                 got_stats, stats)
  # bias correction: w_3 = 1 - 0.9^3, and step 1 normalised with exactly step 0's statistics
  assert np.isclose(float(out[2][2]["predictor_1"]["bn"]["weight"]), 1 - (1 - M) ** 3)


def test_async_stats_is_the_same_on_1_and_8_devices(async_runs):
  """The statistics are global either way: only the reduction order differs (1e-5 of the largest
  value: step 0 is un-normalised, so values reach ~100)."""
  for (z1, p1, s1), (z8, p8, s8) in zip(async_runs[1][1], async_runs[8][1]):
    np.testing.assert_allclose(z8, z1, rtol=1e-5, atol=1e-5 * np.abs(z1).max())
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-5 * np.abs(p1).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s8, s1)


def test_async_stats_passes_no_gradient_through_the_statistics():
  """d(sum y)/dx with the stored statistics is the affine slope: the batch does not enter."""
  bn = heads.TorchBatchNorm(norm="async_stats")
  x = jnp.asarray(inputs(1)[..., :4])
  variables = bn.init(jax.random.key(0), x, train=False)
  variables = {"params": {"scale": jnp.full((4,), 2.0), "bias": jnp.zeros(4)},
               "batch_stats": dict(variables["batch_stats"], var=jnp.full((4,), 3.0))}
  forward = lambda x: bn.apply(variables, x, train=True, mutable=["batch_stats"])[0].sum()
  grad = jax.grad(forward)(x)
  np.testing.assert_allclose(grad, np.full(x.shape, 2 / np.sqrt(3 + heads.BN_EPS)), rtol=1e-6)


def test_batch_renorm_is_sync_batch_when_the_stored_statistics_are_the_batchs():
  """r = 1, d = 0 when the stored mean/var are the batch's own (1 device): value and gradient are
  sync_batch's (so the gradient flows through the batch statistics, unlike async_stats'); with
  other stored statistics the value is async_stats' (clips inactive) but the gradient is not."""
  x = jnp.asarray(inputs(1)[..., :4])
  params = {"scale": jnp.asarray([2.0, 0.5, 1.0, 3.0]), "bias": jnp.asarray([0.0, 1.0, -1.0, 0.5])}
  own = {"mean": x.reshape(-1, 4).mean(0), "var": x.reshape(-1, 4).var(0), "weight": jnp.ones(())}
  other = dict(own, mean=own["mean"] + 0.3, var=own["var"] * 1.5)
  probe = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)

  def value_and_grad(norm, stats):
    bn = heads.TorchBatchNorm(norm=norm)
    variables = {"params": params, "batch_stats": stats if norm != "sync_batch" else
                 {k: stats[k] for k in ("mean", "var")}}
    forward = lambda x: bn.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return forward(x), jax.grad(lambda x: jnp.sum(forward(x) * probe))(x)

  y_renorm, g_renorm = value_and_grad("batch_renorm", own)
  y_sync, g_sync = value_and_grad("sync_batch", own)
  np.testing.assert_allclose(y_renorm, y_sync, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_renorm, g_sync, rtol=1e-4, atol=1e-5)
  y_renorm, g_renorm = value_and_grad("batch_renorm", other)
  y_async, g_async = value_and_grad("async_stats", other)
  np.testing.assert_allclose(y_renorm, y_async, rtol=1e-5, atol=1e-5)
  assert not np.allclose(g_renorm, g_async, atol=1e-2)


def test_local_batch_matches_numpy_per_device_groups():
  """8 devices: each normalises its 2 samples x 3 views; the running stats average the groups."""
  head, fn = head_step(mesh_of(8), "local_batch", 8)
  variables = head.init(jax.random.key(1), jnp.zeros((V, 2, D)), train=False)
  z, p, stats = jax.device_get(fn(variables, inputs(2)))
  want_z, want_p, want_stats = np_head(variables["params"], variables["batch_stats"], inputs(2),
                                       "local_batch", groups=8)
  np.testing.assert_allclose(z, want_z, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(p, want_p, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), stats,
               want_stats)
  # and it is not the global normalisation: per-group statistics differ from the batch's
  global_z = np_head(variables["params"], variables["batch_stats"], inputs(2), "local_batch")[0]
  assert not np.allclose(z, global_z, atol=1e-2)


def test_local_batch_on_one_device_equals_sync_batch():
  mesh = mesh_of(1)
  head_local, local = head_step(mesh, "local_batch", 1)
  _, sync = head_step(mesh, "sync_batch", 1)
  variables = head_local.init(jax.random.key(2), jnp.zeros((V, 2, D)), train=False)
  got = jax.device_get(local(variables, inputs(1)))
  want = jax.device_get(sync(variables, inputs(1)))
  # the same sums in another reduction shape: equal up to float32 rounding (1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got, want)


# ----------------------------------------------------------------------------- compiled HLO
def test_forward_waits_for_statistics_all_reduces_only_in_sync_batch():
  """The compiled forward+backward of a head on 8 devices: sync_batch's normalisation depends on
  the BN-statistics all-reduces, async_stats', local_batch's and batch_renorm's on none
  (async_stats and batch_renorm still all-reduce their statistics, for the next step)."""
  mesh = mesh_of(8)
  found = {}
  for norm in ("sync_batch", "async_stats", "local_batch", "batch_renorm"):
    head, _ = head_step(mesh, norm, 8)
    variables = head.init(jax.random.key(0), jnp.zeros((V, 2, D)), train=False)

    def loss(params, stats, x):
      (z, p), new = head.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(jax.lax.stop_gradient(z) * p), new

    rows = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P()), rows))
    text = fn.lower(variables["params"], variables["batch_stats"],
                    jax.ShapeDtypeStruct((V, B, D), jnp.float32)).compile().as_text()
    computations, _ = hlo_deps.parse(text)
    waited, marked = hlo_deps.waited_for(computations, "head_norm_apply", "IDHead")
    stats_ops = [c for c in hlo_deps.collectives(computations) if "head_norm_stats" in c.op_name]
    found[norm] = (marked, len(waited), len(stats_ops))
  assert found["sync_batch"][0] > 0 and found["sync_batch"][1] > 0, found
  assert found["async_stats"][0] > 0 and found["async_stats"][1] == 0, found
  assert found["async_stats"][2] > 0, found  # the statistics are still communicated
  assert found["local_batch"][0] > 0 and found["local_batch"][1] == 0, found
  assert found["batch_renorm"][0] > 0 and found["batch_renorm"][1] == 0, found
  assert found["batch_renorm"][2] > 0, found


# ----------------------------------------------------------------------------- the train step
class LegacyTorchBatchNorm(nn.Module):
  """models/heads.py's TorchBatchNorm before heads.norm (commit f654446), verbatim."""
  eps: float = heads.BN_EPS
  momentum: float = heads.BN_MOMENTUM
  dtype: object = jnp.float32
  norm: str = "sync_batch"   # accepted, ignored
  groups: int = 1

  @nn.compact
  def __call__(self, x, train):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    x = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = int(np.prod(x.shape[:-1]))
      mean = x.mean(axis=axes)
      var = jnp.square(x - mean).mean(axis=axes)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


def test_sync_batch_step_is_bitwise_the_previous_one(monkeypatch):
  """Three stage-3 steps of the tiny refiner: the default (sync_batch) against the step built with
  the pre-heads.norm BatchNorm: every state leaf and metric bit for bit."""
  want_state, want_history = tiny_refiner.reference_run(3)  # today's code, sync_batch default
  s = tiny_refiner.setup("1dev", 3)
  monkeypatch.setattr(heads, "TorchBatchNorm", LegacyTorchBatchNorm)
  legacy = train_step.make_train_step(
      s["model"], s["tx"], s["mesh"], s["shardings"], topk=5, ema_decay=0.99,
      sim_dtype=jnp.bfloat16, lr_fn=None)
  state = tiny_refiner.put_global(tiny_refiner.initial_state_numpy(3), s["shardings"])
  state, history = tiny_refiner.run_steps(dict(s, step=legacy), state, tiny_refiner.STEPS)
  got, want = tiny_refiner.flat(jax.device_get(state)), tiny_refiner.flat(want_state)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for g, w in zip(history, want_history):
    for k in g:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_async_stats_state_trains_and_carries_into_stage_3():
  """A stage-2 async_stats step on the tiny refiner updates the statistics (weight 0.1 after one
  step) and stage3_from_stage2 carries them unchanged."""
  s = tiny_refiner.setup("1dev", 2)
  model = tiny_refiner.make_model()
  model.head = model.head.clone(norm="async_stats")
  init = tiny_refiner.init_fn(model, s["tx"], 2)
  shardings = sharding.infer_shardings(s["mesh"], jax.eval_shape(init, jax.random.PRNGKey(0)),
                                       s["rules"])
  # the shared sync_batch initial state plus async_stats' weight (w_0 = 0) in every BatchNorm
  initial = tiny_refiner.initial_state_numpy(2)
  stats = jax.tree.map(lambda a: a, initial["batch_stats"])
  for head in stats.values():
    for layer in head.values():
      layer["bn"]["weight"] = np.zeros((), np.float32)
  state = tiny_refiner.put_global(dict(initial, batch_stats=stats), shardings)
  step = train_step.make_train_step(model, s["tx"], s["mesh"], shardings, topk=1,
                                    freeze_encoder=True, sim_dtype=jnp.float32)
  state, metrics = step(state, sharding.global_batch(s["mesh"], tiny_refiner.make_batch(0)))
  assert np.isfinite(float(metrics["loss"]))
  stats = jax.device_get(state["batch_stats"])
  for name in stats:
    assert np.isclose(float(stats[name]["projector_0"]["bn"]["weight"]), M)
    assert not np.allclose(stats[name]["projector_0"]["bn"]["mean"], 0)
  s3_tx, _ = tiny_refiner.make_tx(model, 3)
  s3, _ = state_lib.stage3_from_stage2(state, s3_tx, s["mesh"], s["rules"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(s3["batch_stats"]), stats)


def test_unknown_norm_is_a_user_error_and_stage_3_keeps_stage_2s():
  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import demo_config, errors, memory, train
  config = demo_config.get_config("stage=3")
  config.heads.norm = "batch"
  with pytest.raises(errors.UserError, match="heads.norm='batch': choose one of sync_batch"):
    train.build_model(config, memory.vit_kwargs_for(config))
  config.heads.norm = "async_stats"
  saved = demo_config.get_config("stage=2").to_dict()  # sync_batch
  with pytest.raises(errors.UserError,
                     match="heads.norm='async_stats' but .* heads.norm='sync_batch'"):
    train.check_same_fields(config, saved, train.HEAD_FIELDS, "the stage-2 state", "fix")


def test_the_tools_offer_every_mode():
  """demo.py and head_norm_collectives.py spell the modes out (they import jax late)."""
  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.tools import demo, head_norm_collectives
  assert demo.HEAD_NORMS == heads.NORMS
  assert head_norm_collectives.MODES == heads.NORMS
