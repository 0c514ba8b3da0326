"""One PyTorch <-> Flax name table plus value hooks, used in both directions; format detection.

Pure numpy: nothing here imports torch or jax. The canonical PyTorch naming is the official
refined layout (refiner_facts.md section 3.6: `patch_embed.proj.*`, `pos_embed.embed` (1,h,w,D),
`cls_tokens.tokens`, `blocks.{i}.*` with timm names, `norm.*` or `embed_norm.*`). Other namings
(MAE/MAWS/timm, data2vec 2.0 fairseq) are renamed to it first (section 3.4), then one table maps
each name to its Flax path with a value hook:

  linear  torch weight (out, in)          <-> kernel (in, out)            (transpose)
  conv    torch weight (O, I, kH, kW)     <-> kernel (kH, kW, I, O)       (section 3.7)
  copy    biases, LN weight <-> scale, cls token, pos table (unchanged)

The fused qkv stays fused: its output axis keeps torch's (3, heads, head_dim) order, which is
also what `models.vit.Attention` reshapes to. Hooks return views where possible (a transpose is
a view), so converting an L/16 file costs no second copy of the weights.
"""

import re

import ml_dtypes
import numpy as np

from mim_refiner_jax.models.vit import SIZES

# Families (section 1): the MAE family is pre-norm, data2vec 2.0 post-norm.
FAMILY_ALIASES = {
    "prenorm": True, "mae": True, "maws": True, "dbot": True, "crossmae": True, "timm": True,
    "postnorm": False, "d2v2": False, "data2vec2": False,
}

_STEM = [
    ("patch_embed.proj.weight", ("params", "patch_embed", "kernel"), "conv"),
    ("patch_embed.proj.bias", ("params", "patch_embed", "bias"), "copy"),
    ("cls_tokens.tokens", ("params", "cls_token"), "copy"),
    ("pos_embed.embed", ("buffers", "pos_embed"), "copy"),
]
_BLOCK = [
    ("norm1.weight", ("norm1", "scale"), "copy"),
    ("norm1.bias", ("norm1", "bias"), "copy"),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), "copy"),
    ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    ("attn.proj.bias", ("attn", "proj", "bias"), "copy"),
    ("norm2.weight", ("norm2", "scale"), "copy"),
    ("norm2.bias", ("norm2", "bias"), "copy"),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy"),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy"),
]

# hook: (torch -> flax, flax -> torch)
HOOKS = {
    "copy": (lambda w: w, lambda w: w),
    "linear": (lambda w: w.T, lambda w: w.T),
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
}


VIT_KWARGS_KEYS = (
    "patch_size", "width", "depth", "num_heads", "mlp_ratio", "prenorm", "pos_grid")


def normalize_vit_kwargs(vit_kwargs: dict) -> dict:
  """The structural ViT kwargs (dtype/remat dropped; mlp_ratio defaults to 4, as in `ViT`)."""
  kw = dict(vit_kwargs)
  kw.setdefault("mlp_ratio", 4.0)
  missing = [k for k in VIT_KWARGS_KEYS if k not in kw]
  if missing:
    raise ValueError(f"vit_kwargs {vit_kwargs} lacks {missing}; expected keys {VIT_KWARGS_KEYS}")
  return dict(patch_size=int(kw["patch_size"]), width=int(kw["width"]), depth=int(kw["depth"]),
              num_heads=int(kw["num_heads"]), mlp_ratio=float(kw["mlp_ratio"]),
              prenorm=bool(kw["prenorm"]), pos_grid=int(kw["pos_grid"]))


def name_table(depth: int, prenorm: bool) -> list[tuple[str, tuple[str, ...], str]]:
  """[(refined torch name, flax path, hook)] for a ViT of `depth` blocks."""
  table = list(_STEM)
  if not prenorm:  # data2vec 2.0: LayerNorm on all tokens before block 0 (section 1.3)
    table += [("embed_norm.weight", ("params", "embed_norm", "scale"), "copy"),
              ("embed_norm.bias", ("params", "embed_norm", "bias"), "copy")]
  for i in range(depth):
    table += [(f"blocks.{i}.{name}", ("params", f"blocks_{i}") + path, hook)
              for name, path, hook in _BLOCK]
  if prenorm:  # MAE family: final LayerNorm (section 1.2)
    table += [("norm.weight", ("params", "norm", "scale"), "copy"),
              ("norm.bias", ("params", "norm", "bias"), "copy")]
  return table


def expected_shapes(vit_kwargs: dict) -> dict[str, tuple[int, ...]]:
  """Refined-layout torch shapes of every tensor of `ViT(**vit_kwargs)`."""
  d, p, g = vit_kwargs["width"], vit_kwargs["patch_size"], vit_kwargs["pos_grid"]
  h = int(vit_kwargs.get("mlp_ratio", 4.0) * d)
  shapes = {"patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
            "cls_tokens.tokens": (1, 1, d), "pos_embed.embed": (1, g, g, d)}
  block = {"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d),
           "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h)}
  for name, _, _ in name_table(vit_kwargs["depth"], vit_kwargs["prenorm"]):
    if name not in shapes:
      shapes[name] = block.get(name.split(".", 2)[-1], (d,))
  return shapes


# ----------------------------------------------------------------------------- helpers
def _shape(v) -> tuple[int, ...] | None:
  shape = getattr(v, "shape", None)
  return None if shape is None else tuple(int(s) for s in shape)


def as_float32(v, name: str = "") -> np.ndarray:
  """np.float32 array of a TensorRef / numpy / torch CPU tensor (bf16 and fp16 widen exactly)."""
  if type(v).__module__.startswith("torch"):  # torch tensor: no torch import needed
    v = v.detach().cpu()
    v = (v.float() if v.is_floating_point() else v).numpy()
  arr = np.asarray(v)
  if arr.dtype.kind != "f" and arr.dtype != ml_dtypes.bfloat16:
    raise TypeError(f"tensor {name} has dtype {arr.dtype}; weights must be floating point")
  return arr.astype(np.float32, copy=False)


def _is_tensor(v) -> bool:
  return _shape(v) is not None and not isinstance(v, dict)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _flat_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat_paths(v, prefix + (k,))
  else:
    yield prefix


# ----------------------------------------------------------------------------- namings -> refined
_FAIRSEQ = "modality_encoders.IMAGE."
_FAIRSEQ_RENAMES = {  # section 3.3 / 3.4 rule 2
    _FAIRSEQ + "local_encoder.proj.weight": "patch_embed.proj.weight",
    _FAIRSEQ + "local_encoder.proj.bias": "patch_embed.proj.bias",
    _FAIRSEQ + "extra_tokens": "cls_tokens.tokens",
    _FAIRSEQ + "fixed_positional_encoder.positions": "pos_embed.embed",
    _FAIRSEQ + "context_encoder.norm.weight": "embed_norm.weight",
    _FAIRSEQ + "context_encoder.norm.bias": "embed_norm.bias",
}
_TIMM_RENAMES = {"cls_token": "cls_tokens.tokens", "pos_embed": "pos_embed.embed"}  # rule 3


def _dropped(name: str) -> bool:
  """Keys the reference loader drops: decoders, MAE's mask token, data2vec's EMA teacher."""
  return "decoder" in name or name == "mask_token" or name.startswith("_ema")


def naming_of(state_dict: dict) -> str:
  """'fairseq' (data2vec 2.0), 'refined' (official .th / kappamodules) or 'timm' (MAE, MAWS)."""
  keys = [k[len("model."):] if k.startswith("model.") else k for k in state_dict]
  if any(k.startswith(_FAIRSEQ) for k in keys):
    return "fairseq"
  if "cls_tokens.tokens" in keys or "pos_embed.embed" in keys:
    return "refined"
  return "timm"


def to_refined_names(state_dict: dict, postnorm_hint: bool = False):
  """Renames any supported naming to the refined one. Returns (dict, naming, dropped, notes)."""
  naming = naming_of(state_dict)
  out, dropped, notes = {}, [], []
  for name, value in state_dict.items():
    if name.startswith("model."):  # fine-tuned data2vec checkpoints (section 3.4 rule 2)
      name = name[len("model."):]
    if _dropped(name):
      dropped.append(name)
      continue
    if naming == "fairseq":
      name = _FAIRSEQ_RENAMES.get(name, name)
    elif naming == "timm":
      name = _TIMM_RENAMES.get(name, name)
    out[name] = value
  # Data2Vec2Vit maps a legacy `norm.*` to `embed_norm.*` (section 3.4 rule 2); only when the file
  # says it is data2vec 2.0, since for every other file `norm.*` is the pre-norm final LayerNorm.
  legacy = "norm.weight" in out and "embed_norm.weight" not in out
  if (naming == "fairseq" or postnorm_hint) and legacy:
    for suffix in ("weight", "bias"):
      if f"norm.{suffix}" in out:
        out[f"embed_norm.{suffix}"] = out.pop(f"norm.{suffix}")
    notes.append("renamed legacy data2vec 2.0 norm.* to embed_norm.*")
  return out, naming, dropped, notes


def pos_table_to_grid(pos, cls_token, name: str = "pos_embed"):
  """(1,T,D) -> (1,h,w,D) (section 3.4 rule 3). Returns (table, cls_token, notes).

  T = g*g + 1: row 0 is the CLS position (zeros in MAE/MAWS). timm adds it to the CLS token and
  our ViT gives CLS no position term, so a nonzero row is folded into the CLS token (exact).
  T = g*g: a table without CLS row (data2vec 2.0, MAE-CT).
  """
  shape = _shape(pos)
  if len(shape) == 4:
    return pos, cls_token, []
  if len(shape) != 3 or shape[0] != 1:
    raise ValueError(f"{name} has shape {shape}; expected (1, T, D) or (1, h, w, D)")
  t, d = shape[1], shape[2]
  notes = []
  g = int(round((t - 1) ** 0.5)) if t > 1 else -1
  if t > 1 and g * g == t - 1:
    pos = as_float32(pos, name)
    row = pos[:, :1]
    if np.any(row != 0):
      if cls_token is None:
        raise ValueError(f"{name} has a nonzero CLS row but the file has no CLS token")
      cls_token = as_float32(cls_token, "cls token") + row
      notes.append("folded the nonzero CLS position row into cls_token (exact: timm adds it)")
    pos = pos[:, 1:]
  else:
    g = int(round(t ** 0.5))
    if g * g != t:
      raise ValueError(f"{name} has {t} positions: neither a square grid nor a square plus a CLS "
                       f"row; rectangular grids need a (1, h, w, D) table")
    pos = as_float32(pos, name)
  return pos.reshape(1, g, g, d), cls_token, notes


# ----------------------------------------------------------------------------- torch -> flax
HEADS_FIX = ("pass --num-heads N (tools/convert_weights.py, tools/knn_eval.py), "
             "--config.model.num_heads=N (trainer) or num_heads=N (load_pretrained)")


def recorded_heads(ctor_kwargs) -> tuple[int | None, str]:
  """The head count a file records: `num_heads` (ours, hub, fairseq cfg.model) or
  `num_attn_heads` (the reference trainer's ctor_kwargs, refiner_facts.md section 3.5)."""
  for key in ("num_heads", "num_attn_heads"):
    value = (ctor_kwargs or {}).get(key)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
      return int(value), key
  return None, ""


def _infer_num_heads(width, depth, size, num_heads, ctor_kwargs):
  """Heads cannot be read from shapes: override, file kwargs, or a known size (section 1.4)."""
  recorded, key = recorded_heads(ctor_kwargs)
  wanted, how = (int(num_heads), f"num_heads={num_heads} (override)") if num_heads else (None, "")
  if size:
    if size not in SIZES:
      raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)} (or pass num_heads)")
    if wanted is None:
      wanted, how = SIZES[size]["num_heads"], f"size={size!r} ({SIZES[size]['num_heads']} heads)"
  if wanted is not None and recorded is not None and wanted != recorded:
    raise ValueError(f"{how} contradicts the file, which records {key}={recorded}: drop the "
                     f"override or set it to {recorded}")
  if wanted is not None:
    return wanted, "override" if num_heads else "size"
  if recorded is not None:
    return recorded, "file"
  for spec in SIZES.values():
    if spec["width"] == width and spec["depth"] == depth:
      return spec["num_heads"], "known size"
  for spec in SIZES.values():
    if spec["width"] == width:
      return spec["num_heads"], f"known width {width}"
  raise ValueError(f"cannot tell the number of attention heads of this ViT (width {width}, depth "
                   f"{depth}): the file does not record it (timm/MAE state dicts never do) and "
                   f"width {width} is not a known size ({sorted(SIZES)}); {HEADS_FIX}")


def size_name(vit_kwargs: dict) -> str:
  for name, spec in SIZES.items():
    if all(vit_kwargs[k] == v for k, v in spec.items()) and vit_kwargs.get("mlp_ratio", 4) == 4:
      return name
  return (f"generic(width={vit_kwargs['width']}, depth={vit_kwargs['depth']}, "
          f"heads={vit_kwargs['num_heads']}, mlp_ratio={vit_kwargs['mlp_ratio']:g})")


def resolve_prenorm(family, prenorm):
  """Combines the `family` and `prenorm` overrides (None = detect from the file)."""
  if family is not None:
    if family not in FAMILY_ALIASES:
      raise ValueError(f"unknown family {family!r}; use one of {sorted(FAMILY_ALIASES)}")
    if prenorm is not None and prenorm != FAMILY_ALIASES[family]:
      raise ValueError(f"family={family!r} contradicts prenorm={prenorm}")
    return FAMILY_ALIASES[family]
  return prenorm


def mismatch_report(state_dict: dict, expected: dict) -> str:
  """Lists missing, unexpected and wrongly shaped keys ('' when the dict matches)."""
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict if k not in expected or not _is_tensor(state_dict[k]))
  wrong = sorted(f"{k}: file {_shape(v)} vs expected {expected[k]}"
                 for k, v in state_dict.items()
                 if k in expected and _is_tensor(v) and _shape(v) != tuple(expected[k]))
  lines = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      shown = items[:12] + ([f"... {len(items) - 12} more"] if len(items) > 12 else [])
      lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
  return "\n".join(lines)


def from_torch_state_dict(state_dict: dict, *, family=None, size=None, patch_size=None,
                          prenorm=None, num_heads=None, ctor_kwargs=None, postnorm_hint=False):
  """Converts a flat PyTorch state dict (any supported naming) to ViT variables.

  Values may be numpy arrays, `torch_files.TensorRef`s or torch CPU tensors. Returns
  `(variables, vit_kwargs, info)`: variables = {"params": ..., "buffers": {"pos_embed"}} of
  float32 numpy arrays; info has "naming", "family", "size", "patch_size", "dropped_keys", "notes".
  Raises ValueError listing missing / unexpected / wrongly shaped keys when the file does not fit
  the (detected or overridden) architecture.
  """
  sd, naming, dropped, notes = to_refined_names(state_dict, postnorm_hint)
  for key in ("patch_embed.proj.weight", "cls_tokens.tokens", "pos_embed.embed"):
    if key not in sd or not _is_tensor(sd[key]):
      raise ValueError(f"not a ViT state dict: no {key} (naming {naming}); keys start with "
                       f"{sorted(sd)[:8]}")
  sd["pos_embed.embed"], sd["cls_tokens.tokens"], pos_notes = pos_table_to_grid(
      sd["pos_embed.embed"], sd["cls_tokens.tokens"])
  notes += pos_notes

  # Architecture from shapes (+ overrides).
  width, _, p, p2 = _shape(sd["patch_embed.proj.weight"])
  _, gh, gw, _ = _shape(sd["pos_embed.embed"])
  if p != p2 or gh != gw:
    raise ValueError(f"only square patches and grids are supported (patch {p}x{p2}, "
                     f"grid {gh}x{gw})")
  if patch_size is not None and int(patch_size) != p:
    raise ValueError(f"patch_size={patch_size} but the file's patch embedding has patch size {p}")
  recorded_patch = (ctor_kwargs or {}).get("patch_size")
  if isinstance(recorded_patch, (int, np.integer)) and recorded_patch != p:
    raise ValueError(f"the file records patch_size={recorded_patch} but its patch embedding has "
                     f"patch size {p} (corrupt or edited file?)")
  blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
  depth = max(blocks) + 1 if blocks else 0
  fc1 = sd.get("blocks.0.mlp.fc1.weight")
  mlp_ratio = _shape(fc1)[0] / width if fc1 is not None else 4.0
  has_norm, has_embed_norm = "norm.weight" in sd, "embed_norm.weight" in sd
  file_prenorm = has_norm if has_norm != has_embed_norm else None  # None: both or neither
  wanted = resolve_prenorm(family, prenorm)
  if wanted is None and file_prenorm is None:
    raise ValueError("cannot tell pre-norm from post-norm: the file has "
                     + ("both norm.* and embed_norm.*" if has_norm else
                        "neither norm.* (pre-norm final LayerNorm) nor embed_norm.* (data2vec 2.0)")
                     + "; pass family='prenorm' or 'postnorm'")
  is_prenorm = wanted if wanted is not None else file_prenorm
  heads, heads_source = _infer_num_heads(width, depth, size, num_heads, ctor_kwargs)
  vit_kwargs = dict(patch_size=p, width=width, depth=depth, num_heads=heads,
                    mlp_ratio=float(mlp_ratio), prenorm=bool(is_prenorm), pos_grid=gh)
  if size and any(vit_kwargs[k] != v for k, v in SIZES[size].items()):
    raise ValueError(f"size={size!r} ({SIZES[size]}) does not match the file: width {width}, "
                     f"depth {depth}")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by num_heads {heads}")

  report = mismatch_report(sd, expected_shapes(vit_kwargs))
  if report:
    family_name = "pre-norm (MAE family)" if is_prenorm else "post-norm (data2vec 2.0)"
    how = "as overridden" if wanted is not None else "as detected"
    raise ValueError(f"the state dict does not fit a {family_name} ViT {how} (width {width}, "
                     f"depth {depth}, patch {p}, grid {gh}; naming {naming}):\n{report}")

  variables = {}
  for name, path, hook in name_table(depth, is_prenorm):
    _set(variables, path, HOOKS[hook][0](as_float32(sd[name], name)))
  info = dict(naming=naming, family="prenorm" if is_prenorm else "postnorm",
              size=size_name(vit_kwargs), patch_size=p, num_heads_from=heads_source,
              dropped_keys=dropped, notes=notes)
  return variables, vit_kwargs, info


# ----------------------------------------------------------------------------- flax -> torch
LAYOUTS = ("refined", "timm", "safetensors")


def check_variables(variables: dict, vit_kwargs: dict) -> None:
  """Raises ValueError unless `variables` has exactly the paths and shapes of ViT(**vit_kwargs).

  Shapes only: nothing is copied (the hooks run on zero-strided placeholders).
  """
  vit_kwargs = normalize_vit_kwargs(vit_kwargs)
  table = name_table(vit_kwargs["depth"], vit_kwargs["prenorm"])
  shapes = expected_shapes(vit_kwargs)
  expected = {path: HOOKS[hook][0](np.broadcast_to(np.float32(0), shapes[name])).shape
              for name, path, hook in table}
  have = {path: _shape(_get(variables, path)) for path in _flat_paths(variables)}
  missing = sorted("/".join(p) for p in expected if p not in have)
  unexpected = sorted("/".join(p) for p in have if p not in expected)
  wrong = sorted(f"{'/'.join(p)}: {have[p]} vs expected {s}" for p, s in expected.items()
                 if p in have and have[p] != tuple(s))
  if missing or unexpected or wrong:
    raise ValueError(f"variables do not match ViT(**{vit_kwargs}):\n  missing: {missing}\n"
                     f"  unexpected: {unexpected}\n  wrong shape: {wrong}")


def to_torch_state_dict(variables: dict, vit_kwargs: dict, layout: str = "refined") -> dict:
  """Flat {torch name: contiguous float32 numpy array} in `layout`.

  "refined": the official MIM-Refiner .th naming (section 3.6), both families; "safetensors"
  uses the same naming. "timm": a timm `VisionTransformer(num_classes=0)` state dict (pre-norm
  only): `cls_token`, `pos_embed` (1, 1+g*g, D) with a zero CLS row (section 3.4).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  vit_kwargs = normalize_vit_kwargs(vit_kwargs)
  prenorm = bool(vit_kwargs["prenorm"])
  if layout == "timm" and not prenorm:
    raise ValueError(
        "a post-norm (data2vec 2.0) ViT cannot be written as a timm VisionTransformer: it has a "
        "LayerNorm on all tokens before block 0 (embed_norm), post-norm blocks "
        "(LN(x + f(x)) instead of x + f(LN x)) and no final norm, none of which timm's "
        "VisionTransformer can express (section 3.4). Use layout='refined' or 'safetensors'.")
  check_variables(variables, vit_kwargs)
  sd = {}
  for name, path, hook in name_table(vit_kwargs["depth"], prenorm):
    value = HOOKS[hook][1](np.asarray(_get(variables, path), np.float32))
    sd[name] = np.ascontiguousarray(value)
  if layout == "timm":
    pos = sd.pop("pos_embed.embed")
    d = pos.shape[-1]
    sd["pos_embed"] = np.concatenate([np.zeros((1, 1, d), np.float32), pos.reshape(1, -1, d)], 1)
    sd["cls_token"] = sd.pop("cls_tokens.tokens")
  return sd


def ctor_kwargs(vit_kwargs: dict) -> dict:
  """Constructor kwargs of the official `PrenormVit` / `PostnormVit` (hub/*.py)."""
  side = vit_kwargs["pos_grid"] * vit_kwargs["patch_size"]
  return dict(patch_size=vit_kwargs["patch_size"], dim=vit_kwargs["width"],
              depth=vit_kwargs["depth"], num_heads=vit_kwargs["num_heads"],
              mlp_hidden_dim=int(vit_kwargs.get("mlp_ratio", 4.0) * vit_kwargs["width"]),
              input_shape=(3, side, side), eps=1e-6)
