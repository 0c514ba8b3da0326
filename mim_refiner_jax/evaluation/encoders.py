"""Any encoder checkpoint this codebase reads -> `Encoder(vit_kwargs, variables, identity)`.

  * a PyTorch / safetensors file of any layout `convert.checkpoints.load_pretrained` reads (MAE
    .pth, MAWS .pt, data2vec 2.0 .pt, refined .th, timm, safetensors);
  * a Flax checkpoint directory (`save_flax`, e.g. a run's export/encoder_flax);
  * a training workdir (holds run.json and checkpoints/): the encoder of its latest (or a given)
    Orbax checkpoint, `weights="ema"` (stage 3's EMA, what the paper evaluates, section 10.1) or
    `"live"` (the trained parameters; stage 2 has no EMA, its encoder is the frozen input one).
    Only the encoder (and the position table) is read from the checkpoint, as numpy.

`identity` names the weights for the feature cache: the resolved path, the file's size and mtime
(or those of every file of a directory), and for a workdir the step and the weights chosen.
"""

import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np

from mim_refiner_jax import paths

WEIGHTS = ("auto", "ema", "live")


@dataclasses.dataclass
class Encoder:
  vit_kwargs: dict
  variables: dict  # {"params": ..., "buffers": {"pos_embed": ...}}, numpy
  identity: dict
  description: str

  @property
  def image_size(self) -> int:
    """The resolution the checkpoint was trained at: patch size x position grid."""
    return int(self.vit_kwargs["patch_size"]) * int(self.vit_kwargs["pos_grid"])


def is_workdir(path: str) -> bool:
  path = paths.as_path(path)
  return (path / "run.json").is_file() and (path / "checkpoints").is_dir()


def _file_stamp(path: str) -> list:
  if paths.is_remote(path):  # gs://...: size and modification time from the store
    st = paths.as_path(path).stat()
    return [st.length, st.mtime]
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _tree_stamp(directory: str) -> str:
  """A digest of the relative names, sizes and mtimes of every file under `directory`."""
  digest = hashlib.sha256()
  top = paths.resolve(directory)
  for root, dirs, files in paths.walk(directory):
    dirs.sort()
    for name in sorted(files):
      full = paths.join(root, name)
      digest.update(json.dumps([full[len(top):].lstrip("/"), *_file_stamp(full)]).encode())
  return digest.hexdigest()[:16]


def load_encoder(path: str, *, weights: str = "auto", step: int | None = None) -> Encoder:
  """Loads the encoder at `path` (module docstring). `weights`/`step` only apply to workdirs."""
  path = paths.resolve(path)  # gs://... stays a URL
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
  if not paths.as_path(path).exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  is_dir = paths.as_path(path).is_dir()
  if is_dir and is_workdir(path):
    return _load_workdir(path, weights, step)
  if weights != "auto" or step is not None:
    raise ValueError(f"--weights/--step select weights inside a training workdir; {path} is a "
                     "single checkpoint")
  from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
  pretrained = checkpoints.load_pretrained(path)
  stamp = _tree_stamp(path) if is_dir else _file_stamp(path)
  info = pretrained.info
  return Encoder(pretrained.vit_kwargs, pretrained.variables,
                 identity={"path": path, "stamp": stamp},
                 description=f"{path} ({info['format']}, {info['family']} {info['size']}, patch "
                             f"{info['patch_size']})")


def _load_workdir(workdir: str, weights: str, step: int | None) -> Encoder:
  vit_kwargs = json.loads(paths.as_path(workdir).joinpath("run.json").read_text())["vit_kwargs"]
  ckpt_dir = paths.join(workdir, "checkpoints")
  steps = sorted(int(d.name) for d in paths.as_path(ckpt_dir).iterdir()
                 if d.name.isdigit() and (d / "state").exists())
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint in {ckpt_dir}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"{workdir} has no checkpoint of step {step}; it has steps {steps}")
  state_dir = paths.join(ckpt_dir, str(step), "state")
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that the item dir has no step metadata
  try:
    return _restore_encoder(workdir, vit_kwargs, step, state_dir, weights)
  finally:
    logging.set_verbosity(verbosity)


def _restore_encoder(workdir, vit_kwargs, step, state_dir, weights) -> Encoder:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    has_ema = "ema" in tree
    if weights == "ema" and not has_ema:
      raise ValueError(f"{workdir} holds no EMA (stage 2, or ema_decay=0); use --weights live")
    chosen = "ema" if weights == "ema" or (weights == "auto" and has_ema) else "live"
    wanted = {"encoder": tree["ema"] if chosen == "ema" else tree["params"]["encoder"],
              "buffers": tree["buffers"]}
    subtree = {"buffers": tree["buffers"]}
    if chosen == "ema":
      subtree["ema"] = wanted["encoder"]
    else:
      subtree["params"] = {"encoder": wanted["encoder"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), subtree)
    out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=subtree, restore_args=restore_args, partial_restore=True))
  params = out["ema"] if chosen == "ema" else out["params"]["encoder"]
  as_f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
  variables = {"params": as_f32(params), "buffers": as_f32(out["buffers"])}
  return Encoder(vit_kwargs, variables,
                 identity={"path": workdir, "step": step, "weights": chosen,
                           "stamp": _tree_stamp(state_dir)},
                 description=f"{workdir} step {step} ({chosen} encoder)")
