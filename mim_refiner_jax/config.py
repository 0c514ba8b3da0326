"""Config helpers: typed `get_config` arguments, head specs, durations, validation.

Config files live in `configs/` and define `get_config(arg: str | None) -> ConfigDict` in the manner
of big_vision: `configs/mae_l16.py:stage=3,batch_size=512` passes `stage=3,batch_size=512` as `arg`.
"""

import dataclasses
import re
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"k1=v1,k2=v2"` into a ConfigDict, typed like `defaults`; unknown keys are errors."""
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value (in {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        result[key] = value.lower() in ("true", "1")
      else:
        result[key] = kind(value)
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r} is not a valid {kind.__name__}") from e
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
    raise ValueError(f"head name {name!r} does not look like nnclr_temp<digits>_<cls|avg>[block],"
                     " e.g. nnclr_temp02_cls22 (block 22, temperature 0.2)")
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
    raise ValueError(f"global batch size {global_batch_size} is larger than the dataset "
                     f"({num_examples} examples): lower config.batch_size")
  return steps


def to_steps(config: Any, name: str, steps_per_ep: int, default: Any = None) -> int | None:
  """Reads a duration given as `{name}_steps` or `{name}_epochs` (big_vision's `steps()`)."""
  steps = config.get(f"{name}_steps")
  epochs = config.get(f"{name}_epochs")
  if steps is not None and epochs is not None:
    raise ValueError(f"set only one of config.{name}_steps and config.{name}_epochs")
  if steps is not None:
    return int(steps)
  if epochs is not None:
    return int(round(epochs * steps_per_ep))
  return default
