"""The linear-probe grid on a fresh minimal-augmentation view every epoch, extracted on the fly.

The reference (refiner_facts.md section 10.2; `yamls/eval/probe/template_tracked_dinov2grid.yaml`)
trains its probes end to end behind the frozen encoder: every epoch draws a new `train_minaug`
view (RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip, section 9) of every image, the
encoder runs under bf16 autocast. Here, per epoch:
  - the train rows are shuffled as `probe.train_heads` shuffles them (drop_last), each step's rows
    are read and augmented on the host (Grain; the view of image i in epoch e is drawn from
    (augment_seed = e, i), so epoch e sees exactly `--probe-augment` copy e);
  - one jitted call per step runs the encoder on the batch, sharded over every device of the mesh,
    and pools the feature sets into the probe's `[F, B, D_max]` layout, which stays on the
    devices and feeds the probe grid's train step: no per-epoch disk cache, no host copy;
  - the test set is the cached no-aug features, scored after every epoch (max over epochs).
Differences from the reference, stated in the results: the probe heads (BN + Linear) run in
fp32 (the reference autocasts the Linear to bf16); the encoder forward is `dtype` (bf16 in the
paper preset).
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_refiner_jax.data import loader as loader_lib
from mim_refiner_jax.data import multicrop
from mim_refiner_jax.data import sources
from mim_refiner_jax.evaluation import features as features_lib
from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.evaluation import probe


class _Rows:
  """The records of `source` at `rows`, in that order."""

  def __init__(self, source, rows):
    self.source, self.rows = source, rows

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]


def _stack_fn(vit, keys: tuple, depth: int, dim: int, mesh):
  """jit: (variables, images [B, H, W, 3]) -> the pooled feature sets `[F, B, D_max]`,
  batch-sharded on axis 1 (zero-padded to the widest set, as linear_probe_grid's make_batch)."""
  apply_fn = features_lib.encoder_apply_fn(vit, keys)

  def stack(variables, images):
    out, aux = apply_fn(variables, images)
    feats = features_lib.select_features(out, aux, keys, depth)
    return jnp.stack([jnp.pad(feats[k], ((0, 0), (0, dim - feats[k].shape[1]))) for k in keys])

  return jax.jit(stack, out_shardings=NamedSharding(mesh, P(None, tuple(mesh.axis_names))))


def fresh_augmentation_probe(encoder, source_cfg: dict, transform: dict, feature_sets: dict,
                             train_labels, test_feats: dict, test_labels, *, lrs=None,
                             epochs: int = probe.DEFAULT_EPOCHS,
                             batch_size: int = probe.DEFAULT_BATCH_SIZE, seed: int = 0,
                             dtype: str = "bfloat16", mesh=None, progress: bool = True,
                             worker_count: int = 0) -> dict:
  """The DINOv2 grid (probe.linear_probe_grid) trained on a fresh augmented view per epoch.

  Args:
    encoder: an `encoders.Encoder`; source_cfg: the train source config.
    transform: the eval view (resize_size, crop_size); the crop size of the augmentation.
    feature_sets: probe set name -> feature key (suite.probe_sets).
    train_labels: `[N]` labels of the train source in dataset order (for N and the class count).
    test_feats: set name -> `[N_test, D]` no-aug test features; test_labels `[N_test]`.
    dtype: the encoder's compute dtype (the reference: bf16 autocast).
    Others as `probe.linear_probe_grid`.

  Returns linear_probe_grid's dict plus "augmentation": "fresh per epoch",
  "encoder_dtype", "epoch_seconds" (extraction + training + test of each epoch).
  """
  from mim_refiner_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  mesh = mesh or knn.default_mesh()
  names = list(feature_sets)
  keys = tuple(feature_sets[n] for n in names)
  depth = encoder.vit_kwargs["depth"]
  # pylint: disable=protected-access
  train_y = probe._labels(train_labels, len(train_labels), "train_labels")
  test_x = {n: knn._to_numpy(test_feats[n], f"test[{n!r}]") for n in names}
  test_y = probe._labels(test_labels, len(test_x[names[0]]), "test_labels")
  # pylint: enable=protected-access
  dim = max(x.shape[1] for x in test_x.values())
  lrs = tuple(probe.DINOV2_LRS if lrs is None else lrs)
  num_classes = max(int(max(train_y.max(), test_y.max())) + 1, 2)

  source = sources.make_source(source_cfg)
  if len(source) != len(train_y):
    raise ValueError(f"train_labels has {len(train_y)} rows, the source {len(source)}")
  vit = ViT(**encoder.vit_kwargs, dtype=jnp.dtype(dtype))
  stack = _stack_fn(vit, keys, depth, dim, mesh)
  variables = features_lib._on_mesh(encoder.variables, mesh)  # pylint: disable=protected-access
  image_spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  process, processes = jax.process_index(), jax.process_count()

  def train_batches(epoch, rows_per_step):
    batch = len(rows_per_step[0])
    per_host = batch // processes
    # this host's slice of every step's rows, in step order
    rows = np.concatenate([r[process * per_host:(process + 1) * per_host] for r in rows_per_step])
    view = multicrop.EvalTransform(dict(transform, augment_seed=epoch))
    ds = grain.MapDataset.source(_Rows(source, rows)).map(view).batch(per_host)
    ds = loader_lib._finish(ds, worker_count, 1, 2, 1)  # pylint: disable=protected-access
    to_global = functools.partial(jax.make_array_from_process_local_data, image_spec)
    for host_batch in ds:
      images = np.asarray(host_batch["image"], np.float32)
      yield (stack(variables, to_global(images)),
             to_global(np.asarray(host_batch["label"], np.int32)))

  def make_batch(split, rows, epoch):  # the test set only
    del epoch
    out = np.zeros((len(names), len(rows), dim), np.float32)
    for i, n in enumerate(names):
      out[i, :, :test_x[n].shape[1]] = test_x[n][rows]
    return out

  model = probe.LinearGrid(len(names), len(lrs), dim, num_classes)
  run = probe.train_heads(model, make_batch, train_y, test_y, batch_axis=1, batch_ndim=3, lrs=lrs,
                          epochs=epochs, batch_size=batch_size, seed=seed, mesh=mesh,
                          optimizer="sgd", progress=progress,
                          desc="linear probe grid (fresh augmentation)",
                          train_batches=train_batches)
  return dict(probe.summarize_grid(run["accuracy"], names, lrs), lrs=[float(lr) for lr in lrs],
              epochs=int(epochs), batch_size=run["batch_size"], lr_scale=run["batch_size"] / 256,
              steps=run["steps"], warmup_steps=run["warmup"], num_train=len(train_y),
              num_test=len(test_y), optimizer="sgd", augmentation="fresh per epoch",
              encoder_dtype=str(jnp.dtype(dtype)), epoch_seconds=run["epoch_seconds"],
              mean_epoch_seconds=float(np.mean(run["epoch_seconds"][1:] or
                                               run["epoch_seconds"])))
