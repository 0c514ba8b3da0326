r"""Cost per epoch of the fresh-augmentation probe (--probe-augmentation fresh), from FLOPs.

The fresh probe re-extracts the whole train set every epoch (probe_stream.py); its cost per epoch
is one encoder forward per image plus the probe grid's step. This tool compiles, for ABSTRACT
weights (nothing is allocated or run, so a ViT-L/16 compiles on a laptop CPU), the two per-step
functions the probe runs: (1) the encoder forward that pools the probe's feature sets,
(2) the grid's SGD step (13 LRs x 4 feature sets), at the global batch, and reads XLA's
`cost_analysis` FLOPs. Per epoch: steps x (forward + step) FLOPs. Time on D accelerators of
peak P at utilisation U (default 0.4, an assumption: the forward of a ViT at batch 1024 in bf16
typically reaches 40-60% on A100/H100/TPU) is FLOPs / (D x P x U); the cached probe's epoch
costs only the grid step, so the extra cost is the forward.

  # ImageNet-1k (1,281,167 train images), ViT-L/16 at 224, batch 1024, 8 H100s:
  python tools/probe_cost.py --model large --patch 16 --image-size 224 --images 1281167 \
      --batch 1024 --devices 8 --peak 989e12
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mim_refiner_jax import metrics  # noqa: E402
from mim_refiner_jax.evaluation import features as features_lib  # noqa: E402
from mim_refiner_jax.evaluation import probe, suite  # noqa: E402
from mim_refiner_jax.models.vit import ViT, vit_kwargs  # noqa: E402


def probe_epoch_flops(model: str, patch: int, image_size: int, images: int, batch: int,
                      num_classes: int = 1000, dtype: str = "bfloat16") -> dict:
  """Compiled FLOPs of one step of each part (whole batch, one device) and of one epoch."""
  kwargs = vit_kwargs(model, patch, image_size=image_size)
  vit = ViT(**kwargs, dtype=jnp.dtype(dtype))
  depth = kwargs["depth"]
  sets = suite.probe_sets(depth)
  keys = tuple(sets.values())
  images_spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(vit.init, jax.random.key(0), images_spec)
  apply_fn = features_lib.encoder_apply_fn(vit, keys)

  def forward(variables, images):
    out, aux = apply_fn(variables, images)
    return features_lib.select_features(out, aux, keys, depth)

  feats = jax.eval_shape(forward, variables, images_spec)
  forward_flops = metrics.compiled_flops(jax.jit(forward).lower(variables, images_spec).compile())
  width = max(f.shape[1] for f in feats.values())
  grid = probe.LinearGrid(len(keys), len(probe.DINOV2_LRS), width, num_classes)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  peaks = tuple(float(x) for x in np.full(grid.head_shape, 0.1).reshape(-1))
  # pylint: disable-next=protected-access
  train_step, _ = probe._step_fns(grid, mesh, peaks, 10, 100, "sgd")
  params, stats = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, grid.init(
      np.random.default_rng(0))))
  state = (params, stats, params)
  x = jax.ShapeDtypeStruct((len(keys), batch, width), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  step_flops = metrics.compiled_flops(train_step.lower(
      state, x, y, jax.ShapeDtypeStruct((), jnp.int32)).compile())
  steps = images // batch
  return dict(model=model, patch=patch, image_size=image_size, dtype=dtype, batch=batch,
              images=images, steps_per_epoch=steps, feature_sets=dict(sets),
              forward_flops_per_step=forward_flops, probe_step_flops=step_flops,
              forward_flops_per_image=forward_flops / batch,
              epoch_flops_fresh=steps * (forward_flops + step_flops),
              epoch_flops_cached=steps * step_flops)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--model", default="large")
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--images", type=int, default=1_281_167, help="train images per epoch")
  p.add_argument("--batch", type=int, default=1024, help="global probe batch (paper: 1024)")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--peak", type=float, default=989e12,
                 help="dense bf16 peak FLOP/s of one device (H100 SXM 989e12, A100 312e12, "
                      "TPU v4 275e12, v5p 459e12)")
  p.add_argument("--utilisation", type=float, default=0.4, help="assumed fraction of peak")
  p.add_argument("--epochs", type=int, default=50)
  args = p.parse_args(argv)
  out = probe_epoch_flops(args.model, args.patch, args.image_size, args.images, args.batch,
                          args.classes)
  rate = args.devices * args.peak * args.utilisation
  out.update(devices=args.devices, peak=args.peak, utilisation=args.utilisation,
             epoch_seconds_fresh=out["epoch_flops_fresh"] / rate,
             epoch_seconds_cached=out["epoch_flops_cached"] / rate,
             run_hours_fresh=args.epochs * out["epoch_flops_fresh"] / rate / 3600,
             epochs=args.epochs)
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
