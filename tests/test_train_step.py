"""The train step on one device: stage 2 (frozen encoder), stage 2 -> 3, stage 3 (EMA), tracing."""

import jax
import numpy as np
import pytest

from mim_refiner_jax import state as state_lib
from mim_refiner_jax.optim import make_optimizer
from tests import tiny_refiner as tiny


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def stage2_run():
  s = tiny.setup("1dev", 2, topk=1)
  initial = tiny.initial_state_numpy(2)
  state = tiny.put_global(initial, s["shardings"])
  final, history = tiny.run_steps(s, state, tiny.STEPS)  # max_traces=1: one trace for 3 steps
  return s, initial, jax.device_get(final), history


def test_stage2_trains_heads_only(stage2_run):
  _, initial, final, history = stage2_run
  assert "ema" not in final
  assert leaves_equal(initial["params"]["encoder"], final["params"]["encoder"])
  assert leaves_equal(initial["buffers"], final["buffers"])
  assert max_abs_diff(initial["params"]["heads"], final["params"]["heads"]) > 1e-5
  assert max_abs_diff(initial["batch_stats"], final["batch_stats"]) > 1e-3
  assert int(final["step"]) == tiny.STEPS
  for metrics in history:
    assert np.isfinite(metrics["loss"])
    heads = [h.name for h in tiny.HEADS]
    np.testing.assert_allclose(metrics["loss"], sum(metrics[f"{h}/loss"] for h in heads),
                               rtol=1e-6)
    for h in heads:
      assert set(metrics) >= {f"{h}/{k}" for k in (
          "global_loss", "local_loss", "alignment", "global_alignment", "local_alignment",
          "nn_similarity", "nn_age", "nn_accuracy")}
      # 2 + 2 * 2 terms: loss = (2 * global + 4 * local) / 6
      np.testing.assert_allclose(
          metrics[f"{h}/loss"],
          (2 * metrics[f"{h}/global_loss"] + 4 * metrics[f"{h}/local_loss"]) / 6, rtol=1e-6)
  np.testing.assert_allclose([m["lr"] for m in history],
                             [2e-4 * 16 / 256 * (s + 1) / 3 for s in range(2)]
                             + [history[2]["lr"]], rtol=1e-6)


def test_stage2_queue_fifo(stage2_run):
  _, initial, final, _ = stage2_run
  n, steps = tiny.BATCH, tiny.STEPS
  for name, queue in final["queues"].items():
    assert int(queue["ptr"]) == n * steps % tiny.QUEUE
    written = np.arange(n * steps)
    expected_idx = np.concatenate([tiny.make_batch(i)["index"] for i in range(steps)])
    expected_label = np.concatenate([tiny.make_batch(i)["label"] for i in range(steps)])
    np.testing.assert_array_equal(queue["idx"][written], expected_idx)
    np.testing.assert_array_equal(queue["label"][written], expected_label)
    # entries written at step i have age n * (steps - i); untouched ones aged n * steps
    np.testing.assert_array_equal(queue["age"][written], np.repeat(n * np.arange(steps, 0, -1), n))
    np.testing.assert_array_equal(queue["age"][n * steps:], n * steps)
    np.testing.assert_array_equal(queue["x"][n * steps:], initial["queues"][name]["x"][n * steps:])
    assert not np.allclose(queue["x"][:n], initial["queues"][name]["x"][:n])


def test_stage2_enqueues_view0_projector_outputs(stage2_run):
  # Recompute the first step's projector outputs of global view 0 (g1) from the initial state.
  s, initial, final, _ = stage2_run
  batch = tiny.make_batch(0)
  b = tiny.BATCH
  outputs, _ = jax.jit(lambda st, g, l: s["model"].apply(
      st["params"], st["buffers"], st["batch_stats"], g, l, train=True))(
          initial, batch["global"], batch["local"])
  for name, (z, _) in outputs.items():
    assert z.shape == (2 + tiny.NUM_LOCAL, b, 16)
    np.testing.assert_allclose(final["queues"][name]["x"][:b], z[0], rtol=1e-5, atol=1e-5)


def test_stage3_from_stage2_then_train(stage2_run):
  _, _, stage2_final, _ = stage2_run
  s3 = tiny.setup("1dev", 3)
  state3, shardings = state_lib.stage3_from_stage2(
      tiny.put_global(stage2_final, tiny.setup("1dev", 2, topk=1)["shardings"]), s3["tx"],
      s3["mesh"], s3["rules"])
  start = jax.device_get(state3)
  assert int(start["step"]) == 0
  assert leaves_equal(start["ema"], stage2_final["params"]["encoder"])
  assert leaves_equal(start["params"], stage2_final["params"])
  assert leaves_equal(start["queues"], stage2_final["queues"])
  assert leaves_equal(start["batch_stats"], stage2_final["batch_stats"])
  fresh = jax.device_get(s3["tx"].init(stage2_final["params"]))
  assert leaves_equal(start["opt"], fresh)  # a fresh optimizer: zero moments, count 0
  assert jax.tree.structure(state3) == jax.tree.structure(
      jax.eval_shape(s3["init"], jax.random.PRNGKey(0)))  # the layout of a stage-3 init
  assert jax.tree.structure(state3) == jax.tree.structure(tiny.initial_state_numpy(3))

  state, history = tiny.run_steps(s3, state3, 2)
  state = jax.device_get(state)
  assert np.isfinite([h["loss"] for h in history]).all()
  enc0, enc2 = start["params"]["encoder"], state["params"]["encoder"]
  assert max_abs_diff(enc0, enc2) > 1e-6, "stage 3 must train the encoder"
  assert max_abs_diff(start["ema"], state["ema"]) > 0, "the EMA must move"
  # Two EMA updates with decay 0.99 from the stage-2 encoder: ema is close to the start, not to
  # the params, and lies between them.
  assert max_abs_diff(state["ema"], enc0) < max_abs_diff(enc2, enc0)
  assert int(state["step"]) == 2


def test_stage3_ema_is_updated_after_every_step():
  s3 = tiny.setup("1dev", 3)
  initial = tiny.initial_state_numpy(3)
  state, _ = tiny.run_steps(s3, tiny.put_global(initial, s3["shardings"]), 1)
  state = jax.device_get(state)
  expected = jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, initial["ema"],
                          state["params"]["encoder"])
  assert max_abs_diff(expected, state["ema"]) < 1e-7


def test_step_does_not_retrace():
  # max_traces=1 in the shared setup: a second trace would raise; a second compile would show.
  s = tiny.setup("1dev", 3)
  state = tiny.put_global(tiny.initial_state_numpy(3), s["shardings"])
  tiny.run_steps(s, state, 2)
  assert s["step"]._cache_size() == 1  # pylint: disable=protected-access


def test_bad_config_raises():
  s = tiny.setup("1dev", 3)
  with pytest.raises(ValueError, match="local_view_indexing"):
    tiny.train_step.make_train_step(s["model"], s["tx"], s["mesh"], s["shardings"], topk=1,
                                    local_view_indexing="typo")
  with pytest.raises(ValueError, match="stage 2 freezes"):
    tiny.train_step.make_train_step(s["model"], s["tx"], s["mesh"], s["shardings"], topk=1,
                                    ema_decay=0.9, freeze_encoder=True)
  params = jax.eval_shape(s["init"], jax.random.PRNGKey(0))["params"]
  make_optimizer(params, base_lr=1e-4, global_batch_size=16, warmup_steps=1, total_steps=4,
                 depth=2)  # the tree the state holds is accepted by the optimizer
