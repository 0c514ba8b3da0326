"""ID head against torch (nn.Sequential of Linear/BatchNorm1d/GELU) and the NN queue's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_refiner_jax import sharding
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.objectives import queue as queue_lib

D, PROJ, PRED, OUT = 32, 48, 40, 16   # tiny head
Q, DIM = 72, 16                       # queue: 72 = 8 shards of 9


# ----------------------------------------------------------------------------------------- head


def torch_head(params):
  """The reference head structure (section 4) as torch modules, weights copied from Flax."""
  def mlp(prefix, dims):
    layers = []
    for i in range(len(dims) - 1):
      lin = torch.nn.Linear(dims[i], dims[i + 1], bias=False)
      bn = torch.nn.BatchNorm1d(dims[i + 1])  # eps 1e-5, momentum 0.1 (torch defaults)
      p = params[f"{prefix}_{i}"]
      with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(p["dense"]["kernel"]).T))
        bn.weight.copy_(torch.from_numpy(np.asarray(p["bn"]["scale"])))
        bn.bias.copy_(torch.from_numpy(np.asarray(p["bn"]["bias"])))
      block = [lin, bn] + ([torch.nn.GELU()] if i < len(dims) - 2 else [])
      layers.append(torch.nn.Sequential(*block))
    return torch.nn.Sequential(*layers)
  return mlp("projector", [D, PROJ, PROJ, OUT]), mlp("predictor", [OUT, PRED, OUT])


def test_head_matches_torch_train_and_eval_mode():
  head = IDHead(proj_hidden_dim=PROJ, pred_hidden_dim=PRED, output_dim=OUT)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, D)).astype(np.float32) * 3 + 1
  variables = head.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
  params = jax.tree.map(np.array, variables["params"])
  # Non-trivial affine BN parameters, so that scale/bias mix-ups show.
  for mod in params.values():
    mod["bn"]["scale"] = rng.uniform(0.5, 1.5, mod["bn"]["scale"].shape).astype(np.float32)
    mod["bn"]["bias"] = rng.normal(size=mod["bn"]["bias"].shape).astype(np.float32) * 0.1
  assert sorted(params) == ["predictor_0", "predictor_1", "projector_0", "projector_1",
                            "projector_2"]
  proj_t, pred_t = torch_head(params)

  stats = variables["batch_stats"]
  for step in range(2):  # two updates of the running statistics
    xs = x + step
    (z, p), upd = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))(
        {"params": params, "batch_stats": stats}, xs)
    stats = upd["batch_stats"]
    with torch.no_grad():
      zt = proj_t(torch.from_numpy(xs))
      pt = pred_t(zt)
    # fp32 both sides; differences are summation order only.
    np.testing.assert_allclose(z, zt.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p, pt.numpy(), rtol=1e-5, atol=1e-5)

  for name, seq in [("projector", proj_t), ("predictor", pred_t)]:
    for i, block in enumerate(seq):
      bn = block[1]
      ours = stats[f"{name}_{i}"]["bn"]
      # running_var uses the unbiased batch variance, as torch
      np.testing.assert_allclose(ours["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(ours["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)

  # Eval mode uses the running statistics.
  z, p = head.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), train=False)
  proj_t.eval(), pred_t.eval()
  with torch.no_grad():
    zt = proj_t(torch.from_numpy(x))
    pt = pred_t(zt)
  np.testing.assert_allclose(z, zt.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p, pt.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- queue


@pytest.fixture(scope="module")
def meshes():
  return {"1dev": sharding.make_mesh(devices=jax.devices()[:1]), "8dev": sharding.make_mesh(fsdp=2)}


def put_queue(queue, mesh):
  rules = [(r"^ptr$", "replicate"), (r".*", "all_devices")]
  return jax.device_put(queue, sharding.infer_shardings(mesh, queue, rules))


def random_queue(seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(Q, DIM)).astype(np.float32),
          "idx": rng.permutation(1000)[:Q].astype(np.int32),
          "label": rng.integers(0, 5, Q).astype(np.int32),
          "age": rng.integers(0, 500, Q).astype(np.int32),
          "ptr": np.int32(5)}


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_RETRIEVE = {}


def retrieve(queue, z, index, label, key, *, mesh, topk, sim_dtype=jnp.float32):
  """Jitted retrieval, one compile per (mesh, topk, dtype, shapes)."""
  sig = (id(mesh), topk, sim_dtype, z.shape)
  if sig not in _RETRIEVE:
    _RETRIEVE[sig] = jax.jit(lambda q, z, i, l, k: queue_lib.retrieve(
        q, z, i, topk=topk, key=k, mesh=mesh, label=l, sim_dtype=sim_dtype,
        return_positions=True))
  return _RETRIEVE[sig](put_queue(queue, mesh), z, index, label, key)


def test_retrieval_excludes_same_index_and_reports_metrics(meshes):
  queue = random_queue()
  rng = np.random.default_rng(1)
  rows = rng.integers(0, Q, 16)
  z = queue["x"][rows] * 2.0  # each row's best match is "itself"...
  index = queue["idx"][rows].copy()
  index[::2] = 5000  # ...but only the odd rows carry the same dataset index
  label = queue["label"][rows]
  sim = np_normalize(z) @ np_normalize(queue["x"]).T
  sim[index[:, None] == queue["idx"][None, :]] = -1
  expected = sim.argmax(1)
  for mesh in meshes.values():
    nn, metrics, pos = retrieve(queue, z, index, label, jax.random.PRNGKey(0), mesh=mesh, topk=1)
    np.testing.assert_array_equal(pos, expected)
    assert np.all(pos[::2] == rows[::2]) and not np.any(pos[1::2] == rows[1::2])
    np.testing.assert_array_equal(nn, queue["x"][expected])  # un-normalised entries
    np.testing.assert_allclose(metrics["nn_similarity"], sim[np.arange(16), expected].mean(),
                               rtol=1e-5)
    assert metrics["nn_age"] == pytest.approx(queue["age"][expected].mean())
    assert metrics["nn_accuracy"] == pytest.approx(
        np.mean(queue["label"][expected] == label))


def test_random_topk_choice_stays_in_topk_and_is_shard_independent(meshes):
  queue = random_queue(2)
  rng = np.random.default_rng(3)
  z = rng.normal(size=(64, DIM)).astype(np.float32)
  index = queue["idx"][rng.integers(0, Q, 64)]  # some rows exclude one entry
  label = np.zeros(64, np.int32)
  sim = np_normalize(z) @ np_normalize(queue["x"]).T
  sim[index[:, None] == queue["idx"][None, :]] = -1
  top5 = np.argsort(-sim, axis=1)[:, :5]
  ranks = []
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    out = {name: retrieve(queue, z, index, label, key, mesh=mesh, topk=5)[2]
           for name, mesh in meshes.items()}
    np.testing.assert_array_equal(out["1dev"], out["8dev"])
    pos = np.asarray(out["8dev"])
    member = top5 == pos[:, None]
    assert member.any(1).all(), "a neighbour outside the top-5"
    ranks.extend(member.argmax(1))
  counts = np.bincount(ranks, minlength=5)
  assert np.all(counts > 10), f"top-5 choice is not uniform-looking: {counts}"


def test_bf16_ties_break_the_same_on_any_shard_count(meshes):
  # Duplicated entries give exact ties; both meshes must pick the lower position.
  queue = random_queue(4)
  queue["x"][36:] = queue["x"][:36]
  z = np.random.default_rng(5).normal(size=(32, DIM)).astype(np.float32)
  index = np.full(32, -7, np.int32)
  out = {name: retrieve(queue, z, index, None, jax.random.PRNGKey(0), mesh=mesh, topk=1,
                        sim_dtype=jnp.bfloat16)[2] for name, mesh in meshes.items()}
  np.testing.assert_array_equal(out["1dev"], out["8dev"])
  assert np.all(np.asarray(out["8dev"]) < 36)


def bf16_topk_reference(queue, z, index, key, topk):
  """The retrieval as it was before the f32 selection: top_k on the bf16 similarity, 1 device."""
  zn = queue_lib.normalize(jnp.asarray(z)).astype(jnp.bfloat16)
  qn = queue_lib.normalize(jnp.asarray(queue["x"])).astype(jnp.bfloat16)
  sim = jnp.dot(zn, qn.T, preferred_element_type=jnp.bfloat16)
  sim = jnp.where(jnp.asarray(index)[:, None] == jnp.asarray(queue["idx"])[None, :], -1, sim)
  top = jax.lax.top_k(sim, topk)[1]
  if topk == 1:
    return top[:, 0]
  choice = jax.random.randint(key, (len(z),), 0, topk)
  return jnp.take_along_axis(top, choice[:, None], axis=1)[:, 0]


@pytest.mark.parametrize("topk", [1, 20])  # stage 2 arg-max, stage 3 random top-20
def test_f32_selection_matches_bf16_topk_with_ties(meshes, topk):
  # Many exact ties: every vector has four entries +-1 (norm 2, so normalising is exact whatever
  # the fusion) and the similarities are multiples of 1/4. The fast path (top_k on the bf16
  # values widened to f32) must pick exactly the neighbours of top_k in bf16.
  rng = np.random.default_rng(9)

  def sparse_signs(n):
    x = np.zeros((n, DIM), np.float32)
    for row in x:
      row[rng.choice(DIM, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x

  queue = random_queue(8)
  queue["x"] = sparse_signs(Q)
  z = sparse_signs(48)
  z[:8] = queue["x"][:8]  # exact matches
  index = queue["idx"][rng.integers(0, Q, 48)]
  index[::3] = -7
  for seed in range(2):
    key = jax.random.PRNGKey(seed)
    expected = np.asarray(bf16_topk_reference(queue, z, index, key, topk))
    for name, mesh in meshes.items():
      pos = retrieve(queue, z, index, None, key, mesh=mesh, topk=topk, sim_dtype=jnp.bfloat16)[2]
      np.testing.assert_array_equal(pos, expected, err_msg=name)


def np_enqueue(queue, z, index, label):
  q = {k: np.array(v) for k, v in queue.items()}
  n = len(z)
  pos = (int(q["ptr"]) + np.arange(n)) % Q
  q["x"][pos], q["idx"][pos], q["label"][pos], q["age"][pos] = z, index, label, 0
  q["age"] += n
  q["ptr"] = np.int32((int(q["ptr"]) + n) % Q)
  return q


@pytest.mark.parametrize("ptr", [0, 64])  # 64 + 16 > 72: wraps around
def test_enqueue_fifo_wraparound_age_ptr(meshes, ptr):
  queue = random_queue(6)
  queue["ptr"] = np.int32(ptr)
  rng = np.random.default_rng(7)
  z = rng.normal(size=(16, DIM)).astype(np.float32)
  index = np.arange(100, 116, dtype=np.int32)
  label = rng.integers(0, 5, 16).astype(np.int32)
  expected = np_enqueue(queue, z, index, label)
  for mesh in meshes.values():
    fn = jax.jit(lambda q, z, i, l: queue_lib.enqueue(q, z, i, l, mesh=mesh))
    sharded = put_queue(queue, mesh)
    out = fn(sharded, z, index, label)
    for k in expected:
      np.testing.assert_array_equal(out[k], expected[k], err_msg=k)
    assert out["x"].sharding.is_equivalent_to(sharded["x"].sharding, 2)
    # Writing must not move the queue: nothing of queue size crosses devices.
    comms = sharding.collectives(fn.lower(sharded, z, index, label).compile().as_text())
    assert not [c for c in comms if Q in c[2]], comms
  assert int(expected["ptr"]) == (ptr + 16) % Q


def test_retrieval_does_not_gather_the_queue(meshes):
  mesh = meshes["8dev"]
  queue = put_queue(random_queue(), mesh)
  z = jnp.zeros((32, DIM))
  index = jnp.zeros(32, jnp.int32)
  fn = jax.jit(lambda q, z, i, k: queue_lib.retrieve(q, z, i, topk=5, key=k, mesh=mesh))
  comms = sharding.collectives(fn.lower(queue, z, index, jax.random.PRNGKey(0)).compile().as_text())
  assert comms, "expected the candidate all-gather"
  # Only per-row candidates ([32, 8 shards x 5]) and the chosen rows ([32, 16]) travel.
  assert not [c for c in comms if (Q in c[2] and (len(c[2]) == 1 or DIM in c[2]))
              or c[2][-2:] == (Q // 8, DIM)], comms


def test_bad_inputs_raise(meshes):
  queue = random_queue()
  with pytest.raises(ValueError, match="multiple of the device count"):
    small = {k: v[:68] if v.ndim else v for k, v in queue.items()}
    queue_lib.retrieve(small, jnp.zeros((4, DIM)), jnp.zeros(4, jnp.int32), topk=1,
                       key=jax.random.PRNGKey(0), mesh=meshes["8dev"])
  with pytest.raises(ValueError, match="at least as large"):
    queue_lib.enqueue(queue, jnp.zeros((80, DIM)), jnp.zeros(80, jnp.int32),
                      mesh=meshes["1dev"])
