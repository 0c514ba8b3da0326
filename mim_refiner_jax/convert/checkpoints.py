"""Pre-trained ViT weights in and out: `load_pretrained`, `save_torch`, `save_flax`, `load_flax`.

`load_pretrained(path)` reads, without torch and without executing pickled code (torch_files.py):
  * MAE `.pth`             {"model": timm-named encoder}                 (refiner_facts.md 3.1)
  * MAWS `.pt`, timm       flat timm `VisionTransformer` state dict       (3.2)
  * data2vec 2.0 `.pt`     fairseq {"model": ..., "cfg": ...}; decoder and `_ema` dropped (3.3)
  * refined `.th`          {"state_dict": refined names, "ctor_kwargs": ...} (3.5, 3.6)
  * `.safetensors`         refined or timm naming (ours carry vit_kwargs in the metadata)
  * a directory            our Flax checkpoint (`save_flax`)
The format comes from the content (zip / legacy pickle / safetensors / directory), containers are
unwrapped in the reference order "state_dict", "model", "teacher", "target_encoder" (3.4), and the
architecture (family, width, depth, patch, grid) from the keys and shapes. Explicit overrides are
checked against the file; a mismatch lists missing, unexpected and wrongly shaped keys.

`save_torch` writes, without torch (torch_writer.py), the refined `.th` layout (both families), a
timm state dict or the MAE {"model": ...} layout (pre-norm only), in fp32, fp16 or bf16, or
safetensors (refined naming + vit_kwargs metadata; chosen because it holds both families and is
what the official loader's strict `state_dict` expects). `save_flax` / `load_flax`: an Orbax
checkpoint of {"params", "buffers"} plus `vit_kwargs.json`, which the trainer starts from.
"""

import dataclasses
import json
import os

import ml_dtypes
import numpy as np

from mim_refiner_jax import paths
from mim_refiner_jax.convert import mapping
from mim_refiner_jax.convert import torch_files
from mim_refiner_jax.convert import torch_writer

UNWRAP_ORDER = ("state_dict", "model", "teacher", "target_encoder")  # section 3.4 rule 1
# Our torch files carry vit_kwargs in this extra zip record (torch ignores it): timm / MAE state
# dicts have no place for the head count.
TORCH_RECORD = "mim_refiner_jax.json"
FLAX_KWARGS_FILE = "vit_kwargs.json"
FLAX_ARRAYS_DIR = "variables"


@dataclasses.dataclass
class Pretrained:
  """A converted encoder: `ViT(**vit_kwargs).apply(variables, images)`.

  variables: {"params": ..., "buffers": {"pos_embed": (1, g, g, D)}}, float32 numpy arrays (some
    may be transposed views of the file's data; np.ascontiguousarray if you need C order).
  info: "format" (mae, timm, data2vec2, refined, safetensors, flax, ...), "family"
    (prenorm/postnorm), "size" (mu/tiny/.../twob or generic(...)), "patch_size", "containers"
    (unwrapped keys), "dropped_keys", "notes", "path".
  """
  vit_kwargs: dict
  variables: dict
  info: dict

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(np.shape(v))) for v in _leaves(self.variables["params"]))


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


IJEPA_ENCODERS = ("target_encoder", "encoder")


def _unwrap(obj, path: str, ijepa_encoder: str = "target_encoder"):
  """Follows the reference container order; returns (flat state dict, containers, top level).

  An I-JEPA checkpoint ({"encoder", "predictor", "target_encoder", "opt", ...}, src/train.py)
  gives `ijepa_encoder` (the EMA target encoder by default, as I-JEPA evaluates)."""
  top, containers = obj, []
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
  if all(isinstance(obj.get(k), dict) for k in IJEPA_ENCODERS):
    if ijepa_encoder not in IJEPA_ENCODERS:
      raise ValueError(f"ijepa_encoder={ijepa_encoder!r}: choose one of {IJEPA_ENCODERS}")
    return obj[ijepa_encoder], [ijepa_encoder], top
  for key in UNWRAP_ORDER:
    if isinstance(obj.get(key), dict):
      obj, containers = obj[key], containers + [key]
  return obj, containers, top


def _format_name(kind: str, containers: list, naming: str) -> str:
  if kind == "safetensors":
    return "safetensors"
  if naming == "fairseq":
    return "data2vec2"
  if naming == "refined" and containers in ([], ["state_dict"]):
    return "refined"
  if naming == "timm" and containers == ["model"]:
    return "mae"
  if naming == "timm" and not containers:
    return "timm"  # flat timm VisionTransformer dict, the MAWS layout
  if naming == "dinov2" and not containers:
    return "dinov2"  # DINOv2 hub file
  if naming == "timm" and containers[-1:] in (["target_encoder"], ["encoder"]):
    return "ijepa"
  return f"{'/'.join(containers) or 'flat'}:{naming}"


def fairseq_model_kwargs(cfg) -> dict | None:
  """Head count and patch size from a fairseq cfg (data2vec 2.0: cfg.model.num_heads,
  cfg.model.modalities.image.patch_size); None when cfg has no model section."""
  model = cfg.get("model") if isinstance(cfg, dict) else None
  if not isinstance(model, dict):
    return None
  image = (model.get("modalities") or {}).get("image") if isinstance(
      model.get("modalities"), dict) else None
  patch = (image or {}).get("patch_size", model.get("patch_size"))
  return {"num_heads": model.get("num_heads"), "patch_size": patch}


# The layout `save_torch` writes to give a file back in the layout it came from.
EXPORT_LAYOUT = {"mae": "mae", "timm": "timm", "dinov2": "dinov2", "ijepa": "ijepa",
                 "refined": "refined", "safetensors": "safetensors"}


def detect(path, **overrides) -> dict:
  """What a checkpoint holds, for tools that pick a config from a file: {"family" ("prenorm" /
  "postnorm"), "vit_kwargs" (ViT(**vit_kwargs) with the timm options it has), "format", "size",
  "layout" (save_torch's layout that writes it back; None for fairseq / Flax), "path"}.
  `overrides`: load_pretrained's (family, size, patch_size, num_heads, ijepa_encoder)."""
  pre = load_pretrained(path, **overrides)
  return dict(family=pre.info["family"], vit_kwargs=pre.vit_kwargs, format=pre.info["format"],
              size=pre.info["size"], layout=EXPORT_LAYOUT.get(pre.info["format"]),
              path=pre.info["path"])


def load_pretrained(path, *, family=None, size=None, patch_size=None, prenorm=None,
                    num_heads=None, ijepa_encoder="target_encoder") -> Pretrained:
  """Reads and converts any supported checkpoint (see module docstring).

  Overrides (None = detect): family ('prenorm'/'postnorm' or mae, maws, dbot, crossmae, d2v2,
  data2vec2), prenorm (bool), size (a `models.vit.SIZES` name; sets num_heads), patch_size,
  num_heads (heads cannot be read from weights: taken from the override, the file's
  ctor_kwargs/metadata, or a known width), ijepa_encoder ("target_encoder" or "encoder" of an
  I-JEPA checkpoint).
  """
  path = os.fspath(path)  # (local paths as given: messages name them as the user wrote them)
  if paths.is_remote(path):  # gs://...: a Flax directory is read in place, a file from a copy
    if paths.as_path(path).is_dir():
      return _load_flax_checked(path, family, size, patch_size, prenorm, num_heads)
    with paths.local_copy(path) as local:
      out = _load_file(local, family, size, patch_size, prenorm, num_heads, ijepa_encoder)
    out.info["path"] = path
    return out
  if torch_files.sniff(path) == "directory":
    return _load_flax_checked(path, family, size, patch_size, prenorm, num_heads)
  return _load_file(path, family, size, patch_size, prenorm, num_heads, ijepa_encoder)


def _load_file(path, family, size, patch_size, prenorm, num_heads,
               ijepa_encoder="target_encoder") -> Pretrained:
  kind = torch_files.sniff(path)
  obj = torch_files.load(path)
  sd, containers, top = _unwrap(obj, path, ijepa_encoder)
  file_kwargs, hint = None, False
  if kind == "safetensors":
    meta = top.get("__metadata__", {})
    if "vit_kwargs" in meta:
      saved = json.loads(meta["vit_kwargs"])
      file_kwargs, hint = saved, not saved.get("prenorm", True)
    containers = []
  elif isinstance(top.get("ctor_kwargs"), dict):  # refined / internal .th (section 3.5)
    file_kwargs = top["ctor_kwargs"]
    hint = any(word in str(file_kwargs.get("kind", "")) for word in ("data2vec2", "postnorm"))
  elif top.get("cfg") is not None:  # fairseq: a dict or a recorded omegaconf DictConfig
    file_kwargs = fairseq_model_kwargs(torch_files.config_to_python(top["cfg"]))
  if file_kwargs is None and kind == "torch-zip":  # written by save_torch
    record = torch_files.zip_record(path, TORCH_RECORD)
    try:
      file_kwargs = json.loads(record)["vit_kwargs"] if record else None
    except (ValueError, KeyError, TypeError):
      raise torch_files.CheckpointFormatError(f"{path}: damaged {TORCH_RECORD} record") from None
  try:
    variables, vit_kwargs, info = mapping.from_torch_state_dict(
        sd, family=family, size=size, patch_size=patch_size, prenorm=prenorm, num_heads=num_heads,
        ctor_kwargs=file_kwargs, postnorm_hint=hint)
  except ValueError as e:
    raise type(e)(f"{path}: {e}") from None
  info = dict(format=_format_name(kind, containers, info["naming"]), containers=containers,
              path=path, file_kind=kind, **info)
  other = sorted(str(k) for k in top if k not in containers[:1] and k != "__metadata__")
  if containers and other:
    info["ignored_top_level"] = other  # cfg, args, optimizer state, ctor_kwargs, ...
  return Pretrained(vit_kwargs, variables, info)


# --------------------------------------------------------------------- torch / safetensors out
TORCH_LAYOUTS = ("refined", "timm", "mae", "dinov2", "ijepa", "safetensors")
TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def save_torch(path, variables, vit_kwargs: dict, layout: str = "refined",
               dtype: str = "float32") -> None:
  """Writes `variables` as a PyTorch file, without torch (torch_writer.py).

  layout "refined": {"state_dict", "ctor_kwargs"} in the official .th naming, for both families
    (loads strictly into hub `PrenormVit` / `PostnormVit`, kappamodules blocks);
  "timm": a flat timm VisionTransformer(num_classes=0) state dict, pre-norm only (MAWS layout);
  "mae": {"model": the timm state dict}, as facebookresearch/mae releases (section 3.1);
  "dinov2": a DINOv2 hub state dict; "ijepa": {"encoder", "target_encoder"} with `module.` keys,
    as I-JEPA's train.py saves (mapping.to_torch_state_dict says which options each can hold);
  "safetensors": refined naming, written with safetensors.numpy; the metadata holds
    {"format": "mim_refiner_jax", "layout": "refined", "vit_kwargs": JSON}.
  dtype: float32, float16 or bfloat16 (round to nearest even, as torch's `.half()/.bfloat16()`).
  The torch layouts also carry vit_kwargs in an extra zip record (TORCH_RECORD; torch ignores
  it), so load_pretrained reads our timm / MAE files back without num_heads; a timm state dict
  itself has no place for the head count.
  """
  path = paths.resolve(path)
  if layout not in TORCH_LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {TORCH_LAYOUTS}")
  if dtype not in TORCH_DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(TORCH_DTYPES)}")
  vit_kwargs = mapping.normalize_vit_kwargs(vit_kwargs)
  sd = mapping.to_torch_state_dict(variables, vit_kwargs, "timm" if layout == "mae" else layout)
  sd = {k: v.astype(TORCH_DTYPES[dtype], copy=False) for k, v in sd.items()}
  paths.makedirs(paths.as_path(path).parent)
  with paths.upload_via_local(path) as local:  # gs://...: written here, then uploaded
    _save_torch_file(local, sd, vit_kwargs, layout)
    paths.make_readable(local)  # safetensors creates its files 0600; every other output is 0644


def _save_torch_file(path: str, sd: dict, vit_kwargs: dict, layout: str):
  if layout == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(sd, path, metadata={"format": "mim_refiner_jax", "layout": "refined",
                                  "vit_kwargs": json.dumps(vit_kwargs)})
    return
  record = {TORCH_RECORD: json.dumps({"format": "mim_refiner_jax", "layout": layout,
                                      "vit_kwargs": vit_kwargs}).encode()}
  if layout == "refined":
    obj = {"state_dict": sd, "ctor_kwargs": mapping.ctor_kwargs(vit_kwargs)}
  elif layout == "ijepa":  # I-JEPA's train.py saves DDP modules; both encoders, same weights
    encoder = {f"module.{k}": v for k, v in sd.items()}
    obj = {"encoder": encoder, "target_encoder": dict(encoder)}
  else:
    obj = {"model": sd} if layout == "mae" else sd
  torch_writer.save(obj, path, extra_records=record)


# ----------------------------------------------------------------------------- flax (Orbax) in/out
def save_flax(directory, variables, vit_kwargs: dict) -> None:
  """Writes DIR/variables (Orbax StandardCheckpointer) and DIR/vit_kwargs.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.resolve(directory)  # gs://... stays a URL (Orbax and epath write it)
  arrays_dir = paths.join(directory, FLAX_ARRAYS_DIR)
  if paths.as_path(arrays_dir).exists():
    raise FileExistsError(f"{arrays_dir} exists; write to a new directory or delete it first")
  vit_kwargs = mapping.normalize_vit_kwargs(vit_kwargs)
  mapping.check_variables(variables, vit_kwargs)
  tree = {"params": _to_numpy(variables["params"]), "buffers": _to_numpy(variables["buffers"])}
  paths.makedirs(directory)
  # The standard PyTree format (restorable with ocp.StandardCheckpointer / StandardRestore into
  # sharded targets), written synchronously without Orbax's defensive host copy, without zstd
  # (random-looking floats do not compress; it halved the speed) and 1 GB in flight at a time:
  # an L/16 conversion then peaks at about 2x the file size instead of 3.2x
  # (tools/bench_convert.py).
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused (all numpy); Orbax warns without
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1,
                                        type_handler_registry=registry)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(arrays_dir, args=ocp.args.PyTreeSave(tree))
  if jax.process_index() == 0:  # (the arrays above: every process writes its own shards)
    paths.as_path(directory).joinpath(FLAX_KWARGS_FILE).write_text(
        json.dumps({"format": "mim_refiner_jax.vit", "vit_kwargs": vit_kwargs}, indent=1))


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def load_flax(directory) -> Pretrained:
  """Reads a `save_flax` directory (numpy arrays; shard them with jax.device_put as needed)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.resolve(directory)
  meta_file = paths.join(directory, FLAX_KWARGS_FILE)
  if not paths.as_path(meta_file).exists():
    raise FileNotFoundError(f"{directory} is not a Flax ViT checkpoint: no {FLAX_KWARGS_FILE} "
                            f"(write one with convert.checkpoints.save_flax or "
                            f"tools/convert_weights.py --to flax)")
  fix = "re-create it (tools/convert_weights.py --to flax) or copy it again"
  try:
    vit_kwargs = json.loads(paths.as_path(meta_file).read_text())["vit_kwargs"]
  except (ValueError, KeyError, TypeError) as e:
    raise torch_files.CheckpointFormatError(
        f"{meta_file} is damaged ({type(e).__name__}: {e}); {fix}") from None
  arrays_dir = paths.join(directory, FLAX_ARRAYS_DIR)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(arrays_dir)
  except (ValueError, OSError, KeyError) as e:  # TensorStore/OCDBT errors are ValueErrors
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise torch_files.CheckpointFormatError(
        f"{arrays_dir}: the Flax checkpoint's arrays cannot be read, the directory is damaged or "
        f"incomplete ({first[:300]}); {fix}") from None
  variables = {"params": _to_numpy(tree["params"]), "buffers": _to_numpy(tree["buffers"])}
  mapping.check_variables(variables, vit_kwargs)
  info = dict(format="flax", family="prenorm" if vit_kwargs["prenorm"] else "postnorm",
              size=mapping.size_name(vit_kwargs), patch_size=vit_kwargs["patch_size"],
              containers=[], dropped_keys=[], notes=[], path=directory)
  return Pretrained(vit_kwargs, variables, info)


def _load_flax_checked(directory, family, size, patch_size, prenorm, num_heads) -> Pretrained:
  out = load_flax(directory)
  kw = out.vit_kwargs
  want_prenorm = mapping.resolve_prenorm(family, prenorm)
  checks = [("prenorm", want_prenorm, kw["prenorm"]), ("patch_size", patch_size, kw["patch_size"]),
            ("num_heads", num_heads, kw["num_heads"])]
  if size is not None:
    if size not in mapping.SIZES:
      raise ValueError(f"unknown size {size!r}; known: {sorted(mapping.SIZES)}")
    checks += [(k, v, kw[k]) for k, v in mapping.SIZES[size].items()]
  bad = [f"{name}: override {want} vs checkpoint {have}" for name, want, have in checks
         if want is not None and want != have]
  if bad:
    raise ValueError(f"{directory}: the Flax checkpoint does not match the overrides: "
                     + "; ".join(bad))
  return out
