"""The trainer's k-NN monitor and end-of-run evaluation (refiner_facts.md section 10.1).

The reference monitors, with k=10 and tau=0.07 on a train subset -> test split:
  * the encoder's last-block CLS and mean patch token, no norm (config `evals.knn.features`, any
    feature keys of pooling.py);
  * each ID head's `projector.0` output (Linear -> BN -> GELU, BatchNorm in eval mode: running
    statistics), fed the head's own pooled block output ("head/<name>/projector0").
During training it reads the live parameters (stage 3 monitors the live encoder, as the reference
does); at the end of a stage-3 run the EMA encoder is evaluated as well ("knn_ema/..."), which is
what the paper reports. Metric names: "knn/<feature key>", "knn/head/<name>/projector0".

Config (`config.evals.knn`): train, test (source configs), resize_size, crop_size, batch_size, k,
tau, features (comma-separated keys; "" = no monitor), heads (bool, default True).
"""

from mim_refiner_jax.data import loader as loader_lib
from mim_refiner_jax.data import sources as sources_lib
from mim_refiner_jax.evaluation import dataset_features as dataset_lib
from mim_refiner_jax.evaluation import features as features_lib
from mim_refiner_jax.evaluation import knn as knn_lib
from mim_refiner_jax.models import refiner as refiner_lib
from mim_refiner_jax.models.heads import LinearBN


def _head_input(aux: dict, spec):
  """The pooled encoder output a head reads (section 2; as models/refiner.py)."""
  return refiner_lib.head_input(aux, spec)


class KnnMonitor:
  """k-NN accuracy of encoder features and head projector.0 outputs (module docstring)."""

  def __init__(self, cfg, model, mesh):
    """`model`: a models.refiner.Refiner (its encoder, head specs and head sizes)."""
    self.cfg, self.model, self.mesh = cfg, model, mesh
    self.depth = model.encoder.depth
    self.keys = tuple(k for k in cfg.features.split(",") if k)
    self.heads = model.heads if cfg.get("heads", True) else ()
    self.head_keys = tuple(f"head/{h.name}/projector0" for h in self.heads)
    self.apply_fn = self._make_apply_fn()  # one object: extract_features reuses its compile
    eval_cfg = dict(resize_size=cfg.resize_size, crop_size=cfg.crop_size)
    # tools/evaluate.py evaluates a workdir at this same view (suite.eval_view) and prints it
    self.view = dataset_lib.describe_view(eval_cfg)
    self.loaders, self.sizes = {}, {}
    for split in ("train", "test"):  # spec strings or dicts (data/sources.py)
      source = sources_lib.make_source(cfg[split], where=f"config.evals.knn.{split}")
      self.sizes[split] = len(source)
      self.loaders[split] = loader_lib.make_eval_loader(source, eval_cfg, cfg.batch_size)[0]

  def _make_apply_fn(self):
    encoder_keys = self.keys + tuple(
        h.pooling if h.block == "main" else f"block{h.block}_{h.pooling}" for h in self.heads)
    encoder_fn = features_lib.encoder_apply_fn(self.model.encoder, tuple(encoder_keys))
    head_def = self.model.head
    projector0 = LinearBN(head_def.proj_hidden_dim, gelu=True, dtype=head_def.dtype,
                          norm=head_def.norm)  # eval mode: each norm's statistics

    def apply(variables, images):
      out, aux = encoder_fn(variables["encoder"], images)
      extra = {}
      for h, key in zip(self.heads, self.head_keys):
        pooled = _head_input(aux, h)
        layer = {"params": variables["heads"][h.name]["projector_0"],
                 "batch_stats": variables["batch_stats"][h.name]["projector_0"]}
        extra[key] = projector0.apply(layer, pooled.astype("float32"), train=False)
      return out, dict(aux, extra=extra)

    return apply

  def _features(self, variables) -> dict:
    return {split: features_lib.extract_features(
        self.apply_fn, variables, loader, feature_keys=self.keys + self.head_keys,
        depth=self.depth, mesh=self.mesh) for split, loader in self.loaders.items()}

  def _knn(self, feats, keys, prefix) -> dict:
    out = {}
    for key in keys:
      res = knn_lib.knn_accuracy(feats["train"][key], feats["train"]["label"], feats["test"][key],
                                 feats["test"]["label"], k=self.cfg.k, tau=self.cfg.tau,
                                 mesh=self.mesh)
      out[f"{prefix}/{key}"] = res["accuracy"]
    return out

  def run(self, state, *, with_ema: bool = False) -> dict:
    """k-NN of the live encoder and heads; with_ema also of the EMA encoder (if the state has
    one): {"knn/<key>": acc, "knn/head/<name>/projector0": acc, "knn_ema/<key>": acc}."""
    variables = {"encoder": {"params": state["params"]["encoder"], "buffers": state["buffers"]},
                 "heads": state["params"]["heads"], "batch_stats": state["batch_stats"]}
    out = self._knn(self._features(variables), self.keys + self.head_keys, "knn")
    if with_ema and "ema" in state and self.keys:
      ema = dict(variables, encoder={"params": state["ema"], "buffers": state["buffers"]})
      out.update(self._knn(self._features(ema), self.keys, "knn_ema"))
    return out
