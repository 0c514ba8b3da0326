r"""MIM-Refiner trainer: stage 2 (ID heads on a frozen encoder) or stage 3 (refinement).

  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=2 --workdir workdirs/l16_s2 \
      --config.init.pretrained=weights/mae_large16.pth
  python -m mim_refiner_jax.train --config configs/mae_l16.py:stage=3 --workdir workdirs/l16_s3

Any config field can be overridden: --config.batch_size=512. Data sources are spec strings
(mim_refiner_jax/data/sources.py): --config.data.train=image_folder:/data/train or
--config.data.train=tfds:imagenet2012:train,data_dir=/data/tfds; the k-NN sets
(--config.evals.knn.train / .test) are "auto" (derived from data.train) or specs of their own.
Ctrl-C or SIGTERM saves a checkpoint and exits; a second Ctrl-C quits at once. Bad inputs print
one line and exit with status 2 (--verbose shows the traceback).

Several processes (TPU pod slices, several GPU nodes): start the same command on every host.
`jax.distributed` is initialised before anything touches a device: automatically on TPU pods and
SLURM (or with --distributed=on), or explicitly with --coordinator_address, --num_processes and
--process_id. A run restarted with the same workdir resumes from its last checkpoint by itself,
on any host count (the global batches are a function of (seed, step)). A process that dies or
fails stops the others within --host_timeout seconds with one line naming it (distributed.py).

The file reads top to bottom: distributed -> config -> mesh -> input -> model and optimizer ->
state (resume | stage-2 workdir | pre-trained weights) -> step -> evaluation -> loop -> export.
It wires the package's pieces together and holds no maths of its own.
"""

import functools
import json
import os
import sys
import time
import zipfile

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
from mim_refiner_jax import distributed as distributed_lib
from mim_refiner_jax import errors
from mim_refiner_jax import metrics as metrics_lib
from mim_refiner_jax import optim
from mim_refiner_jax import paths
from mim_refiner_jax import sharding as sharding_lib
from mim_refiner_jax import state as state_lib
from mim_refiner_jax import supervisor
from mim_refiner_jax import train_step as train_step_lib
from mim_refiner_jax.convert import checkpoints as convert_lib
from mim_refiner_jax.convert import mapping as convert_mapping
from mim_refiner_jax.data import loader as loader_lib
from mim_refiner_jax.data import sources as sources_lib
from mim_refiner_jax.evaluation import monitor as monitor_lib
from mim_refiner_jax.models.heads import IDHead, NORMS
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
_HOST_TIMEOUT = flags.DEFINE_float(
    "host_timeout", 60.0, "Several processes: a process silent this many seconds (died, killed, "
    "host gone) stops all the others with one line naming it (mim_refiner_jax/distributed.py).")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after_steps", None, "Stop (with a checkpoint) after this many steps of this run, as if "
    "preempted; the next run with the same workdir resumes. For tests and job-time limits.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors (bad config "
                             "values, files, sources), which are otherwise one line.")

STATE_DIR, EXPORT_DIR = "checkpoints", "export"
# Checkpoint meta: the input stream is a function of (seed, global step) on any host count
# (data/loader.py), so a checkpoint holds no data-iterator state (issue 19, item 4).
INPUT_ORDER = "global_step"


def log(message: str, *args):
  """Console progress from process 0 (absl logging is left at WARNING: Orbax is chatty)."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S ") + (message % args if args else message), flush=True)


# ------------------------------------------------------------------------------------ distributed
def distributed_requested() -> bool:
  """--distributed=on, or auto with several processes (flags, a TPU pod, SLURM, Open MPI)."""
  explicit = _NUM_PROCESSES.value is not None and _NUM_PROCESSES.value > 1
  cluster = (len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
             or int(os.environ.get("SLURM_NTASKS", "1")) > 1
             or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  return _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and (explicit or cluster))


def initialize_distributed() -> distributed_lib.Watchdog | None:
  """Starts JAX's multi-host runtime before any device is touched (never at import time), and
  the watchdog that stops every process when one fails (None with one process)."""
  if not distributed_requested():
    return None
  if _HOST_TIMEOUT.value <= 0:
    raise errors.UserError(f"--host_timeout={_HOST_TIMEOUT.value} must be positive (seconds)")
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      heartbeat_timeout_seconds=distributed_lib.jax_heartbeat_timeout(_HOST_TIMEOUT.value))
  log("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return distributed_lib.Watchdog(_HOST_TIMEOUT.value).start() if jax.process_count() > 1 else None


# ------------------------------------------------------------------------------------------ config
def validate_config(config: ml_collections.ConfigDict):
  """Config mistakes found before anything is read or written (UserError naming the field)."""
  if config.stage not in (2, 3):
    raise errors.UserError(f"config.stage must be 2 or 3, got {config.stage}")
  if config.stage == 2 and not config.init.pretrained:
    raise errors.UserError(
        "stage 2 needs pre-trained weights: set --config.init.pretrained=PATH (any format "
        "tools/convert_weights.py reads, or a Flax checkpoint directory)")
  if config.stage == 3 and not (config.init.stage2_workdir or config.init.pretrained):
    raise errors.UserError("stage 3 starts from a stage-2 workdir: set "
                           "--config.init.stage2_workdir=DIR (or init.pretrained to skip stage 2)")
  if config.loss.local_view_indexing not in ("reference", "corrected"):
    raise errors.UserError("config.loss.local_view_indexing must be 'reference' or 'corrected', "
                           f"got {config.loss.local_view_indexing!r}")
  for field, value in (("batch_size", config.batch_size), ("queue.size", config.queue.size),
                       ("num_epochs", config.num_epochs)):
    if value <= 0:
      raise errors.UserError(f"config.{field} must be positive, got {value}")
  if config.warmup_epochs < 0:
    raise errors.UserError(f"config.warmup_epochs must be >= 0, got {config.warmup_epochs}")
  if config.batch_size % jax.device_count():
    raise errors.UserError(f"config.batch_size={config.batch_size} must divide by the number of "
                           f"devices ({jax.device_count()})")
  if config.queue.size % jax.device_count():
    raise errors.UserError(f"config.queue.size={config.queue.size} must divide by the number of "
                           f"devices ({jax.device_count()}): the queue is split over all of them")
  head_specs(config)  # a malformed head name or pooling: one line
  config_lib.check_queue(config)
  from mim_refiner_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  unknown = [p for p in final_protocols(config) if p not in suite.PROTOCOLS]
  if unknown:
    raise errors.UserError(f"config.evals.final.protocols: unknown {unknown}; choose from "
                           f"{', '.join(suite.PROTOCOLS)}")
  preset = (config.evals.get("final") or {}).get("preset", "default")
  if preset not in suite.presets.PRESET_NAMES:
    raise errors.UserError(f"config.evals.final.preset: unknown {preset!r}; choose from "
                           f"{', '.join(suite.presets.PRESET_NAMES)}")


def resolve_eval_sources(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the k-NN sets' "auto" replaced by specs derived from data.train.

  An experienced user who changes data.train expects the monitor to follow it, not to keep
  reading ImageNet (or to fail on a missing tfds dataset hours later): see
  sources.default_eval_sources. Sets given explicitly are kept as they are.
  """
  knn = config.evals.knn
  if not knn.features or "auto" not in (knn.train, knn.test):
    return config
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's is untouched
  bank, test = sources_lib.default_eval_sources(config.data.train)
  if config.evals.knn.train == "auto":
    config.evals.knn.train = sources_lib.describe_source(bank)
  if config.evals.knn.test == "auto":
    if test is None:
      raise errors.UserError(
          f"config.evals.knn.test is 'auto', which cannot derive a k-NN test set from "
          f"config.data.train={config.data.train!r}: set --config.evals.knn.test=SPEC (e.g. "
          "image_folder:/data/val), or --config.evals.knn.features= to train without the k-NN "
          "monitor")
    config.evals.knn.test = sources_lib.describe_source(test)
  config.lock()
  return config


def head_specs(config) -> list[config_lib.HeadSpec]:
  return config_lib.head_specs(config.heads.names, config.heads.get("pooling", ""))


# ------------------------------------------------------------------------------- model, optimizer
def build_model(config, vit_kwargs: dict, num_devices: int | None = None) -> Refiner:
  """`num_devices`: those the batch is sharded over (default all): the blocks of per-device
  statistics of heads.norm local_batch and batch_renorm."""
  dtype = jnp.dtype(config.model.compute_dtype)
  # Stage 3 cuts the backward pass at the frozen blocks (pre-norm ViTs; models/vit.py says why).
  frozen = config.optim.frozen_blocks if config.stage == 3 and vit_kwargs["prenorm"] else 0
  encoder = ViT(**vit_kwargs, dtype=dtype, remat=config.model.remat, frozen_blocks=frozen)
  norm = config.heads.get("norm", "sync_batch")  # old configs: the reference's SyncBN
  if norm not in NORMS:
    raise errors.UserError(f"config.heads.norm={norm!r}: choose one of {', '.join(NORMS)} "
                           "(models/heads.py)")
  head = IDHead(proj_hidden_dim=config.heads.proj_hidden, pred_hidden_dim=config.heads.pred_hidden,
                output_dim=config.heads.out_dim, dtype=head_dtype(config), norm=norm,
                norm_groups=num_devices or jax.device_count())
  return Refiner(encoder, head_specs(config), head)


def head_dtype(config):
  """Dtype of heads and NNA logits (models/heads.py); old configs: the compute dtype."""
  return jnp.dtype(config.model.get("head_dtype", config.model.compute_dtype))


def build_step(config, model, tx, mesh, state_shardings, lr_fn, with_ema: bool,
               batch_shardings):
  """The jitted train step of `config` (also what tools/plan_memory.py compiles)."""
  logits = head_dtype(config)
  return train_step_lib.make_train_step(
      model, tx, mesh, state_shardings, topk=config.queue.topk,
      local_view_indexing=config.loss.local_view_indexing,
      ema_decay=config.ema_decay if with_ema else None, freeze_encoder=config.stage == 2,
      sim_dtype=jnp.dtype(config.queue.similarity_dtype), lr_fn=lr_fn,
      logits_dtype=None if logits == jnp.float32 else logits, batch_shardings=batch_shardings)


def check_architecture(config, vit_kwargs: dict, where: str):
  """The config's model fields, where set, must agree with the weights."""
  from mim_refiner_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.size:
    want = SIZES[m.size] if m.size in SIZES else None
    got = {k: vit_kwargs[k] for k in ("width", "depth", "num_heads")}
    if want is None or want != got:
      raise errors.UserError(
          f"config.model.size={m.size!r} does not match the weights in {where} ({got}); fix "
          "config.model.size (or set it to '' to take the size from the weights) or point init "
          "at the right file")
  if m.patch_size and m.patch_size != vit_kwargs["patch_size"]:
    raise errors.UserError(f"config.model.patch_size={m.patch_size} but {where} has patch size "
                           f"{vit_kwargs['patch_size']}")
  if m.get("num_heads") and m.num_heads != vit_kwargs["num_heads"]:
    raise errors.UserError(f"config.model.num_heads={m.num_heads} but {where} has "
                           f"{vit_kwargs['num_heads']} heads")
  if m.prenorm != vit_kwargs["prenorm"]:
    raise errors.UserError(f"config.model.prenorm={m.prenorm} but {where} holds a "
                           f"{'pre' if vit_kwargs['prenorm'] else 'post'}-norm model")


def schedule_steps(config, steps_per_ep: float, quiet: bool = False) -> tuple[int, int]:
  """(total, warmup) updates; a warmup as long as the run is clipped to leave one cosine step."""
  total = int(round(config.num_epochs * steps_per_ep))
  warmup = int(round(config.warmup_epochs * steps_per_ep))
  if total < 1:
    raise errors.UserError(f"config.num_epochs={config.num_epochs} gives no update at "
                           f"{steps_per_ep} steps per epoch: raise config.num_epochs")
  if warmup >= total:
    if not quiet:
      log("warning: warmup_epochs=%s (%d steps) >= the run (%d steps); warmup clipped to %d "
          "steps", config.warmup_epochs, warmup, total, total - 1)
    warmup = total - 1
  return total, warmup


def build_optimizer(config, params, steps_per_ep: float, freeze_encoder: bool, depth: int,
                    quiet: bool = False):
  total, warmup = schedule_steps(config, steps_per_ep, quiet)
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
  path = paths.join(workdir, "run.json")
  if not paths.as_path(path).exists():
    raise errors.UserError(f"{path} not found: {workdir} is not a workdir of this trainer (or "
                           "its first run stopped before its first step)")
  try:
    return json.loads(paths.as_path(path).read_text())
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path} is unreadable ({e}); it records how the run in {workdir} "
                           "was configured") from None


def write_run_info(workdir: str, info: dict, is_main: bool):
  if is_main:
    paths.as_path(workdir).joinpath("run.json").write_text(json.dumps(info, indent=1))


def load_pretrained(path: str, num_heads: int | None = None,
                    setting: str = "config.init.pretrained"):
  """A pre-trained checkpoint, converted; a file that cannot be read is a UserError naming the
  setting that points at it (the trainer's config field, or a tool's flag)."""
  try:
    return convert_lib.load_pretrained(path, num_heads=num_heads)
  except errors.UserError:
    raise
  except FileNotFoundError as e:
    raise errors.UserError(f"{setting}={path}: {e}") from None
  except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    while first_line.startswith(f"{path}: "):  # the readers' messages lead with the path already
      first_line = first_line[len(path) + 2:]
    if isinstance(e, convert_mapping.ArchitectureMismatch):  # readable: the line names the fix
      raise errors.UserError(f"{setting}={path}: {first_line}") from None
    raise errors.UserError(f"{setting}={path} cannot be read: {first_line}; point it at a "
                           "checkpoint tools/convert_weights.py reads") from None


# Fields that fix the shapes and structure of the saved state: a run must resume with the values
# it started with, and stage 3 must match the stage-2 state it continues (refiner_facts.md
# section 7: encoder, heads, BatchNorm statistics and queues are carried as they are). The
# encoder's own fields (model.*) are checked against the recorded architecture instead
# (check_architecture), since "" there means "whatever the weights are".
HEAD_FIELDS = ("heads.proj_hidden", "heads.pred_hidden", "heads.out_dim", "heads.norm",
               "queue.size")
STATE_FIELDS = ("stage", "heads.names", "heads.pooling", "optim.frozen_blocks") + HEAD_FIELDS
ORDER_FIELDS = ("seed", "batch_size")


def _field(config_dict: dict, field: str):
  node = config_dict
  for part in field.split("."):
    if not isinstance(node, dict) or part not in node:
      return None  # a field that did not exist when that run was made
    node = node[part]
  if field == "heads.names":  # a set: the state is keyed by name
    return ",".join(sorted(node.split(",")))
  return node


def check_same_fields(config, saved_config: dict, fields, where: str, fix: str):
  """UserError naming the first of `fields` whose value differs from `saved_config`'s."""
  current = config.to_dict()
  for field in fields:
    old, new = _field(saved_config, field), _field(current, field)
    if old is not None and new is not None and old != new:
      raise errors.UserError(f"config.{field}={new!r} but {where} has {field}={old!r}; "
                             + fix.format(field=field, old=old))


def check_resume_config(config, workdir: str, info: dict):
  """A resumed run must build the state its checkpoint holds (else: say which field changed)."""
  fix = "resume with --config.{field}={old}, or start a new run in another workdir"
  check_same_fields(config, info["config"], STATE_FIELDS, f"the run in {workdir}", fix)
  # The sample order is a function of (seed, batch_size, step) on any host count (issue 19):
  # another value would continue with a silently different order.
  check_same_fields(config, info["config"], ORDER_FIELDS, f"the run in {workdir}",
                    "the sample order is a function of (seed, batch_size, step), so the run "
                    "would continue with another order: " + fix)
  saved_ema = _field(info["config"], "ema_decay")
  if saved_ema is not None and (saved_ema > 0) != (config.ema_decay > 0):
    raise errors.UserError(
        f"config.ema_decay={config.ema_decay} but the run in {workdir} was started with "
        f"ema_decay={saved_ema}: an EMA cannot be added to or dropped from a run; "
        + fix.format(field="ema_decay", old=saved_ema))


def load_stage2_state(config, mesh, rules, key):
  """The last checkpoint of a stage-2 workdir, heads narrowed to this config's (section 7)."""
  workdir = config.init.stage2_workdir  # (local, or gs://... read through etils.epath)
  info = read_run_info(workdir)
  s2_config = ml_collections.ConfigDict(info["config"])
  if s2_config.stage != 2:
    raise errors.UserError(f"config.init.stage2_workdir={workdir} holds a stage-"
                           f"{s2_config.stage} run, not stage 2")
  check_architecture(config, info["vit_kwargs"], f"the stage-2 workdir {workdir}")
  # Stage 3 carries the stage-2 heads and queues as they are: the sizes must agree.
  check_same_fields(config, info["config"], HEAD_FIELDS,
                    f"the stage-2 state in config.init.stage2_workdir={workdir}",
                    "stage 3 continues the stage-2 heads and queues as they are (refiner_facts "
                    "section 7): set --config.{field}={old}, or rerun stage 2 with the value you "
                    "want")
  wanted = [h.name for h in head_specs(config)]
  missing = [n for n in wanted if n not in s2_config.heads.names.split(",")]
  if missing:
    raise errors.UserError(
        f"config.heads.names: heads {missing} are not in the stage-2 workdir {workdir} (it has "
        f"{s2_config.heads.names}); stage 3 keeps a subset of the stage-2 heads")
  s2_model = build_model(s2_config, info["vit_kwargs"])
  s2_steps = info["steps_per_epoch"]
  s2_tx, _, _ = build_optimizer(s2_config, param_shapes(s2_config, s2_model, key), s2_steps,
                                True, s2_model.encoder.depth, quiet=True)
  init = _init_fn(s2_config, s2_model, s2_tx, with_ema=False)
  shapes = jax.eval_shape(init, key)
  target = checkpoint_lib.abstract_with_shardings(
      shapes, sharding_lib.infer_shardings(mesh, shapes, rules))
  ckpt_dir = paths.join(workdir, STATE_DIR)
  if not paths.as_path(ckpt_dir).is_dir():  # (the Checkpointer would create it in that workdir)
    raise errors.UserError(f"no checkpoint in {ckpt_dir}: run stage 2 there first")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, every_steps=1, keep=1)
  # The newest stage-2 checkpoint that restores (a damaged one is reported and left in place).
  restored = ckpt.restore_newest(target, set_aside=False)
  ckpt.close()
  if restored is None:
    raise errors.UserError(f"no checkpoint in {ckpt_dir}: run stage 2 there first")
  step, s2_state, _ = restored
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


# ------------------------------------------------------------------------------------------- main
class WorkdirGuard:
  """Puts the workdir back as this run found it if the run fails before its first step.

  A failed start (bad weights, out of memory while compiling, Ctrl-C) must not leave an empty
  checkpoints/, metrics.jsonl or tb/ behind that look like a run; entries that existed before
  (a run being resumed) are never touched. Only process 0 removes anything.
  """

  ENTRIES = ("checkpoints", "metrics.jsonl", "tb", "run.json")

  def __init__(self, workdir: str):
    self.workdir = paths.as_path(workdir)
    self.existed = {e for e in self.ENTRIES if self._exists(self.workdir / e)}
    self.armed = True

  @staticmethod
  def _exists(path) -> bool:
    return path.exists() or os.path.islink(path)  # (a dangling local link)

  def first_step_done(self):
    self.armed = False

  def undo(self):
    if not self.armed or jax.process_index() != 0:
      return
    for entry in self.ENTRIES:
      path = self.workdir / entry
      if entry in self.existed or not self._exists(path):
        continue
      if path.is_dir() and not os.path.islink(path):
        path.rmtree(missing_ok=True)
      else:
        path.unlink()


def adopt_stage2_data(config: ml_collections.ConfigDict, data_train_given: bool):
  """Stage 3 trains on what its stage-2 workdir trained on, unless data.train was given.

  A stage-3 config names a data.train of its own (the demo's says MNIST): run after a stage 2 on
  an image folder, it would refine on other data without a word. Taken over, the "auto" k-NN
  sets follow it too; given explicitly and different, it is kept with a warning.
  """
  if config.stage != 3 or not config.init.stage2_workdir:
    return config
  if not paths.as_path(paths.join(config.init.stage2_workdir, "run.json")).exists():
    return config  # (load_stage2_state reports the missing stage 2)
  s2_train = read_run_info(config.init.stage2_workdir)["config"]["data"]["train"]
  own = config.data.train.to_dict() if hasattr(config.data.train, "to_dict") else config.data.train
  if json.dumps(s2_train, sort_keys=True) == json.dumps(own, sort_keys=True):
    return config
  if data_train_given:
    log("warning: stage 3 trains on config.data.train=%s but its stage-2 workdir %s trained on "
        "%s", own, config.init.stage2_workdir, s2_train)
    return config
  log("data.train=%s taken from the stage-2 workdir %s (the config's %s is not used; set "
      "--config.data.train to choose)", s2_train, config.init.stage2_workdir, own)
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.train = s2_train
  config.lock()
  return config


def train(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None,
          data_train_given: bool = False):
  """Runs (or resumes) one stage in `workdir`; returns `(state, last metrics fetched)`.

  data_train_given: data.train was chosen by the caller, so stage 3 keeps it (else it takes its
  stage-2 workdir's: adopt_stage2_data).
  """
  validate_config(config)
  config = adopt_stage2_data(config, data_train_given)
  config = resolve_eval_sources(config_lib.resolve_crop_sizes(config))
  workdir = os.fspath(workdir)  # gs://... stays a URL: never a local folder named after one
  workdir_existed = paths.as_path(workdir).is_dir()
  # Before anything is read or compiled: one line naming a workdir that cannot be written.
  paths.check_writable(workdir, "--workdir")
  try:
    # A second live run on the workdir is refused before anything is touched; the guard notes
    # what exists only once the lock is held, so a refused run never undoes the live run's files.
    with checkpoint_lib.WorkdirLock(workdir):
      guard = WorkdirGuard(workdir)
      try:
        return _train(config, workdir, stop_after, guard)
      except BaseException:
        guard.undo()
        raise
  finally:
    if not workdir_existed and jax.process_index() == 0 and not paths.is_remote(workdir):
      try:  # a run that failed before its first step leaves no empty workdir behind
        os.rmdir(workdir)
      except OSError:  # not empty (the run got going) or already gone
        pass


def _train(config, workdir: str, stop_after: int | None, guard: WorkdirGuard):
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir)
  mesh = sharding_lib.make_mesh(config.sharding.data, config.sharding.fsdp)
  rules = sharding_lib.state_rules(config.sharding.rules)
  stage2 = config.stage == 2
  key = jax.random.key(config.seed)
  log("devices: %d x %s, processes: %d, mesh %s", jax.device_count(),
      jax.devices()[0].device_kind, jax.process_count(), dict(mesh.shape))

  # ---------------------------------------------------------------------------------- input
  source = sources_lib.make_source(config.data.train, where="config.data.train",
                                   fail_fast=config.data.fail_fast or None)
  num_examples = config.data.num_train_examples or len(source)
  steps_per_ep = config_lib.steps_per_epoch(num_examples, config.batch_size)
  knn_cfg = config.evals.knn
  knn_sets = ({k: config.to_dict()["evals"]["knn"][k] for k in ("train", "test")}
              if knn_cfg.features else None)  # (to_dict: a spec may be a dict)
  log("training on %s (%d images); k-NN monitor: %s", config.data.train, num_examples,
      f"bank {knn_cfg.train}, test {knn_cfg.test}" if knn_sets else "off")
  # Any other MultiCropConfig field (e.g. flip_p, global_scale) via config.data.multicrop.
  crop_cfg = dict(global_size=config.data.global_size, local_size=config.data.local_size,
                  num_local=config.data.num_local, color_augs=config.data.color_augs,
                  **config.data.get("multicrop", {}))

  # --------------------------------------------------------------- model, optimizer, state
  ckpt = checkpoint_lib.Checkpointer(paths.join(workdir, STATE_DIR),
                                     every_steps=config.checkpoint.every_steps,
                                     keep=config.checkpoint.keep)
  resume_step = ckpt.latest_step()
  pretrained = s2_state = None
  if resume_step is not None:
    run_info = read_run_info(workdir)
    check_resume_config(config, workdir, run_info)
    vit_kwargs = run_info["vit_kwargs"]
  elif stage2 or not config.init.stage2_workdir:
    # model.num_heads: the head count of a timm/MAE file of a width not in the size table.
    pretrained = load_pretrained(config.init.pretrained, config.model.get("num_heads") or None)
    vit_kwargs = pretrained.vit_kwargs
  else:
    s2_state, vit_kwargs = load_stage2_state(config, mesh, rules, key)
  check_architecture(config, vit_kwargs, f"the run in {workdir}" if resume_step is not None
                     else config.init.pretrained if s2_state is None
                     else f"the stage-2 workdir {config.init.stage2_workdir}")
  config_lib.check_model_fit(config, vit_kwargs)  # heads, crop sizes: before anything compiles
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
    # A damaged newest checkpoint is reported and skipped for the newest one that restores.
    resume_step, state, meta = ckpt.restore_newest(target)
    log("resumed %s at step %d (saved %s)", workdir, resume_step,
        time.ctime(meta["time"]) if "time" in meta else "at an unknown time")
    if meta.get("input_order") != INPUT_ORDER:
      log("warning: checkpoint step %d was saved before the input order became a function of "
          "(seed, step); the run continues from it with another sample order than an "
          "uninterrupted run's", resume_step)
  elif s2_state is not None:
    state, shardings = state_lib.stage3_from_stage2(s2_state, tx, mesh, rules,
                                                    with_ema=with_ema)
    del s2_state
  else:
    state, shardings = state_lib.create_state(init_fn, key, mesh, rules)
    state = insert_pretrained(state, shardings, pretrained.variables)
    del pretrained
  run_info = {"config": config.to_dict(), "vit_kwargs": vit_kwargs,
              "training_source": config.to_dict()["data"]["train"], "knn_sets": knn_sets,
              "steps_per_epoch": steps_per_ep, "total_steps": total_steps}

  # The input stream starts at the state's global step: the same samples on any host count.
  train_iter = loader_lib.make_train_loader(source, crop_cfg, config.batch_size, config.seed,
                                            start_step=int(jax.device_get(state["step"])),
                                            worker_count=config.data.worker_count)

  # ------------------------------------------------------------------------------- step
  batch_example = _host_batch(train_iter, peek=True)
  step_fn = build_step(config, model, tx, mesh, shardings, lr_fn, with_ema,
                       sharding_lib.batch_shardings(mesh, batch_example))
  abstract_batch = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:]
                                        if x.ndim == 1 else
                                        (x.shape[0], x.shape[1] * jax.process_count())
                                        + x.shape[2:], x.dtype, sharding=s),
      batch_example, sharding_lib.batch_shardings(mesh, batch_example))
  t0 = time.time()
  # Ctrl-C / SIGTERM from here on set a flag instead of raising KeyboardInterrupt inside XLA's
  # compile, after which the interpreter's teardown crashed (issue 19: exit -11).
  preemption = checkpoint_lib.PreemptionFlag("stopping once the train step is compiled").install(
      multi_process=jax.process_count() > 1)
  log("compiling the train step")
  try:
    compiled = step_fn.lower(state, abstract_batch).compile()
  except BaseException:
    preemption.uninstall()
    raise
  if preemption.is_set():
    preemption.uninstall()
    raise KeyboardInterrupt  # before the first step: nothing to save (exit 130, as found)
  preemption.what = "saving a checkpoint and stopping after this step"
  distributed_lib.wait_for_all("train_step_compiled")  # processes compile at different speeds
  flops = metrics_lib.compiled_flops(compiled)
  memory = compiled.memory_analysis()
  mib = lambda name: getattr(memory, name, 0) / 2**20
  log("compiled the train step in %.1f s: %.3g FLOPs per device per step; per-device memory "
      "(MiB): arguments %.1f, outputs %.1f, temporaries %.1f", time.time() - t0,
      flops or float("nan"), mib("argument_size_in_bytes"), mib("output_size_in_bytes"),
      mib("temp_size_in_bytes"))

  # -------------------------------------------------------------------------- evaluation
  # Section 10.1: the live encoder and heads while training, also the EMA encoder at the end.
  knn = monitor_lib.KnnMonitor(knn_cfg, model, mesh) if knn_cfg.features else None
  if knn:
    log("k-NN monitor eval view: %s", knn.view)
  knn_every = int(round(knn_cfg.every_epochs * steps_per_ep)) if knn_cfg.every_epochs else 0
  if knn:
    log("k-NN sets: bank %s (%d images), test %s (%d images)", knn_cfg.train, knn.sizes["train"],
        knn_cfg.test, knn.sizes["test"])

  def evaluate(state, final: bool = False) -> dict:
    return knn.run(state, with_ema=final) if knn else {}

  # -------------------------------------------------------------------------------- loop
  start = int(jax.device_get(state["step"]))
  writer.drop_after(start)  # steps redone after a resume replace their old metric rows
  tracker = metrics_lib.ThroughputTracker(
      total_steps, config.batch_size, start_step=start, skip_steps=1,
      num_devices=jax.device_count(), flops_per_device=flops,
      peak_flops_per_device=metrics_lib.device_peak_flops())
  last = {}
  step = start
  log("stage %d: steps %d -> %d (%.1f steps/epoch), batch %d", config.stage, start,
      total_steps, steps_per_ep, config.batch_size)
  try:
    while step < total_steps:
      ckpt.check()  # a failed asynchronous save stops the run now, not at the next save
      host = _host_batch(train_iter)
      skipped = int(host.pop("num_skipped").sum())
      state, step_metrics = compiled(state, sharding_lib.global_batch(mesh, host))
      step += 1
      if guard.armed:  # the run has started: record how (read by resume and by stage 3)
        write_run_info(workdir, run_info, is_main)
        guard.first_step_done()
      # Several processes: the step all of them stop at after a SIGTERM / Ctrl-C on any of them
      # (called every step on every process: JAX's protocol needs each one's current step).
      agreed = ckpt.reached_preemption(step)
      if agreed:
        log("preemption notice (SIGTERM or Ctrl-C on a process): every process saves step %d "
            "and stops", step)
      stop = agreed or (jax.process_count() == 1 and preemption.is_set()) or (
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
        # evals.knn.ema_too (set by refine.py): the EMA's k-NN at every evaluation, not only
        # at the end (the report's curves).
        results = evaluate(state, final=with_ema and knn_cfg.get("ema_too", False))
        writer.write(step, results)
        log("step %d: %s", step, results)
        tracker.resume()
      if save_now:
        tracker.pause()
        ckpt.save(step, state, None, {"step": step, "time": time.time(),
                                      "stage": config.stage, "input_order": INPUT_ORDER},
                  force=True)
        tracker.resume()
      if stop and step < total_steps:
        log("stopping at step %d: checkpoint saved; rerun the same command (same --workdir) to "
            "resume", step)
        break
  finally:
    ckpt.close()  # (waits for the last save; a second Ctrl-C still ends the process at once)
    preemption.uninstall()

  if step >= total_steps:
    results = evaluate(state, final=True)
    if results:
      writer.write(step, results)
      last.update(results)
      log("final k-NN: %s", results)
    export(state, vit_kwargs, workdir, is_main, config.stage)
  writer.close()
  if step >= total_steps and final_protocols(config):
    run_final_protocols(config, workdir)
  return state, last


def final_protocols(config) -> tuple[str, ...]:
  final = config.evals.get("final")
  return tuple(p for p in (final.protocols if final else "").split(",") if p)


def run_final_protocols(config, workdir: str):
  """config.evals.final.protocols: the evaluation suite (tools/evaluate.py) on the finished run's
  EMA (else trained) encoder, read back from its last checkpoint; trained on data.train, tested
  on the k-NN test set, at the k-NN monitor's view, under config.evals.final.preset (the
  monitor's k and tau for "default"); a test set with classes data.train lacks is refused unless
  config.evals.final.allow_label_mismatch; WORKDIR/evaluation/results.json and TensorBoard scalars
  "eval/..." at the last step."""
  from mim_refiner_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  knn_cfg, final = config.evals.knn, config.evals.final
  preset = final.get("preset", "default")
  monitor = dict(k=(knn_cfg.k,), tau=knn_cfg.tau) if preset == "default" else {}
  opts = suite.Options.from_preset(
      preset, train=config.data.train, test=knn_cfg.test, protocols=final_protocols(config),
      per_block_k=knn_cfg.k, image_size=knn_cfg.crop_size, resize=knn_cfg.resize_size,
      batch_size=knn_cfg.batch_size, progress=False,
      allow_label_mismatch=bool(final.get("allow_label_mismatch", False)), **monitor)
  log("final evaluation (%s, preset %s) of %s", ",".join(opts.protocols), preset, workdir)
  suite.run([workdir], opts, names=[paths.basename(workdir)],
            out_dir=paths.join(workdir, "evaluation"), log=log, tensorboard=True)


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
def export(state, vit_kwargs: dict, workdir: str, is_main: bool, stage: int = 3):
  """Writes the (EMA) encoder as a Flax checkpoint and in the official PyTorch layout (3.6)."""
  params = state["ema"] if "ema" in state else state["params"]["encoder"]
  variables = jax.tree.map(np.asarray, multihost_utils.process_allgather(
      {"params": params, "buffers": state["buffers"]}, tiled=True))
  out = paths.join(workdir, EXPORT_DIR)
  if is_main and paths.as_path(out).exists():  # a finished run exported again: derived data
    paths.as_path(out).rmtree()
  multihost_utils.sync_global_devices("export")
  convert_lib.save_flax(paths.join(out, "encoder_flax"), variables, vit_kwargs)  # all processes
  if is_main:  # the official layout where it can hold the model (registers etc.: timm's)
    if convert_mapping.layout_refusal("refined", vit_kwargs) is None:
      convert_lib.save_torch(paths.join(out, "encoder_refined.th"), variables, vit_kwargs,
                             layout="refined")
    else:
      convert_lib.save_torch(paths.join(out, "encoder_timm.pth"), variables, vit_kwargs,
                             layout="timm")
  if "ema" in state:
    log("exported the EMA encoder to %s", out)
  elif stage == 3:
    log("exported the trained encoder to %s", out)
  else:  # stage 2 trains only the heads
    log("exported the encoder to %s: the unchanged input encoder (stage 2 trains only the "
        "heads)", out)


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value; "
                           "see --help)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise errors.UserError("--config and --workdir are required, e.g. --config=configs/"
                           "mae_l16.py:stage=2 --workdir=workdirs/mae_l16_s2 (see --help)")
  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):  # ml_collections defers this error
    config_lib.load_config_file(flags.FLAGS["config"].config_filename)  # UserError naming it
  if distributed_requested() and not supervisor.supervised():
    # The trainer runs as a child of this process: JAX's abort when process 0 is lost becomes
    # one line here (supervisor.py). Nothing has touched a device yet.
    sys.exit(supervisor.run("mim_refiner_jax.train", sys.argv[1:], _PROCESS_ID.value,
                            _NUM_PROCESSES.value))
  watchdog = initialize_distributed()
  given = "data.train" in config_flags.get_override_values(flags.FLAGS["config"])
  try:
    train(config, _WORKDIR.value, _STOP_AFTER.value, data_train_given=given)
  except BaseException as e:  # pylint: disable=broad-except
    if watchdog is None or isinstance(e, SystemExit):
      raise
    watchdog.fail(e, verbose=_VERBOSE.value)  # all processes stop with this one's error
  if watchdog is not None:
    watchdog.stop()
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def run():
  """The command line: user errors as one line (exit status 2), --help exits 0."""
  app.run(lambda argv: errors.run_main(lambda: main(argv), verbose=_VERBOSE.value),
          flags_parser=config_lib.absl_flags_parser)


if __name__ == "__main__":
  run()
