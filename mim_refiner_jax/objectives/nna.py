"""Nearest-neighbour alignment (NNA) loss of MIM-Refiner (refiner_facts.md section 6).

Written on global arrays (all N samples of the global batch, rows sharded over devices): the
`[N, N]` logits need every sample's prediction, and XLA inserts the gather of the predictions and,
in the backward pass, its transpose (a reduce-scatter), i.e. the reference's all_gather_grad + DDP
averaging. No named collectives are used, so this runs under plain `jax.jit`.

Term T(a, b), anchor view a in {0, 1}, prediction view b:
  q_i = norm(z_i^a) (stop-gradient anchor), m_i = norm(NN(z_i^a)) (stop-gradient neighbour),
  P_j = norm(p_j^b) (carries the gradient),
  logit_{i,j} = m_i . P_j / tau if j == i else q_i . P_j / tau
  T(a, b) = mean_i [logsumexp_j logit_{i,j} - logit_{i,i}]
Only the positive is NN-swapped; negatives use the un-swapped anchor.

Pairs: G = {(0, 1), (1, 0)} and, for n local views,
  "reference": L = {(a, k) : a in {0, 1}, k = 0..n-1}: the official code indexes the predictions
     at view k instead of 2 + k, so its "local" terms use g1, g2, l1 .. l_{n-2} and never the last
     two local views (these still shape the BatchNorm statistics);
  "corrected": L = {(a, 2 + k)}: the anchors are paired with all n local views.
Head loss = (sum_G T + sum_L T) / (2 + 2n), i.e. / 22 for 10 local views: the raw-term mean, not the
mean of the two group means. With fewer local views (demo configs) the same formulas apply; note
that "reference" with n local views then pairs the anchors with views 0 .. n-1.
"""

import jax
import jax.numpy as jnp

from mim_refiner_jax.objectives.queue import normalize

LOCAL_VIEW_INDEXING = ("reference", "corrected")


def pair_sets(num_local_views: int, local_view_indexing: str):
  """`(global_pairs, local_pairs)` of (anchor view, prediction view), see the module docstring."""
  if local_view_indexing not in LOCAL_VIEW_INDEXING:
    raise ValueError(f"local_view_indexing must be one of {LOCAL_VIEW_INDEXING}, "
                     f"got {local_view_indexing!r}")
  offset = 0 if local_view_indexing == "reference" else 2
  global_pairs = [(0, 1), (1, 0)]
  local_pairs = [(a, offset + k) for a in (0, 1) for k in range(num_local_views)]
  return global_pairs, local_pairs


def nna_logits(anchor: jax.Array, neighbour: jax.Array, prediction: jax.Array,
               temperature: float, logits_dtype=None):
  """fp32 `([N, N] anchor-prediction logits, [N] positive logits)` of T(a, b).

  `logits_dtype` bf16 reproduces the reference under autocast (sections 1.5, 13): bf16 matmuls
  with bf16 results, the cross-entropy in fp32. The division by tau is torch's for a bf16 tensor
  and a Python scalar: x * (1 / tau) in fp32, rounded once to bf16 (dividing by a bf16 tau,
  0.2 -> 0.2002, left 15-49% of the logits one bf16 step low). None: all fp32.
  """
  if logits_dtype is None:
    logits = anchor @ prediction.T / temperature                         # [N, N] negatives
    positive = jnp.sum(neighbour * prediction, axis=-1) / temperature    # [N] NN-swapped diagonal
  else:
    cast = lambda x: x.astype(logits_dtype)
    logits = jnp.dot(cast(anchor), cast(prediction).T, preferred_element_type=jnp.float32)
    positive = jnp.sum(cast(neighbour).astype(jnp.float32) * cast(prediction), axis=-1)
    # bf16 results of the matmuls, scaled in fp32 and rounded once, upcast for the cross-entropy
    inverse = jnp.float32(1.0 / temperature)
    logits, positive = ((cast(x).astype(jnp.float32) * inverse).astype(logits_dtype)
                        .astype(jnp.float32) for x in (logits, positive))
  return logits, positive


def nna_term(anchor: jax.Array, neighbour: jax.Array, prediction: jax.Array, temperature: float,
             logits_dtype=None):
  """T(a, b) for normalised `anchor`, `neighbour`, `prediction` `[N, d]`: (loss, alignment);
  the logits as `nna_logits`."""
  logits, positive = nna_logits(anchor, neighbour, prediction, temperature, logits_dtype)
  n = logits.shape[0]
  logits = jnp.where(jnp.eye(n, dtype=bool), positive[:, None], logits)
  lse = jax.nn.logsumexp(logits, axis=-1)
  loss = jnp.mean(lse - positive)
  alignment = jnp.mean(jnp.exp(jax.lax.stop_gradient(positive - lse)))  # softmax prob at i
  return loss, alignment


def nna_loss(anchors: jax.Array, neighbours: jax.Array, predictions: jax.Array, *,
             temperature: float, local_view_indexing: str = "reference", logits_dtype=None):
  """NNA loss of one head.

  Args:
    anchors: `[2, N, d]` projector outputs of the two global views (gradient is stopped).
    neighbours: `[2, N, d]` their retrieved queue entries (gradient is stopped).
    predictions: `[V, N, d]` predictor outputs of every view, V = 2 + number of local views, in the
      view order g1, g2, l1, ... (section 4 "View order"). Carries the gradient.
    temperature: tau.
    local_view_indexing: "reference" (the official quirk) or "corrected".
    logits_dtype: None (fp32) or bf16, the reference's autocast boundaries (see nna_term).

  Returns:
    `(loss, metrics)` with metrics loss, global_loss, local_loss (means over G and L; local_loss
    is 0 without local views), alignment, global_alignment, local_alignment.
  """
  if anchors.ndim != 3 or anchors.shape[0] != 2 or neighbours.shape != anchors.shape:
    raise ValueError(f"anchors and neighbours must be [2, N, d] (the two global views), got "
                     f"{anchors.shape} and {neighbours.shape}")
  if (predictions.ndim != 3 or predictions.shape[1:] != anchors.shape[1:]
      or predictions.shape[0] < 2):
    raise ValueError(f"predictions must be [V >= 2, N, d] matching anchors {anchors.shape}, got "
                     f"{predictions.shape}")
  global_pairs, local_pairs = pair_sets(predictions.shape[0] - 2, local_view_indexing)
  q = normalize(jax.lax.stop_gradient(anchors))
  m = normalize(jax.lax.stop_gradient(neighbours))
  p = normalize(predictions)

  terms = {}  # (a, b) -> (loss, alignment); a pair that appears twice is computed once
  for a, b in global_pairs + local_pairs:
    if (a, b) not in terms:
      terms[(a, b)] = nna_term(q[a], m[a], p[b], temperature, logits_dtype)

  def mean_over(pairs, what):
    if not pairs:
      return jnp.zeros((), jnp.float32)
    return sum(terms[pair][what] for pair in pairs) / len(pairs)

  all_pairs = global_pairs + local_pairs
  loss = mean_over(all_pairs, 0)
  metrics = {
      "loss": loss,
      "global_loss": mean_over(global_pairs, 0),
      "local_loss": mean_over(local_pairs, 0),
      "alignment": mean_over(all_pairs, 1),
      "global_alignment": mean_over(global_pairs, 1),
      "local_alignment": mean_over(local_pairs, 1),
  }
  return loss, metrics
