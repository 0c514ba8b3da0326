"""Linear-probe grid and selective aggregation (refiner_facts.md 10.2, beyond_cls_facts.md 1-3).

Checked against torch: every head of the grid follows its own torch.optim.SGD(momentum=0.9) loop
with BatchNorm1d(affine=False) -> Linear on the same batches and init; selective aggregation's
forward against a torch transcription of AbMILP -> BatchNorm1d(affine=False, eps 1e-6) -> Linear.
"""

import json
import math

import jax
import numpy as np
import pytest
import torch

from mim_refiner_jax.evaluation import knn, probe

ATOL = 2e-5  # fp32 jax (HIGHEST) vs fp32 torch after a few SGD steps


def torch_lr(peak, step, warmup, total, end=1e-6):
  """wupcos: linear warmup peak (s+1)/(W+1), then cosine to the absolute end (section 7)."""
  if step < warmup:
    return peak * (step + 1) / (warmup + 1)
  return end + (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_grid_heads_follow_torch_sgd():
  rng = np.random.default_rng(0)
  dims, lrs, classes, batch, steps, warmup = (5, 8), (0.01, 0.1, 0.5), 4, 16, 6, 2
  model = probe.LinearGrid(len(dims), len(lrs), max(dims), classes)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))  # 8 devices: test below
  peaks = np.broadcast_to(np.asarray(lrs) * batch / 256, model.head_shape)
  train_step, eval_step = probe._step_fns(model, mesh, tuple(peaks.reshape(-1).tolist()), warmup,
                                          steps, "sgd")
  state = probe.init_state(model, mesh, seed=0)
  kernel0 = np.asarray(state[0]["kernel"])
  data = [rng.normal(size=(steps, batch, d)).astype(np.float32) * 3 + 1 for d in dims]
  labels = rng.integers(0, classes, (steps, batch))

  for s in range(steps):  # jax: every head in one step; feature sets zero-padded to max(dims)
    x = np.zeros((len(dims), batch, max(dims)), np.float32)
    for f, d in enumerate(dims):
      x[f, :, :d] = data[f][s]
    state = train_step(state, x, labels[s].astype(np.int32), np.int32(s))
  test_x = np.zeros((len(dims), batch, max(dims)), np.float32)
  test_raw = [rng.normal(size=(batch, d)).astype(np.float32) for d in dims]
  for f, d in enumerate(dims):
    test_x[f, :, :d] = test_raw[f]
  test_y = rng.integers(0, classes, batch)
  hits = np.asarray(eval_step(state, test_x, test_y.astype(np.int32), np.ones(batch, bool)))

  for f, d in enumerate(dims):
    for l, lr in enumerate(lrs):
      bn = torch.nn.BatchNorm1d(d, affine=False)
      linear = torch.nn.Linear(d, classes)
      with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel0[f, l, :d].T.copy()))
        linear.bias.zero_()
      opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9)
      for s in range(steps):
        for group in opt.param_groups:
          group["lr"] = torch_lr(lr * batch / 256, s, warmup, steps)
        loss = torch.nn.functional.cross_entropy(
            linear(bn(torch.from_numpy(data[f][s]))), torch.from_numpy(labels[s]))
        opt.zero_grad()
        loss.backward()
        opt.step()
      np.testing.assert_allclose(np.asarray(state[0]["kernel"][f, l, :d]),
                                 linear.weight.detach().numpy().T, atol=ATOL)
      np.testing.assert_allclose(np.asarray(state[0]["bias"][f, l]), linear.bias.detach().numpy(),
                                 atol=ATOL)
      # Padded input columns never move their weights.
      np.testing.assert_array_equal(np.asarray(state[0]["kernel"][f, l, d:]), kernel0[f, l, d:])
      np.testing.assert_allclose(np.asarray(state[1]["mean"][f, :d]), bn.running_mean.numpy(),
                                 atol=1e-6)
      np.testing.assert_allclose(np.asarray(state[1]["var"][f, :d]), bn.running_var.numpy(),
                                 rtol=1e-5)
      bn.eval()
      with torch.no_grad():
        pred = linear(bn(torch.from_numpy(test_raw[f]))).argmax(1).numpy()
      assert hits[f, l] == np.sum(pred == test_y)


def torch_selective_aggregation(tokens, score_w, score_b, kernel, bias, mean, var, train):
  """beyond_cls_facts section 1: AbMILP(depth 1) -> BN1d(affine=False, eps=1e-6) -> Linear."""
  d, c = kernel.shape
  scorer = torch.nn.Linear(d, 1)
  bn = torch.nn.BatchNorm1d(d, affine=False, eps=1e-6)
  head = torch.nn.Linear(d, c)
  with torch.no_grad():
    scorer.weight.copy_(torch.from_numpy(score_w.T.copy()))
    scorer.bias.copy_(torch.from_numpy(score_b.copy()))
    head.weight.copy_(torch.from_numpy(kernel.T.copy()))
    head.bias.copy_(torch.from_numpy(bias.copy()))
    bn.running_mean.copy_(torch.from_numpy(mean.copy()))
    bn.running_var.copy_(torch.from_numpy(var.copy()))
  bn.train(train)
  x = torch.from_numpy(tokens)                          # [B, T, D] patch tokens (no CLS)
  attention = torch.softmax(scorer(x), dim=1)           # [B, T, 1]: softmax over the tokens
  pooled = torch.sum(attention * x, dim=1)              # weighted sum -> [B, D]
  with torch.no_grad():
    return head(bn(pooled)).numpy(), bn.running_mean.numpy(), bn.running_var.numpy()


def test_selective_aggregation_forward_matches_torch():
  rng = np.random.default_rng(1)
  model = probe.SelectiveAggregation(num_lrs=2, dim=12, num_classes=5)
  params, stats = model.init(rng)
  stats = dict(mean=rng.normal(size=(2, 12)), var=rng.uniform(0.5, 2, (2, 12)))
  tokens = (rng.normal(size=(10, 7, 12)) * 2).astype(np.float32)
  to32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  for train in (True, False):
    logits, new_stats = jax.jit(model.apply, static_argnums=3)(to32(params), to32(stats), tokens,
                                                               train)
    for h in range(2):
      want, mean, var = torch_selective_aggregation(
          tokens, to32(params)["score_kernel"][h], to32(params)["score_bias"][h],
          to32(params)["kernel"][h], to32(params)["bias"][h], to32(stats)["mean"][h],
          to32(stats)["var"][h], train)
      np.testing.assert_allclose(np.asarray(logits[h]), want, atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(np.asarray(new_stats["mean"][h]), mean, atol=1e-5)
      np.testing.assert_allclose(np.asarray(new_stats["var"][h]), var, rtol=1e-5)


@pytest.fixture(scope="module")
def small_problem():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(3, 6)) * 2
  def split(n):
    y = rng.integers(0, 3, n)
    x = centres[y] + rng.normal(size=(n, 6))
    return x.astype(np.float32), y
  (train_x, train_y), (test_x, test_y) = split(200), split(60)
  train = {"cls": train_x, "cls+patch": np.concatenate([train_x, train_x ** 2], 1)}
  test = {"cls": test_x, "cls+patch": np.concatenate([test_x, test_x ** 2], 1)}
  tokens = lambda x: (x[:, None, :] + rng.normal(size=(len(x), 5, 6))).astype(np.float32)
  return train, train_y, test, test_y, tokens(train_x), tokens(test_x)


def test_grid_8_devices_equal_1_and_selective_aggregation_trains(small_problem):
  train, train_y, test, test_y, train_tok, test_tok = small_problem
  assert jax.device_count() == 8
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  kwargs = dict(lrs=(0.01, 0.1, 0.5), epochs=2, batch_size=64, progress=False)
  r8 = probe.linear_probe_grid(train, train_y, test, test_y, **kwargs)
  r1 = probe.linear_probe_grid(train, train_y, test, test_y, mesh=one, **kwargs)
  assert r8["best"] == r1["best"] and r8["features"] == r1["features"]
  json.dumps(r8)  # plain Python values only
  assert r8["best"]["accuracy"] > 0.8  # well-separated clusters
  assert set(r8["best"]) == {"accuracy", "feature", "lr", "epoch"}
  assert r8["steps"] == 2 * (200 // 64) and r8["warmup_steps"] == int(0.1 * r8["steps"])
  # Selective aggregation shares train_heads (the sharded loop) with the grid: one run on 8.
  s8 = probe.selective_aggregation_probe(train_tok, train_y, test_tok, test_y, **kwargs)
  assert s8["best"]["feature"] == "selective_aggregation" and s8["best"]["accuracy"] > 0.8


def test_augmented_copies_epoch_e_trains_on_copy_e_mod_a(small_problem):
  """[A, N, D] train features (evaluate.py --probe-augment A): two identical copies reproduce the
  plain run exactly; a second copy that differs (used in epoch 2) changes the result."""
  train, train_y, test, test_y, _, _ = small_problem
  kwargs = dict(lrs=(0.01, 0.1), epochs=2, batch_size=64, progress=False)
  plain = probe.linear_probe_grid(train, train_y, test, test_y, **kwargs)
  same = probe.linear_probe_grid({k: np.stack([x, x]) for k, x in train.items()}, train_y, test,
                                 test_y, **kwargs)
  assert same["features"] == plain["features"] and same["augmented_copies"] == 2
  other = probe.linear_probe_grid({k: np.stack([x, -x]) for k, x in train.items()}, train_y,
                                  test, test_y, **kwargs)
  final = lambda r: r["features"]["cls"]["final_accuracy_by_lr"]
  assert final(other) != final(plain)  # epoch 2 trained on the negated copy
  with pytest.raises(ValueError, match=r"\[A, N, D\]"):
    probe.linear_probe_grid({k: x[None, :, :, None] for k, x in train.items()}, train_y, test,
                            test_y, **kwargs)


def test_bad_inputs_are_named(small_problem):
  train, train_y, test, test_y, train_tok, _ = small_problem
  with pytest.raises(ValueError, match="same non-empty feature sets"):
    probe.linear_probe_grid(train, train_y, {"cls": test["cls"]}, test_y, progress=False)
  with pytest.raises(ValueError, match=r"\[N, T, D\]"):
    probe.selective_aggregation_probe(train_tok[:, 0], train_y, train_tok, train_y,
                                      progress=False)
  with pytest.raises(ValueError, match="optimizer"):
    probe.linear_probe_grid(train, train_y, test, test_y, optimizer="adam", progress=False)


def test_lars_update_matches_mae_lars():
  """optimizer="lars": MAE's util/lars.py step (wd 0) per head, transcribed in torch."""
  rng = np.random.default_rng(3)
  params = dict(kernel=rng.normal(size=(2, 4, 3)), bias=rng.normal(size=(2, 3)))
  grads = [dict(kernel=rng.normal(size=(2, 4, 3)), bias=rng.normal(size=(2, 3)))
           for _ in range(3)]
  lr = np.asarray([0.1, 0.5])
  p, buf = params, jax.tree.map(np.zeros_like, params)
  for g in grads:
    p, buf = probe.sgd_update(p, buf, g, lr, num_head_dims=1, optimizer="lars")
  for h in range(2):
    ps = [torch.tensor(params["kernel"][h]), torch.tensor(params["bias"][h])]
    mus = [torch.zeros_like(t) for t in ps]
    for g in grads:
      for t, mu, dp in zip(ps, mus, [torch.tensor(g["kernel"][h]), torch.tensor(g["bias"][h])]):
        if t.ndim > 1:  # MAE LARS: trust ratio on matrices only
          param_norm, update_norm = torch.norm(t), torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0., torch.where(update_norm > 0,
                                                       0.001 * param_norm / update_norm, one), one)
          dp = dp.mul(q)
        mu.mul_(0.9).add_(dp)
        t.add_(mu, alpha=-lr[h])
    np.testing.assert_allclose(np.asarray(p["kernel"][h]), ps[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p["bias"][h]), ps[1].numpy(), rtol=1e-5)
