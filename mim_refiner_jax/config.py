"""Config helpers: typed `get_config` arguments, head specs, durations, command-line errors.

Config files live in `configs/` and define `get_config(arg: str | None) -> ConfigDict` in the manner
of big_vision: `configs/mae_l16.py:stage=3,batch_size=512` passes `stage=3,batch_size=512` as `arg`.
`absl_flags_parser` turns ml_collections' and absl's parsing errors (a typo in a `--config.` field,
a wrong type, a missing config file) into one line naming the argument, exit status 2.
"""

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
from typing import Any

import ml_collections

from mim_refiner_jax.errors import UserError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"k1=v1,k2=v2"` into a ConfigDict, typed like `defaults`; unknown keys are errors."""
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise UserError(f"config argument {item!r} is not of the form key=value (in {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        result[key] = value.lower() in ("true", "1")
      else:
        result[key] = kind(value)
    except ValueError as e:
      raise UserError(f"config argument {key}={value!r} is not a valid {kind.__name__}") from e
  return result


# Head names follow the reference: nnclr_temp{T}_{pool}{block} (refiner_facts.md section 2).
_HEAD_NAME = re.compile(r"^nnclr_temp0(\d+)_(cls|avg)(\d*)$")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  name: str
  block: int | str  # block index (raw residual stream of blocks[i]) or "main" (main output)
  temperature: float
  # "cls", "patch_mean" (mean of the patch tokens: CrossMAE's "avg", the pooling of encoders
  # without CLS token) or "registers" (mean of the register tokens): models/vit.py POOLINGS.
  pooling: str = "cls"


def head_spec(name: str) -> HeadSpec:
  """Parses a reference head name, e.g. `nnclr_temp02_cls22` -> block 22, tau 0.2."""
  match = _HEAD_NAME.match(name)
  if not match:
    raise UserError(f"config.heads.names: head name {name!r} does not look like "
                    "nnclr_temp<digits>_<cls|avg>[block], e.g. nnclr_temp02_cls22 (block 22, "
                    "temperature 0.2)")
  digits, pool, block = match.groups()
  temperature = float("0." + digits)  # temp02 -> 0.2, temp0325 -> 0.325 (section 2)
  return HeadSpec(name, int(block) if block else "main", temperature,
                  "cls" if pool == "cls" else "patch_mean")


# config.heads.pooling names: the ViT's poolings, and the issue tracker's spelling of the mean.
HEAD_POOLINGS = {"cls": "cls", "patch_mean": "patch_mean", "mean_patch": "patch_mean",
                 "registers": "registers"}


def head_specs(names: str, pooling: str = "") -> list[HeadSpec]:
  """Head specs of `config.heads.names`; `pooling` ("" = each name's cls/avg; one pooling for
  every head; or one per head, comma-separated) replaces the names' pooling."""
  specs = [head_spec(n) for n in names.split(",")]
  if not pooling:
    return specs
  given = pooling.split(",")
  if len(given) not in (1, len(specs)):
    raise UserError(f"config.heads.pooling={pooling!r} has {len(given)} entries for "
                    f"{len(specs)} heads: give one pooling for all heads or one per head")
  unknown = [p for p in given if p not in HEAD_POOLINGS]
  if unknown:
    raise UserError(f"config.heads.pooling: unknown pooling {unknown[0]!r}; choose from "
                    f"{', '.join(HEAD_POOLINGS)}")
  given = given * len(specs) if len(given) == 1 else given
  return [dataclasses.replace(s, pooling=HEAD_POOLINGS[p]) for s, p in zip(specs, given)]


def head_names(temperature: str, blocks, pool: str = "cls") -> list[str]:
  """`head_names("02", ["", 22, 21])` -> nnclr_temp02_cls, nnclr_temp02_cls22, ...; pool "avg":
  the mean of the patch tokens (encoders without CLS token)."""
  return [f"nnclr_temp{temperature}_{pool}{b}" for b in blocks]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Updates per epoch with drop_last, as the reference's DistributedSampler (section 7)."""
  steps = num_examples // global_batch_size
  if steps < 1:
    raise UserError(f"config.batch_size={global_batch_size} is larger than the dataset "
                    f"({num_examples} examples): lower config.batch_size")
  return steps


def to_steps(config: Any, name: str, steps_per_ep: int, default: Any = None) -> int | None:
  """Reads a duration given as `{name}_steps` or `{name}_epochs` (big_vision's `steps()`)."""
  steps = config.get(f"{name}_steps")
  epochs = config.get(f"{name}_epochs")
  if steps is not None and epochs is not None:
    raise UserError(f"set only one of config.{name}_steps and config.{name}_epochs")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return int(round(epochs * steps_per_ep))
  return default


# ----------------------------------------------------------------------------------------------
# Command-line errors: one line naming the flag or field instead of absl/ml_collections tracebacks.
# ----------------------------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py:arg` -> `get_config("arg")`, as ml_collections' config flag loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found (--config={spec}); give the path of a "
                    "config file, e.g. --config=configs/mae_l16.py:stage=2")
  module_spec = importlib.util.spec_from_file_location("_mim_refiner_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(*([arg] if arg else []))
  except UserError as e:
    raise UserError(f"--config={spec}: {e}") from None


def _field_error(config, path: str, value: str | None) -> str | None:
  """Why `--config.<path>=<value>` cannot be applied to `config` (None if it can)."""
  node, walked = config, "config"
  parts = path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      rest = ".".join(parts[i:])
      hint = (" (a data source spec string; set the whole source, e.g. "
              f"--{walked}=image_folder:/data/train)" if isinstance(node, str) and ":" in node
              else "")
      return (f"--config.{path}: {walked} is a {type(node).__name__} ({node!r}){hint}, it has no "
              f"field {rest!r}")
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      hint = f"; did you mean {walked}.{close[0]}?" if close else f"; known: {sorted(node.keys())}"
      return f"--config.{path}: {walked} has no field {part!r}{hint}"
    node, walked = node[part], f"{walked}.{part}"
  if value is None:
    return None
  kind = type(node)
  try:
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    elif kind in (int, float):
      kind(value)
  except ValueError:
    return f"--config.{path}={value}: {walked} must be {'an' if kind is int else 'a'} " \
           f"{kind.__name__} (it is {node!r})"
  return None


def describe_command_line_error(argv: list[str], error: BaseException,
                                flag: str = "config") -> str:
  """One line saying which `--config` / `--config.<field>` argument is wrong and how to fix it."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is not None:
    try:
      config = load_config_file(spec)
    except UserError as e:
      return str(e)
    except Exception as e:  # pylint: disable=broad-except  # a broken config file: say which
      return f"--config={spec}: {type(e).__name__}: {e}"
    for arg in argv:
      match = re.match(rf"^--(?:no)?{flag}\.([^=]+)(?:=(.*))?$", arg)
      if match:
        message = _field_error(config, match.group(1), match.group(2))
        if message:
          return message
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else f"{type(error).__name__} while parsing the command line"


def absl_flags_parser(argv: list[str]) -> list[str]:
  """`absl.app.run(..., flags_parser=...)`: flags parsed, errors shortened, --help exits 0."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help / --helpfull print the usage, then exit 1
    if any(a.split("=")[0] in ("--help", "-help", "-?", "--helpshort", "--helpfull",
                               "--helpxml") for a in argv[1:]):
      sys.exit(0)
    raise e
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, KeyError, TypeError, ...
    if "--verbose" in argv:
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    errors.print_error(describe_command_line_error(argv, e))
    sys.exit(errors.USER_ERROR_EXIT_CODE)


# ----------------------------------------------------------------------------------------------
# Heads, queue and crop sizes against the model, before anything compiles (one line each).
# ----------------------------------------------------------------------------------------------


def crop_sizes_for_patch(patch_size: int) -> tuple[int, int]:
  """(global, local) view sides for a patch size: the multiples of it nearest 224 and 96, the
  reference maintainer's rule (ml-jku/MIM-Refiner issues #6, #7): 224/96 for patch 16 and 8,
  224/98 for patch 14."""
  return (max(1, round(224 / patch_size)) * patch_size,
          max(1, round(96 / patch_size)) * patch_size)


def resolve_crop_sizes(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with data.global_size / data.local_size = 0 derived from
  config.model.patch_size (the caller's config is untouched when nothing is derived)."""
  d, patch = config.data, config.model.get("patch_size", 0)
  if d.global_size and d.local_size:
    return config
  if not patch:
    raise UserError("config.data.global_size / local_size = 0 derive the crop sizes from the "
                    "patch size, but config.model.patch_size is 0 too: set the patch size "
                    "(e.g. --config.model.patch_size=14) or the crop sizes")
  config = ml_collections.ConfigDict(config.to_dict())
  global_size, local_size = crop_sizes_for_patch(patch)
  config.data.global_size = d.global_size or global_size
  config.data.local_size = d.local_size or local_size
  config.lock()
  return config


def check_queue(config) -> None:
  if config.queue.size < config.batch_size:
    raise UserError(f"config.queue.size={config.queue.size} is smaller than the global batch "
                    f"(config.batch_size={config.batch_size}): each step enqueues the whole batch;"
                    f" raise config.queue.size to at least {config.batch_size}")


def check_model_fit(config, vit_kwargs: dict) -> None:
  """Heads and crop sizes against the encoder the weights hold (one UserError line each)."""
  depth, patch = vit_kwargs["depth"], vit_kwargs["patch_size"]
  has_cls = vit_kwargs.get("class_token", True)
  from mim_refiner_jax.models.vit import OPTION_DEFAULTS  # pylint: disable=g-import-not-at-top
  for key, want in dict(config.model.get("vit_options", {})).items():
    if key not in OPTION_DEFAULTS:
      raise UserError(f"config.model.vit_options: unknown option {key!r}; known: "
                      f"{sorted(OPTION_DEFAULTS)}")
    have = vit_kwargs.get(key, OPTION_DEFAULTS[key])
    if key == "init_values":  # a file only shows whether LayerScale is there
      want, have = bool(want), bool(have)
    if key != "no_embed_class" and want != have:
      raise UserError(f"config.model.vit_options.{key}={want!r} but the weights have "
                      f"{key}={have!r}: fix config.model.vit_options (or remove the entry)")
  for spec in head_specs(config.heads.names, config.heads.get("pooling", "")):
    if spec.block != "main" and not 0 <= spec.block < depth:
      raise UserError(f"config.heads.names: head {spec.name} reads block {spec.block}, but the "
                      f"encoder has {depth} blocks (0..{depth - 1}): fix the head name")
    if spec.pooling == "cls" and not has_cls:
      raise UserError(f"config.heads: head {spec.name} pools the CLS token, but the encoder has "
                      "none (class_token=False, e.g. I-JEPA): set --config.heads.pooling="
                      "mean_patch (or nnclr_temp.._avg<block> head names)")
    if spec.pooling == "registers" and not vit_kwargs.get("reg_tokens", 0):
      raise UserError(f"config.heads: head {spec.name} pools register tokens, but the encoder "
                      "has none: choose cls or mean_patch")
  for field in ("global_size", "local_size"):
    size = config.data[field]
    if field == "local_size" and not config.data.num_local:
      continue
    if size % patch:
      below, above = size // patch * patch, (size // patch + 1) * patch
      raise UserError(f"config.data.{field}={size} is not a multiple of the patch size {patch}: "
                      f"use {below or above} or {above} (or 0 to derive it: "
                      f"{dict(zip(('global', 'local'), crop_sizes_for_patch(patch)))})")
