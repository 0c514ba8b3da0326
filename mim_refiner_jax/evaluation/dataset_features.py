"""Features of a whole dataset for an encoder: one sharded pass, cached on disk.

`dataset_features(encoder, source_cfg, keys, ...)` reads the source through the no-augmentation
eval transform (data/multicrop.EvalTransform: resize the short side, centre crop; the crop
defaults to the checkpoint's patch size x position grid), runs every requested block and pooling
in ONE jitted pass over padded, masked batches (features.extract_features: no example dropped or
duplicated on any device count) and returns `{key: [N, ...] float32, "label": [N], "index": [N]}`
in dataset order.

Cache: `CACHE_DIR/<digest>.npz` (+ `.json` describing it), where the digest covers the checkpoint
identity (path, size/mtime stamp, workdir step and weights), the source config, the transform and
the compute dtype. A file holds the keys it was made for; a request whose keys it covers is read
back without running the model, one that needs more keys recomputes the union and replaces it. So
several protocols (k-NN, probe, low-shot, clustering) share one pass when their keys are
requested together, or reuse it later.
"""

import hashlib
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mim_refiner_jax import paths
from mim_refiner_jax.data import sources
from mim_refiner_jax.evaluation import features as features_lib

EVAL_RESIZE_RATIO = 256 / 224  # the reference's eval view: resize 256, crop 224 (section 10)
CACHE_VERSION = 1


def source_config(spec, image_size: int | None = None) -> dict:
  """A source spec (data/sources.py: `tfds:DATASET:SPLIT`, `image_folder:ROOT`, `mnist:SPLIT`,
  `synthetic:N`, options after commas) -> the config dict `sources.make_source` takes, with MNIST
  and synthetic images made at `image_size` unless the spec says otherwise, and folder roots
  absolute (the cache key must not depend on the working directory)."""
  cfg = sources.source_config(spec)
  if cfg["name"] in ("mnist", "synthetic") and image_size and "image_size" not in cfg:
    cfg["image_size"] = int(image_size)
  if cfg["name"] == "image_folder":
    cfg["root"] = paths.resolve(cfg["root"])
  return cfg


def eval_transform(image_size: int, resize_size: int | None = None) -> dict:
  """The eval view config: crop `image_size`, short side resized to 256/224 of it by default."""
  resize = resize_size or int(round(image_size * EVAL_RESIZE_RATIO))
  return dict(resize_size=int(resize), crop_size=int(image_size))


def describe_view(transform: dict) -> str:
  """The eval view in words, as the k-NN monitor and tools/evaluate.py print it."""
  return f"resize {transform['resize_size']}, centre crop {transform['crop_size']}"


def cache_digest(encoder_identity: dict, source_cfg: dict, transform: dict, dtype: str) -> str:
  record = dict(version=CACHE_VERSION, encoder=encoder_identity, source=source_cfg,
                transform=transform, dtype=str(jnp.dtype(dtype)))
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_cache(path: str, keys: Sequence[str]) -> dict | None:
  if not paths.as_path(path).exists():
    return None
  with paths.as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:  # no pickles
    if not set(keys) <= set(data.files):
      return None
    return {k: data[k] for k in data.files}


def _write_cache(path: str, feats: dict, description: dict):
  paths.makedirs(paths.as_path(path).parent)
  if paths.is_remote(path):  # an object appears whole when its upload ends
    with paths.upload_via_local(path) as local:
      np.savez(local, **feats)
  else:
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **feats)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
  paths.as_path(path[:-len(".npz")] + ".json").write_text(
      json.dumps(description, indent=1, default=str))


def _agree(flag: bool) -> bool:
  """True only if every process says True (a cache hit must be unanimous: a lone miss would run
  the collective pass on some hosts only and hang)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def dataset_features(encoder, source_cfg: dict, keys: Sequence[str], *,
                     transform: dict | None = None, batch_size: int = 256,
                     dtype: str = "float32", mesh=None, cache_dir: str | None = None,
                     progress: str | None = None, worker_count: int = 0) -> dict:
  """Features of every example of `source_cfg` (module docstring); `encoder` is an
  `encoders.Encoder`. `transform` defaults to `eval_transform(encoder.image_size)`."""
  from mim_refiner_jax.data import loader  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  keys = tuple(dict.fromkeys(keys))
  if not keys:
    raise ValueError("no feature keys requested")
  depth = encoder.vit_kwargs["depth"]
  features_lib.feature_blocks(keys, depth)  # validates the keys before any work
  transform = dict(transform or eval_transform(encoder.image_size))
  path = None
  if cache_dir:
    digest = cache_digest(encoder.identity, dict(source_cfg), transform, dtype)
    path = paths.join(cache_dir, f"{digest}.npz")
    cached = _read_cache(path, keys)
    if _agree(cached is not None):
      return {k: v for k, v in cached.items() if k in keys or k in ("label", "index")}
    if paths.as_path(path).exists():  # covers fewer keys: recompute them with the new ones
      with paths.as_path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        keys = keys + tuple(k for k in data.files if k not in keys + ("label", "index"))
  source = sources.make_source(source_cfg)
  batches, num_steps = loader.make_eval_loader(source, transform, batch_size,
                                               worker_count=worker_count)
  model = ViT(**encoder.vit_kwargs, dtype=jnp.dtype(dtype))
  apply_fn = features_lib.encoder_apply_fn(model, keys)
  feats = features_lib.extract_features(apply_fn, encoder.variables, batches, feature_keys=keys,
                                        depth=depth, mesh=mesh, progress=progress,
                                        num_batches=num_steps)
  order = np.argsort(feats["index"], kind="stable")  # several hosts interleave: dataset order
  feats = {k: v[order] for k, v in feats.items()}
  if len(feats["index"]) != len(source):
    raise RuntimeError(f"feature extraction returned {len(feats['index'])} rows for "
                       f"{len(source)} examples; this is a bug")
  if np.any(feats["index"] != np.arange(len(source))):  # SkipUnreadable stood in a neighbour
    logging.warning("%s: some unreadable images were replaced by the next readable one",
                    source.name)
  if path and jax.process_index() == 0:
    _write_cache(path, feats, dict(encoder=encoder.identity, source=dict(source_cfg),
                                   transform=transform, dtype=dtype, keys=list(keys),
                                   num_examples=len(source)))
  return feats
