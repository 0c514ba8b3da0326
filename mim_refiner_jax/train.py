r"""MIM-Refiner trainer: stage 2 (ID heads on a frozen encoder) or stage 3 (refinement).

  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=2 --workdir workdirs/l16_s2 \
      --config.init.pretrained=weights/mae_large16.pth
  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=3 --workdir workdirs/l16_s3

Several processes (TPU pod slices, several GPU nodes): start the same command on every host.
`jax.distributed` is initialised before anything touches a device: automatically on TPU pods and
SLURM (or with --distributed=on), or explicitly with --coordinator_address, --num_processes and
--process_id. A run restarted with the same workdir resumes from its last checkpoint by itself.

The file reads top to bottom: distributed -> config -> mesh -> input -> model and optimizer ->
state (resume | stage-2 workdir | pre-trained weights) -> step -> evaluation -> loop -> export.
It wires the package's pieces together and holds no maths of its own.
"""

import functools
import json
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from mim_refiner_jax import checkpoint as checkpoint_lib
from mim_refiner_jax import config as config_lib
from mim_refiner_jax import metrics as metrics_lib
from mim_refiner_jax import optim
from mim_refiner_jax import sharding as sharding_lib
from mim_refiner_jax import state as state_lib
from mim_refiner_jax import train_step as train_step_lib
from mim_refiner_jax.convert import checkpoints as convert_lib
from mim_refiner_jax.data import loader as loader_lib
from mim_refiner_jax.data import sources as sources_lib
from mim_refiner_jax.evaluation import features as features_lib
from mim_refiner_jax.evaluation import knn as knn_lib
from mim_refiner_jax.models.heads import IDHead
from mim_refiner_jax.models.refiner import Refiner
from mim_refiner_jax.models.vit import ViT

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py:stage=2",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Initialise jax.distributed: auto = when a multi-host cluster (TPU pod, SLURM, Open MPI) is "
    "detected or --num_processes > 1; on = always (cluster auto-detection); off = never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after_steps", None, "Stop (with a checkpoint) after this many steps of this run, as if "
    "preempted; the next run with the same workdir resumes. For tests and job-time limits.")

STATE_DIR, EXPORT_DIR = "checkpoints", "export"


def log(message: str, *args):
  """Console progress from process 0 (absl logging is left at WARNING: Orbax is chatty)."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S ") + (message % args if args else message), flush=True)


# ------------------------------------------------------------------------------------ distributed
def initialize_distributed():
  """Starts JAX's multi-host runtime before any device is touched (never at import time)."""
  explicit = _NUM_PROCESSES.value is not None and _NUM_PROCESSES.value > 1
  cluster = (len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
             or int(os.environ.get("SLURM_NTASKS", "1")) > 1
             or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not (explicit or cluster)):
    return
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  log("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# ------------------------------------------------------------------------------------------ config
def _source_cfg(cfg) -> dict:
  """Config of a data source without empty optional strings (e.g. data_dir="")."""
  return {k: v for k, v in cfg.to_dict().items() if v != ""}


def validate_config(config: ml_collections.ConfigDict):
  if config.stage not in (2, 3):
    raise ValueError(f"config.stage must be 2 or 3, got {config.stage}")
  if config.stage == 2 and not config.init.pretrained:
    raise ValueError("stage 2 needs pre-trained weights: set --config.init.pretrained=PATH (any "
                     "format tools/convert_weights.py reads, or a Flax checkpoint directory)")
  if config.stage == 3 and not (config.init.stage2_workdir or config.init.pretrained):
    raise ValueError("stage 3 starts from a stage-2 workdir: set "
                     "--config.init.stage2_workdir=DIR (or init.pretrained to skip stage 2)")
  if config.loss.local_view_indexing not in ("reference", "corrected"):
    raise ValueError("config.loss.local_view_indexing must be 'reference' or 'corrected', got "
                     f"{config.loss.local_view_indexing!r}")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide by the number of "
                     f"devices ({jax.device_count()})")
  if config.queue.size % jax.device_count():
    raise ValueError(f"config.queue.size={config.queue.size} must divide by the number of "
                     f"devices ({jax.device_count()}): the queue is split over all of them")
  for name in config.heads.names.split(","):
    config_lib.head_spec(name)  # raises a clear error for a malformed name


def head_specs(config) -> list[config_lib.HeadSpec]:
  return [config_lib.head_spec(n) for n in config.heads.names.split(",")]


# ------------------------------------------------------------------------------- model, optimizer
def build_model(config, vit_kwargs: dict) -> Refiner:
  dtype = jnp.dtype(config.model.compute_dtype)
  # Stage 3 cuts the backward pass at the frozen blocks (pre-norm ViTs; models/vit.py says why).
  frozen = config.optim.frozen_blocks if config.stage == 3 and vit_kwargs["prenorm"] else 0
  encoder = ViT(**vit_kwargs, dtype=dtype, remat=config.model.remat, frozen_blocks=frozen)
  head = IDHead(proj_hidden_dim=config.heads.proj_hidden, pred_hidden_dim=config.heads.pred_hidden,
                output_dim=config.heads.out_dim, dtype=head_dtype(config))
  return Refiner(encoder, head_specs(config), head)


def head_dtype(config):
  """Dtype of heads and NNA logits (models/heads.py); old configs: the compute dtype."""
  return jnp.dtype(config.model.get("head_dtype", config.model.compute_dtype))


def check_architecture(config, vit_kwargs: dict, where: str):
  """The config's model fields, where set, must agree with the weights."""
  from mim_refiner_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.size:
    want = SIZES[m.size] if m.size in SIZES else None
    got = {k: vit_kwargs[k] for k in ("width", "depth", "num_heads")}
    if want is None or want != got:
      raise ValueError(f"config.model.size={m.size!r} does not match the weights in {where} "
                       f"({got}); fix config.model.size or point init at the right file")
  if m.patch_size and m.patch_size != vit_kwargs["patch_size"]:
    raise ValueError(f"config.model.patch_size={m.patch_size} but {where} has patch size "
                     f"{vit_kwargs['patch_size']}")
  if m.prenorm != vit_kwargs["prenorm"]:
    raise ValueError(f"config.model.prenorm={m.prenorm} but {where} holds a "
                     f"{'pre' if vit_kwargs['prenorm'] else 'post'}-norm model")


def build_optimizer(config, params, steps_per_ep: float, freeze_encoder: bool, depth: int):
  total = int(round(config.num_epochs * steps_per_ep))
  warmup = int(round(config.warmup_epochs * steps_per_ep))
  o = config.optim
  tx, lr_fn = optim.make_optimizer(
      params, base_lr=o.base_lr, global_batch_size=config.batch_size, warmup_steps=warmup,
      total_steps=total, end_lr=o.end_lr, depth=depth, layer_decay=o.layer_decay,
      encoder_wd=o.encoder_wd, head_wd=o.head_wd, frozen_blocks=o.frozen_blocks,
      freeze_encoder=freeze_encoder, b1=o.b1, b2=o.b2, eps=o.eps)
  return tx, lr_fn, total


# ------------------------------------------------------------------------------------------ state
def param_shapes(config, model: Refiner, key):
  size = config.data.global_size
  return jax.eval_shape(functools.partial(
      model.init, global_views=jnp.zeros((2, 2, size, size, 3))), key)["params"]


def _init_fn(config, model, tx, with_ema):
  d = config.data
  local = (d.local_size, d.local_size, 3) if d.num_local else None
  return state_lib.make_init_fn(model, tx, global_shape=(d.global_size, d.global_size, 3),
                                local_shape=local, queue_size=config.queue.size,
                                with_ema=with_ema)


def read_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a workdir of this trainer")
  with open(path) as f:
    return json.load(f)


def load_stage2_state(config, mesh, rules, key):
  """The last checkpoint of a stage-2 workdir, heads narrowed to this config's (section 7)."""
  workdir = config.init.stage2_workdir
  info = read_run_info(workdir)
  s2_config = ml_collections.ConfigDict(info["config"])
  s2_model = build_model(s2_config, info["vit_kwargs"])
  s2_steps = info["steps_per_epoch"]
  s2_tx, _, _ = build_optimizer(s2_config, param_shapes(s2_config, s2_model, key), s2_steps,
                                True, s2_model.encoder.depth)
  init = _init_fn(s2_config, s2_model, s2_tx, with_ema=False)
  shapes = jax.eval_shape(init, key)
  target = checkpoint_lib.abstract_with_shardings(
      shapes, sharding_lib.infer_shardings(mesh, shapes, rules))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, STATE_DIR), every_steps=1, keep=1)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/{STATE_DIR}: run stage 2 there first")
  s2_state, _ = ckpt.restore(step, target)
  ckpt.close()
  wanted = [h.name for h in head_specs(config)]
  missing = [n for n in wanted if n not in s2_state["params"]["heads"]]
  if missing:
    raise ValueError(f"heads {missing} are not in the stage-2 workdir {workdir} (it has "
                     f"{sorted(s2_state['params']['heads'])}); stage 3 keeps a subset of them")
  pick = lambda tree: {n: tree[n] for n in wanted}
  s2_state["params"] = {"encoder": s2_state["params"]["encoder"],
                        "heads": pick(s2_state["params"]["heads"])}
  s2_state["batch_stats"] = pick(s2_state["batch_stats"])
  s2_state["queues"] = pick(s2_state["queues"])
  log("stage 3 starts from %s step %d (heads %s)", workdir, step, wanted)
  return s2_state, info["vit_kwargs"]


def insert_pretrained(state, shardings, pretrained_variables):
  """Puts converted encoder weights (numpy) into a freshly initialised state."""
  enc = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                     pretrained_variables["params"], shardings["params"]["encoder"])
  buffers = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                         pretrained_variables["buffers"], shardings["buffers"])
  state = dict(state, params=dict(state["params"], encoder=enc), buffers=buffers)
  if "ema" in state:
    state["ema"] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                                pretrained_variables["params"], shardings["ema"])
  return state


# ------------------------------------------------------------------------------------- evaluation
class KnnEvaluator:
  """k-NN accuracy (section 10.1) of encoder features: train subset -> test split."""

  def __init__(self, cfg, encoder: ViT, mesh):
    self.cfg, self.encoder, self.mesh = cfg, encoder, mesh
    self.keys = tuple(k for k in cfg.features.split(",") if k)
    blocks = features_lib.feature_blocks(self.keys, encoder.depth)
    # One object, so extract_features reuses its compiled function on every call.
    self.apply_fn = functools.partial(encoder.apply, blocks=blocks)
    eval_cfg = dict(resize_size=cfg.resize_size, crop_size=cfg.crop_size)
    self.loaders = {}
    for split in ("train", "test"):
      source = sources_lib.make_source(_source_cfg(cfg[split]))
      self.loaders[split] = loader_lib.make_eval_loader(source, eval_cfg, cfg.batch_size)[0]

  def run(self, encoder_params, buffers) -> dict:
    variables = {"params": encoder_params, "buffers": buffers}
    feats = {split: features_lib.extract_features(
        self.apply_fn, variables, loader, feature_keys=self.keys, depth=self.encoder.depth,
        mesh=self.mesh) for split, loader in self.loaders.items()}
    out = {}
    for key in self.keys:
      res = knn_lib.knn_accuracy(feats["train"][key], feats["train"]["label"], feats["test"][key],
                                 feats["test"]["label"], k=self.cfg.k, tau=self.cfg.tau,
                                 mesh=self.mesh)
      out[f"knn/{key}"] = res["accuracy"]
    return out


# ------------------------------------------------------------------------------------------- main
def train(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None):
  """Runs (or resumes) one stage in `workdir`; returns `(state, last metrics fetched)`."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir)
  mesh = sharding_lib.make_mesh(config.sharding.data, config.sharding.fsdp)
  rules = sharding_lib.state_rules(config.sharding.rules)
  stage2 = config.stage == 2
  key = jax.random.key(config.seed)
  log("devices: %d x %s, processes: %d, mesh %s", jax.device_count(),
      jax.devices()[0].device_kind, jax.process_count(), dict(mesh.shape))

  # ---------------------------------------------------------------------------------- input
  source = sources_lib.make_source(dict(_source_cfg(config.data.train),
                                        fail_fast=config.data.fail_fast))
  num_examples = config.data.num_train_examples or len(source)
  steps_per_ep = config_lib.steps_per_epoch(num_examples, config.batch_size)
  # Any other MultiCropConfig field (e.g. flip_p, global_scale) via config.data.multicrop.
  crop_cfg = dict(global_size=config.data.global_size, local_size=config.data.local_size,
                  num_local=config.data.num_local, color_augs=config.data.color_augs,
                  **config.data.get("multicrop", {}))
  train_iter = loader_lib.make_train_loader(source, crop_cfg, config.batch_size, config.seed,
                                            worker_count=config.data.worker_count)

  # --------------------------------------------------------------- model, optimizer, state
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, STATE_DIR),
                                     every_steps=config.checkpoint.every_steps,
                                     keep=config.checkpoint.keep)
  resume_step = ckpt.latest_step()
  pretrained = s2_state = None
  if resume_step is not None:
    vit_kwargs = read_run_info(workdir)["vit_kwargs"]
  elif stage2 or not config.init.stage2_workdir:
    pretrained = convert_lib.load_pretrained(config.init.pretrained)
    vit_kwargs = pretrained.vit_kwargs
  else:
    s2_state, vit_kwargs = load_stage2_state(config, mesh, rules, key)
  check_architecture(config, vit_kwargs, config.init.pretrained or config.init.stage2_workdir
                     or workdir)
  model = build_model(config, vit_kwargs)
  depth = model.encoder.depth
  tx, lr_fn, total_steps = build_optimizer(config, param_shapes(config, model, key), steps_per_ep,
                                           stage2, depth)
  with_ema = not stage2 and config.ema_decay > 0
  init_fn = _init_fn(config, model, tx, with_ema)

  if resume_step is not None:
    shapes = jax.eval_shape(init_fn, key)
    shardings = sharding_lib.infer_shardings(mesh, shapes, rules)
    target = checkpoint_lib.abstract_with_shardings(shapes, shardings)
    state, meta = ckpt.restore(resume_step, target, train_iter)
    log("resumed %s at step %d (saved %s)", workdir, resume_step,
        time.ctime(meta["time"]) if "time" in meta else "at an unknown time")
  elif s2_state is not None:
    state, shardings = state_lib.stage3_from_stage2(s2_state, tx, mesh, rules,
                                                    with_ema=with_ema)
    del s2_state
  else:
    state, shardings = state_lib.create_state(init_fn, key, mesh, rules)
    state = insert_pretrained(state, shardings, pretrained.variables)
    del pretrained
  if is_main:
    with open(os.path.join(workdir, "run.json"), "w") as f:
      json.dump({"config": config.to_dict(), "vit_kwargs": vit_kwargs,
                 "steps_per_epoch": steps_per_ep, "total_steps": total_steps}, f, indent=1)

  # ------------------------------------------------------------------------------- step
  batch_example = _host_batch(train_iter, peek=True)
  step_fn = train_step_lib.make_train_step(
      model, tx, mesh, shardings, topk=config.queue.topk,
      local_view_indexing=config.loss.local_view_indexing,
      ema_decay=config.ema_decay if with_ema else None, freeze_encoder=stage2,
      sim_dtype=jnp.dtype(config.queue.similarity_dtype), lr_fn=lr_fn,
      logits_dtype=None if head_dtype(config) == jnp.float32 else head_dtype(config),
      batch_shardings=sharding_lib.batch_shardings(mesh, batch_example))
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:]
                                        if x.ndim == 1 else
                                        (x.shape[0], x.shape[1] * jax.process_count())
                                        + x.shape[2:], x.dtype, sharding=s),
      batch_example, sharding_lib.batch_shardings(mesh, batch_example))
  t0 = time.time()
  compiled = step_fn.lower(state, abstract_batch).compile()
  flops = metrics_lib.compiled_flops(compiled)
  memory = compiled.memory_analysis()
  mib = lambda name: getattr(memory, name, 0) / 2**20
  log("compiled the train step in %.1f s: %.3g FLOPs per device per step; per-device memory "
      "(MiB): arguments %.1f, outputs %.1f, temporaries %.1f", time.time() - t0,
      flops or float("nan"), mib("argument_size_in_bytes"), mib("output_size_in_bytes"),
      mib("temp_size_in_bytes"))

  # -------------------------------------------------------------------------- evaluation
  knn_cfg = config.evals.knn
  knn = KnnEvaluator(knn_cfg, model.encoder, mesh) if knn_cfg.features else None
  knn_every = int(round(knn_cfg.every_epochs * steps_per_ep)) if knn_cfg.every_epochs else 0

  def evaluate(state) -> dict:
    params = state["ema"] if "ema" in state else state["params"]["encoder"]
    return knn.run(params, state["buffers"]) if knn else {}

  # -------------------------------------------------------------------------------- loop
  start = int(jax.device_get(state["step"]))
  tracker = metrics_lib.ThroughputTracker(
      total_steps, config.batch_size, start_step=start, skip_steps=1,
      num_devices=jax.device_count(), flops_per_device=flops,
      peak_flops_per_device=metrics_lib.device_peak_flops())
  preemption = checkpoint_lib.PreemptionFlag().install()
  last = {}
  step = start
  log("stage %d: steps %d -> %d (%.1f steps/epoch), batch %d", config.stage, start,
      total_steps, steps_per_ep, config.batch_size)
  try:
    while step < total_steps:
      host = _host_batch(train_iter)
      skipped = int(host.pop("num_skipped").sum())
      state, step_metrics = compiled(state, sharding_lib.global_batch(mesh, host))
      step += 1
      stop = preemption.is_set() or ckpt.reached_preemption(step) or (
          stop_after is not None and step - start >= stop_after)
      log_now = step % config.log_every_steps == 0 or step == total_steps
      save_now = ckpt.should_save(step) or stop or step == total_steps
      if log_now or save_now:
        fetched = jax.device_get(step_metrics)
        metrics_lib.check_finite(step, fetched)  # NaN: stop before saving; last good ckpt stays
        fetched["data/num_skipped"] = skipped
        perf = tracker.update(step)
        fetched.update({f"perf/{k}": v for k, v in perf.items()})
        if log_now:
          writer.write(step, fetched)
          log("%s | loss %.4f | lr %.3g", tracker.progress_line(step, perf),
              fetched["loss"], fetched.get("lr", float("nan")))
        last = fetched
      if knn and knn_every and step % knn_every == 0 and step < total_steps:
        tracker.pause()
        results = evaluate(state)
        writer.write(step, results)
        log("step %d: %s", step, results)
        tracker.resume()
      if save_now:
        tracker.pause()
        ckpt.save(step, state, train_iter, {"step": step, "time": time.time(),
                                            "stage": config.stage}, force=True)
        tracker.resume()
      if stop and step < total_steps:
        logging.warning("stopping at step %d; rerun with the same workdir to resume", step)
        break
  finally:
    preemption.uninstall()
    ckpt.close()

  if step >= total_steps:
    results = evaluate(state)
    if results:
      writer.write(step, results)
      last.update(results)
      log("final k-NN: %s", results)
    export(state, vit_kwargs, workdir, is_main)
  writer.close()
  return state, last


def _host_batch(train_iter, peek: bool = False):
  """The next per-host batch (or, with peek, the shapes of one without consuming it)."""
  if peek:
    state = train_iter.get_state()
    batch = next(train_iter)
    train_iter.set_state(state)
  else:
    batch = next(train_iter)
  batch = {k: np.asarray(v) for k, v in batch.items()}
  if batch["local"].shape[0] == 0:
    batch.pop("local")
  if peek:
    batch.pop("num_skipped")
  return batch


# ------------------------------------------------------------------------------------- export
def export(state, vit_kwargs: dict, workdir: str, is_main: bool):
  """Writes the (EMA) encoder as a Flax checkpoint and in the official PyTorch layout (3.6)."""
  params = state["ema"] if "ema" in state else state["params"]["encoder"]
  variables = jax.tree.map(np.asarray, multihost_utils.process_allgather(
      {"params": params, "buffers": state["buffers"]}, tiled=True))
  out = os.path.join(workdir, EXPORT_DIR)
  if is_main and os.path.exists(out):  # a finished run exported again: the export is derived data
    shutil.rmtree(out)
  multihost_utils.sync_global_devices("export")
  convert_lib.save_flax(os.path.join(out, "encoder_flax"), variables, vit_kwargs)  # all processes
  if is_main:
    convert_lib.save_torch(os.path.join(out, "encoder_refined.th"), variables, vit_kwargs,
                           layout="refined")
  log("exported the %s encoder to %s", "EMA" if "ema" in state else "trained", out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  train(_CONFIG.value, _WORKDIR.value, _STOP_AFTER.value)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
