"""Data dependencies of collectives in a compiled HLO module: which ones marked ops wait for.

`jax.jit(f).lower(...).compile().as_text()` is the SPMD-partitioned program of one device. Each
instruction names its operands, the computations it calls (fusion bodies, while/cond bodies, async
wrappers) and carries `metadata={op_name="..."}` with the JAX name stack, so ops made under
`jax.named_scope("x")` have ".../x/..." in their op_name, also inside fusions. From this text:

  * the collectives (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute; the
    async `-start` half of a pair, or an `async-start` wrapping one), their bytes per device and
    their op_name;
  * `waited_for(module, marker, within)`: the collectives that some forward instruction tagged
    with `marker` (its own op_name or one inside the fusion it calls), made of ops of the scope
    `within` only, depends on, transitively, through operands: what a device must receive
    before it can compute the marked values. An op the marked values do not depend on can
    overlap with them (the scheduler may still place it first).

Used by tools/head_norm_collectives.py (models/heads.py marks the BatchNorm normalisation
"head_norm_apply" and its batch statistics "head_norm_stats").
"""

import dataclasses
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_CALLED_SET = re.compile(r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  type: str                # result type text, e.g. "f32[8,16]{1,0}" or "(f32[2], s32[])"
  operands: list[str]
  called: list[str]        # computations this instruction calls
  op_name: str


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at `text[start]`."""
  pairs = {"(": ")", "[": "]", "{": "}"}
  depth, i = [], start
  while i < len(text):
    c = text[i]
    if c in pairs:
      depth.append(pairs[c])
    elif depth and c == depth[-1]:
      depth.pop()
      if not depth:
        return i + 1
    i += 1
  return len(text)


def _split_top(text: str) -> list[str]:
  parts, depth, current = [], 0, ""
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += c
  if current.strip():
    parts.append(current)
  return parts


def _parse_instruction(line: str) -> Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  rest = rest.strip()
  # the result type: a tuple "( ... )" or one array token (layouts may hold "T(8,128)")
  end = 0
  while end < len(rest) and rest[end] != " ":
    end = _balanced(rest, end) if rest[end] in "({[" else end + 1
  type_text, rest = rest[:end], rest[end:].strip()
  opcode_match = re.match(r"([\w\-]+)\(", rest)
  if not opcode_match:
    return None
  opcode = opcode_match.group(1)
  close = _balanced(rest, len(opcode))
  operands = []
  for part in _split_top(rest[len(opcode) + 1:close - 1]):
    token = part.strip().split(" ")[-1] if part.strip() else ""
    if token.startswith("%") or re.fullmatch(r"[A-Za-z_][\w.\-]*", token or "0"):
      operands.append(token.lstrip("%"))
  attributes = rest[close:]
  called = _CALLED.findall(attributes)
  for group in _CALLED_SET.findall(attributes):
    called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
  op_name = _OP_NAME.search(attributes)
  return Instruction(name, opcode, type_text, operands, called, op_name.group(1) if op_name else "")


def parse(hlo_text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
  """`({computation: {instruction name: Instruction}}, entry computation name)`."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and not line.lstrip().startswith(("HloModule", "//")):
        current = header.group(2)
        computations[current] = {}
        if header.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instruction = _parse_instruction(line)
    if instruction is not None:
      computations[current][instruction.name] = instruction
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def type_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    size = 1
    for d in dims.split(","):
      size *= int(d) if d else 1
    total += size * DTYPE_BYTES.get(dtype, 0)
  return total


def collective_kind(instruction: Instruction, computations) -> str | None:
  """The collective an instruction issues ("all-reduce", ...), else None. The `-done` half of an
  async pair is not counted (its `-start` is)."""
  op = instruction.opcode
  for kind in COLLECTIVES:
    if op in (kind, kind + "-start"):
      return kind
  if op == "async-start":
    for callee in instruction.called:
      for inner in computations.get(callee, {}).values():
        kind = collective_kind(inner, computations)
        if kind:
          return kind
  return None


def _op_names(instruction: Instruction, computations, seen=None) -> list[str]:
  """The op_names of the instruction and of every instruction in the computations it calls."""
  names = [instruction.op_name] if instruction.op_name else []
  seen = set() if seen is None else seen
  for callee in instruction.called:
    if callee not in seen:
      seen.add(callee)
      for inner in computations.get(callee, {}).values():
        names += _op_names(inner, computations, seen)
  return names


def _forward_tagged(instruction: Instruction, computations, marker: str, within: str) -> bool:
  """A forward instruction computing a marked value: some op in it (or in its fusion body) has
  `marker` in its op_name, every op is inside the scope `within` ("" = anywhere) and none is a
  backward op (JAX names those "transpose(...)"). XLA copies cheap ops into their consumers'
  fusions (the last normalisation into the loss's, forward ops into backward fusions); those
  fusions compute the consumers' values, which wait for what the consumers need."""
  names = [n for n in _op_names(instruction, computations) if "/" in n]  # JAX's, not XLA's
  return (any(marker in n for n in names) and not any("transpose(" in n for n in names)
          and all(within in n for n in names))


@dataclasses.dataclass
class Collective:
  computation: str
  name: str
  kind: str
  bytes: int
  op_name: str


def collectives(computations) -> list[Collective]:
  """Every collective of the module with its bytes per device (the result's; for an async start
  whose result is a tuple (operand, result, ...), the largest element)."""
  found = []
  for comp, instructions in computations.items():
    for ins in instructions.values():
      kind = collective_kind(ins, computations)
      if kind is None:
        continue
      if ins.type.startswith("(") and ins.opcode.endswith("-start"):
        size = max((type_bytes(t) for t in _split_top(ins.type[1:-1])), default=0)
      else:
        size = type_bytes(ins.type)
      found.append(Collective(comp, ins.name, kind, size, ins.op_name))
  return found


def waited_for(computations, marker: str, within: str = "") -> tuple[list[Collective], int]:
  """`(collectives that marked forward instructions depend on, number of marked instructions)`.

  Walks operands back from every instruction tagged `marker` within its computation; an operand
  that calls computations (while, call, conditional) counts with every collective inside them.
  """
  everything = {(c.computation, c.name): c for c in collectives(computations)}
  inner = {}  # computation -> collectives inside it, transitively

  def inside(comp, stack=()):
    if comp not in inner:
      found = []
      for ins in computations.get(comp, {}).values():
        if (comp, ins.name) in everything:
          found.append(everything[(comp, ins.name)])
        for callee in ins.called:
          if callee not in stack:
            found += inside(callee, stack + (comp,))
      inner[comp] = found
    return inner[comp]

  fusion_bodies = {callee for instructions in computations.values()
                   for i in instructions.values() if i.opcode in ("fusion", "async-start")
                   for callee in i.called}
  waited, marked = {}, 0
  for comp, instructions in computations.items():
    if comp in fusion_bodies:
      continue  # reached through the fusion instruction that calls it
    tagged = [i for i in instructions.values() if _forward_tagged(i, computations, marker, within)]
    if not tagged:
      continue
    marked += len(tagged)
    stack, seen = [t.name for t in tagged], set()
    while stack:
      name = stack.pop()
      if name in seen or name not in instructions:
        continue
      seen.add(name)
      ins = instructions[name]
      if (comp, name) in everything:
        waited[(comp, name)] = everything[(comp, name)]
      for callee in ins.called:
        if callee not in fusion_bodies or ins.opcode == "async-start":
          for c in inside(callee):
            waited[(c.computation, c.name)] = c
      stack += ins.operands
  return list(waited.values()), marked
