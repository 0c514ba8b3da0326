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
  pooling: str = "cls"  # "cls" or "mean" (mean of the patch tokens; CrossMAE's "avg")


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
                  "cls" if pool == "cls" else "mean")


def head_names(temperature: str, blocks) -> list[str]:
  """`head_names("02", ["", 22, 21])` -> nnclr_temp02_cls, nnclr_temp02_cls22, ..."""
  return [f"nnclr_temp{temperature}_cls{b}" for b in blocks]


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
