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

from mim_refiner_jax.models.vit import OPTION_DEFAULTS, SIZES

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
# vit_kwargs carry only the timm options (OPTION_DEFAULTS, models/vit.py) that differ from timm's
# defaults, so the MAE / data2vec 2.0 kwargs (and every run.json written before) stay as they were.


def options(vit_kwargs: dict) -> dict:
  """All timm options of `vit_kwargs`, defaults filled in."""
  return {k: vit_kwargs.get(k, v) for k, v in OPTION_DEFAULTS.items()}


def use_fc_norm(vit_kwargs: dict) -> bool:
  o = options(vit_kwargs)
  return bool(o["fc_norm"]) if o["fc_norm"] is not None else o["global_pool"] == "avg"


def normalize_vit_kwargs(vit_kwargs: dict) -> dict:
  """The structural ViT kwargs (dtype/remat dropped; mlp_ratio defaults to 4, as in `ViT`)."""
  kw = dict(vit_kwargs)
  kw.setdefault("mlp_ratio", 4.0)
  missing = [k for k in VIT_KWARGS_KEYS if k not in kw]
  if missing:
    raise ValueError(f"vit_kwargs {vit_kwargs} lacks {missing}; expected keys {VIT_KWARGS_KEYS}")
  out = dict(patch_size=int(kw["patch_size"]), width=int(kw["width"]), depth=int(kw["depth"]),
             num_heads=int(kw["num_heads"]), mlp_ratio=float(kw["mlp_ratio"]),
             prenorm=bool(kw["prenorm"]), pos_grid=int(kw["pos_grid"]))
  for key, default in OPTION_DEFAULTS.items():
    if kw.get(key, default) != default:
      value = kw[key]
      out[key] = (int(value) if key == "reg_tokens" else float(value) if key == "init_values"
                  else str(value) if key == "global_pool" else bool(value))
  return out


_LAYER_SCALE = [("ls1.gamma", ("ls1", "gamma"), "copy"), ("ls2.gamma", ("ls2", "gamma"), "copy")]


def name_table(depth: int, prenorm: bool, opts: dict | None = None
               ) -> list[tuple[str, tuple[str, ...], str]]:
  """[(refined torch name, flax path, hook)] for a ViT of `depth` blocks and timm options `opts`
  (vit_kwargs or a part of it; defaults: OPTION_DEFAULTS). The options' tensors keep timm's
  names in the refined naming: `reg_token`, `blocks.{i}.ls1.gamma`, `fc_norm.*`."""
  o = options(opts or {})
  table = [row for row in _STEM if o["class_token"] or row[0] != "cls_tokens.tokens"]
  if o["reg_tokens"]:
    table.append(("reg_token", ("params", "reg_token"), "copy"))
  block = [row for row in _BLOCK if o["qkv_bias"] or row[0] != "attn.qkv.bias"]
  if o["init_values"]:
    block += _LAYER_SCALE
  fc_norm = use_fc_norm(o)
  if not prenorm:  # data2vec 2.0: LayerNorm on all tokens before block 0 (section 1.3)
    table += [("embed_norm.weight", ("params", "embed_norm", "scale"), "copy"),
              ("embed_norm.bias", ("params", "embed_norm", "bias"), "copy")]
  for i in range(depth):
    table += [(f"blocks.{i}.{name}", ("params", f"blocks_{i}") + path, hook)
              for name, path, hook in block]
  if prenorm:  # MAE family: final LayerNorm (section 1.2), or timm's fc_norm after pooling
    norm = "fc_norm" if fc_norm else "norm"
    table += [(f"{norm}.weight", ("params", norm, "scale"), "copy"),
              (f"{norm}.bias", ("params", norm, "bias"), "copy")]
  return table


def table_of(vit_kwargs: dict):
  return name_table(vit_kwargs["depth"], vit_kwargs["prenorm"], vit_kwargs)


def expected_shapes(vit_kwargs: dict) -> dict[str, tuple[int, ...]]:
  """Refined-layout torch shapes of every tensor of `ViT(**vit_kwargs)`."""
  d, p, g = vit_kwargs["width"], vit_kwargs["patch_size"], vit_kwargs["pos_grid"]
  h = int(vit_kwargs.get("mlp_ratio", 4.0) * d)
  shapes = {"patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
            "cls_tokens.tokens": (1, 1, d), "pos_embed.embed": (1, g, g, d),
            "reg_token": (1, options(vit_kwargs)["reg_tokens"], d)}
  block = {"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d),
           "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h)}
  table = table_of(vit_kwargs)
  shapes = {k: v for k, v in shapes.items() if k in {name for name, _, _ in table}}
  for name, _, _ in table:
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
# DINOv2 hub files (facebookresearch/dinov2, models/vision_transformer.py): timm names plus
# `register_tokens` (timm: reg_token) and `mask_token` (iBOT's, dropped); ls1/ls2.gamma as timm.
_DINOV2_RENAMES = dict(_TIMM_RENAMES, register_tokens="reg_token")

# Parts of other ViTs this encoder does not have: refused by name, never silently dropped.
UNSUPPORTED = (
    (re.compile(r"relative_position|rel_pos"), "relative position bias (BEiT / MViT style)"),
    (re.compile(r"rope|freqs"), "rotary position embedding (RoPE)"),
    (re.compile(r"\.(q_norm|k_norm)\."), "qk-norm"),
    (re.compile(r"mlp\.(w12|w3|w1|w2)\."), "a SwiGLU MLP (DINOv2 ViT-g)"),
    (re.compile(r"^(attn_pool|norm_pre)\."), "timm's attention pooling / pre-norm (CLIP style)"),
    (re.compile(r"\.(gamma_1|gamma_2|lambda_1|lambda_2)$"), "BEiT-style LayerScale names"),
)


def _dropped(name: str) -> bool:
  """Keys the reference loader drops: decoders, MAE's (and DINOv2's) mask token, data2vec's EMA
  teacher."""
  return "decoder" in name or name == "mask_token" or name.startswith("_ema")


def naming_of(state_dict: dict) -> str:
  """'fairseq' (data2vec 2.0), 'refined' (official .th / kappamodules), 'dinov2' (hub files with
  registers or a mask token) or 'timm' (MAE, MAWS, I-JEPA, timm VisionTransformer)."""
  keys = [k[len("model."):] if k.startswith("model.") else k for k in state_dict]
  if any(k.startswith(_FAIRSEQ) for k in keys):
    return "fairseq"
  if "cls_tokens.tokens" in keys or "pos_embed.embed" in keys:
    return "refined"
  if "register_tokens" in keys or ("mask_token" in keys and "blocks.0.ls1.gamma" in keys):
    return "dinov2"
  return "timm"


def to_refined_names(state_dict: dict, postnorm_hint: bool = False):
  """Renames any supported naming to the refined one. Returns (dict, naming, dropped, notes)."""
  if state_dict and all(k.startswith("module.") for k in state_dict):  # DDP (I-JEPA files)
    state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
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
    elif naming == "dinov2":
      name = _DINOV2_RENAMES.get(name, name)
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


def refuse_unsupported(state_dict: dict) -> None:
  """One-line ValueError naming the first key of a part this ViT does not have."""
  for name, value in state_dict.items():
    for pattern, what in UNSUPPORTED:
      if pattern.search(name):
        raise ValueError(f"key {name} {_shape(value)} is {what}, which this ViT does not "
                         "implement; such checkpoints cannot be refined here (nothing is dropped "
                         "silently)")


def pos_table_to_grid(pos, cls_token, name: str = "pos_embed", reg_token=None):
  """(1,T,D) -> (1,h,w,D) (section 3.4 rule 3). Returns (table, cls_token, reg_token, notes,
  no_embed_class).

  T = g*g + n with n = CLS + registers: rows 0..n-1 are the prefix tokens' positions (zeros in
  MAE/MAWS). timm adds them to the tokens and our ViT gives prefix tokens no position term, so
  nonzero rows are folded into the tokens (exact: timm adds them to constants).
  T = g*g: a table without prefix rows (data2vec 2.0, MAE-CT, timm `no_embed_class`, I-JEPA).
  """
  shape = _shape(pos)
  if len(shape) == 4:
    return pos, cls_token, reg_token, [], False
  if len(shape) != 3 or shape[0] != 1:
    raise ValueError(f"{name} has shape {shape}; expected (1, T, D) or (1, h, w, D)")
  t, d = shape[1], shape[2]
  notes = []
  r = _shape(reg_token)[1] if reg_token is not None else 0
  c = int(cls_token is not None)
  # Rows for CLS and registers (timm), for CLS only (DINOv2: registers have none), or none.
  for n, rows_of in ((c + r, "prefix"), (c, "cls") if r else (0, "")):
    g = int(round(max(t - n, 0) ** 0.5))
    if not (n and g > 0 and g * g == t - n):
      continue
    pos = as_float32(pos, name)
    rows, pos = pos[:, :n], pos[:, n:]
    if c and np.any(rows[:, :1] != 0):
      cls_token = as_float32(cls_token, "cls token") + rows[:, :1]
      notes.append("folded the nonzero CLS position row into cls_token (exact: timm adds it)")
    if rows_of == "prefix" and r and np.any(rows[:, c:] != 0):
      reg_token = as_float32(reg_token, "reg token") + rows[:, c:]
      notes.append("folded the register position rows into reg_token (exact: timm adds them)")
    # DINOv2's registers have no position rows: timm's no_embed_class model (CLS row folded).
    return pos.reshape(1, g, g, d), cls_token, reg_token, notes, rows_of == "cls"
  n = c + r
  g = int(round(t ** 0.5))
  if g * g != t:
    raise ValueError(f"{name} has {t} positions: neither a square grid nor a square plus {n} "
                     f"prefix rows (CLS, registers); rectangular grids need a (1, h, w, D) table")
  return as_float32(pos, name).reshape(1, g, g, d), cls_token, reg_token, notes, n > 0


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


class ArchitectureMismatch(ValueError):
  """A readable file whose keys or shapes do not fit the detected (or overridden) ViT."""


FIT_FIX = ("fix: if the detection is wrong, override it (tools/convert_weights.py --family/--size/"
           "--num-heads; the trainer: convert with those flags to a Flax directory and point "
           "init.pretrained at it), else the file has a part this ViT lacks")


def mismatch_summary(state_dict: dict, expected: dict, count: int = 3) -> str:
  """The first few offending keys with shapes, on one line."""
  items = [f"missing {k} {tuple(expected[k])}" for k in sorted(expected) if k not in state_dict]
  items += [f"unexpected {k} {_shape(v)}" for k, v in sorted(state_dict.items())
            if k not in expected or not _is_tensor(v)]
  items += [f"{k} is {_shape(v)}, expected {tuple(expected[k])}"
            for k, v in sorted(state_dict.items())
            if k in expected and _is_tensor(v) and _shape(v) != tuple(expected[k])]
  more = f" (+{len(items) - count} more)" if len(items) > count else ""
  return ", ".join(items[:count]) + more


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


def file_options(sd: dict, naming: str, no_embed_class: bool) -> dict:
  """The timm options a refined-named state dict shows by its keys and shapes."""
  opts = {}
  if "reg_token" in sd:
    opts["reg_tokens"] = _shape(sd["reg_token"])[1]
  if "cls_tokens.tokens" not in sd:  # I-JEPA, timm class_token=False: mean-pooled (timm's rule)
    opts.update(class_token=False, global_pool="avg")
  if "blocks.0.ls1.gamma" in sd:
    opts["init_values"] = 1e-5  # only the init of a new model; loaded gammas replace it
  if "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.qkv.bias" not in sd:
    opts["qkv_bias"] = False
  fc_norm = "fc_norm.weight" in sd
  if fc_norm != (opts.get("global_pool") == "avg"):  # timm's default fc_norm=None decides
    opts["fc_norm"] = fc_norm
  if no_embed_class and naming in ("timm", "dinov2"):
    opts["no_embed_class"] = True
  return opts


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
  refuse_unsupported(sd)
  for key in ("patch_embed.proj.weight", "pos_embed.embed"):
    if key not in sd or not _is_tensor(sd[key]):
      raise ValueError(f"not a ViT state dict: no {key} (naming {naming}); keys start with "
                       f"{sorted(sd)[:8]}")
  has_cls = "cls_tokens.tokens" in sd
  (sd["pos_embed.embed"], cls_token, reg_token, pos_notes, no_embed_class) = pos_table_to_grid(
      sd["pos_embed.embed"], sd.get("cls_tokens.tokens"), reg_token=sd.get("reg_token"))
  if has_cls:
    sd["cls_tokens.tokens"] = cls_token
  if reg_token is not None:
    sd["reg_token"] = reg_token
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
  has_norm = "norm.weight" in sd or "fc_norm.weight" in sd
  has_embed_norm = "embed_norm.weight" in sd
  file_prenorm = has_norm if has_norm != has_embed_norm else None  # None: both or neither
  wanted = resolve_prenorm(family, prenorm)
  if wanted is None and file_prenorm is None:
    raise ValueError("cannot tell pre-norm from post-norm: the file has "
                     + ("both norm.* and embed_norm.*" if has_norm else
                        "neither norm.* (pre-norm final LayerNorm) nor embed_norm.* (data2vec 2.0)")
                     + "; pass family='prenorm' or 'postnorm'")
  is_prenorm = wanted if wanted is not None else file_prenorm
  heads, heads_source = _infer_num_heads(width, depth, size, num_heads, ctor_kwargs)
  vit_kwargs = normalize_vit_kwargs(dict(
      patch_size=p, width=width, depth=depth, num_heads=heads, mlp_ratio=float(mlp_ratio),
      prenorm=bool(is_prenorm), pos_grid=gh, **file_options(sd, naming, no_embed_class)))
  if size and any(vit_kwargs[k] != v for k, v in SIZES[size].items()):
    raise ValueError(f"size={size!r} ({SIZES[size]}) does not match the file: width {width}, "
                     f"depth {depth}")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by num_heads {heads}")

  expected = expected_shapes(vit_kwargs)
  report = mismatch_report(sd, expected)
  if report:
    family_name = "pre-norm (MAE family)" if is_prenorm else "post-norm (data2vec 2.0)"
    how = "as overridden" if wanted is not None else "as detected"
    raise ArchitectureMismatch(
        f"the state dict does not fit a {family_name} ViT {how} (width {width}, depth {depth}, "
        f"patch {p}, grid {gh}; naming {naming}): {mismatch_summary(sd, expected)}; {FIT_FIX}"
        f"\n{report}")

  variables = {}
  for name, path, hook in table_of(vit_kwargs):
    _set(variables, path, HOOKS[hook][0](as_float32(sd[name], name)))
  info = dict(naming=naming, family="prenorm" if is_prenorm else "postnorm",
              size=size_name(vit_kwargs), patch_size=p, num_heads_from=heads_source,
              dropped_keys=dropped, notes=notes)
  return variables, vit_kwargs, info


# ----------------------------------------------------------------------------- flax -> torch
LAYOUTS = ("refined", "timm", "dinov2", "ijepa", "safetensors")


def check_variables(variables: dict, vit_kwargs: dict) -> None:
  """Raises ValueError unless `variables` has exactly the paths and shapes of ViT(**vit_kwargs).

  Shapes only: nothing is copied (the hooks run on zero-strided placeholders).
  """
  vit_kwargs = normalize_vit_kwargs(vit_kwargs)
  table = table_of(vit_kwargs)
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


def layout_refusal(layout: str, vit_kwargs: dict) -> str | None:
  """Why `layout` cannot hold this ViT (None if it can)."""
  o, prenorm = options(vit_kwargs), vit_kwargs["prenorm"]
  if layout in ("timm", "dinov2", "ijepa") and not prenorm:
    return ("a post-norm (data2vec 2.0) ViT cannot be written as a timm / DINOv2 / I-JEPA "
            "VisionTransformer: it has a LayerNorm on all tokens before block 0 (embed_norm), "
            "post-norm blocks (LN(x + f(x)) instead of x + f(LN x)) and no final norm, none of "
            "which timm's VisionTransformer can express (section 3.4). Use layout='refined' or "
            "'safetensors'.")
  lacks = {
      # The official PrenormVit / PostnormVit (hub) have one CLS token, no registers, no
      # LayerScale, a qkv bias and a final norm on all tokens (refiner_facts.md 3.6).
      "refined": [k for k in ("reg_tokens", "class_token", "init_values", "qkv_bias")
                  if o[k] != OPTION_DEFAULTS[k]] + (["fc_norm"] if use_fc_norm(o) else []),
      # DINOv2's DinoVisionTransformer: always a CLS token (with a position row), a qkv bias and
      # a final norm.
      "dinov2": [k for k in ("class_token", "qkv_bias") if o[k] != OPTION_DEFAULTS[k]]
                + (["fc_norm"] if use_fc_norm(o) else []),
      # I-JEPA's VisionTransformer: no prefix tokens, no LayerScale, qkv bias, norm on all tokens.
      "ijepa": ([] if not o["class_token"] else ["class_token"])
               + [k for k in ("reg_tokens", "init_values", "qkv_bias")
                  if o[k] != OPTION_DEFAULTS[k]] + (["fc_norm"] if use_fc_norm(o) else []),
  }.get(layout, [])
  if lacks:
    shown = ", ".join(f"{k}={o[k]}" if k != "fc_norm" else "fc_norm=True" for k in lacks)
    return (f"the {layout} layout cannot express this ViT's {shown}; write layout='timm' "
            "(timm VisionTransformer with the same options) or 'safetensors' (any option)")
  return None


def to_torch_state_dict(variables: dict, vit_kwargs: dict, layout: str = "refined") -> dict:
  """Flat {torch name: contiguous float32 numpy array} in `layout`.

  "refined": the official MIM-Refiner .th naming (section 3.6), both families, default options
  only; "safetensors" uses the same naming and holds any option (timm names for them).
  "timm": a timm `VisionTransformer(num_classes=0, <same options>)` state dict (pre-norm only):
  `cls_token`, `reg_token`, `pos_embed` (1, [n_prefix +] g*g, D) with zero prefix rows unless
  `no_embed_class` (section 3.4). "dinov2": a DINOv2 hub file (`register_tokens`, a zero
  `mask_token`, a zero CLS position row). "ijepa": one I-JEPA encoder's state dict (no prefix
  tokens); checkpoints.save_torch adds the `module.` prefixes and containers.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  vit_kwargs = normalize_vit_kwargs(vit_kwargs)
  refusal = layout_refusal(layout, vit_kwargs)
  if refusal:
    raise ValueError(refusal)
  check_variables(variables, vit_kwargs)
  sd = {}
  for name, path, hook in table_of(vit_kwargs):
    value = HOOKS[hook][1](np.asarray(_get(variables, path), np.float32))
    sd[name] = np.ascontiguousarray(value)
  if layout in ("timm", "dinov2", "ijepa"):
    o = options(vit_kwargs)
    pos = sd.pop("pos_embed.embed")
    d = pos.shape[-1]
    rows = {"timm": 0 if o["no_embed_class"] else int(o["class_token"]) + o["reg_tokens"],
            "dinov2": 1, "ijepa": 0}[layout]
    sd["pos_embed"] = np.concatenate([np.zeros((1, rows, d), np.float32),
                                      pos.reshape(1, -1, d)], 1)
    if o["class_token"]:
      sd["cls_token"] = sd.pop("cls_tokens.tokens")
    if layout == "dinov2":
      if o["reg_tokens"]:
        sd["register_tokens"] = sd.pop("reg_token")
      sd["mask_token"] = np.zeros((1, d), np.float32)  # iBOT's; unused by the encoder
  return sd


def ctor_kwargs(vit_kwargs: dict) -> dict:
  """Constructor kwargs of the official `PrenormVit` / `PostnormVit` (hub/*.py)."""
  side = vit_kwargs["pos_grid"] * vit_kwargs["patch_size"]
  return dict(patch_size=vit_kwargs["patch_size"], dim=vit_kwargs["width"],
              depth=vit_kwargs["depth"], num_heads=vit_kwargs["num_heads"],
              mlp_hidden_dim=int(vit_kwargs.get("mlp_ratio", 4.0) * vit_kwargs["width"]),
              input_shape=(3, side, side), eps=1e-6)
