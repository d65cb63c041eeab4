"""A roofline estimate of one step's time from its compiled program, per device.

XLA's `cost_analysis()` counts a while-loop body once, and scanned layers (one
body run 32 times) and gradient accumulation (a scan over micro-batches) are
while loops, so its FLOPs are far below what a step executes. This module reads
the optimised HLO text (`compiled.as_text()`) instead:

* every computation gets an execution multiplier: the product of the trip counts
  of the while loops around it (a loop body runs `n` times per run of its caller,
  its condition `n + 1` times; fusions, calls, async wrappers and conditional
  branches run as often as their caller; reducers are not counted). A trip count
  comes from the `known_trip_count` the CPU compiler writes on a `while`, else from
  the loop's induction variable (start constant, step constant, compared with a
  constant in the condition: the TPU compiler of jax 0.10 / libtpu 0.0.42 writes
  no `known_trip_count`). A loop whose count is found neither way counts once
  and is listed as unknown.
* FLOPs (measured from the program): 2 x output elements x contracted elements of
  every `dot` and `convolution` (the TPU compiler writes matmuls as convolutions),
  fused or not, times its multiplier. Elementwise and transcendental work is left
  out: it runs on the vector units, not the matrix units the peak describes. So is
  the work inside custom calls (a Pallas kernel such as flash attention): XLA's
  cost analysis does not see it either.
* HBM bytes (an estimate): bytes read and written by each instruction outside
  fused computations (a fusion's inside stays on chip), times its multiplier. A
  slice of a stacked array reads the slice, a dynamic-update-slice writes the
  update in place, and arrays the compiler placed in another memory space
  (`S(1)` in a TPU layout: on-chip VMEM) are not HBM traffic. Caches, re-reads
  inside a fusion and the compiler's tiling are not modelled.
* collective bytes per device (an estimate): for each collective of result size R
  over groups of n devices, what a ring moves through each device: all-gather and
  all-to-all R(n-1)/n, reduce-scatter R(n-1), all-reduce 2R(n-1)/n,
  collective-permute R; times its multiplier. Collectives between slices
  (`--num-slices`) cross the far slower data-center network; they are timed at
  ICI speed here all the same.

Each total over the chip's published peak (`ChipPeaks`) is a time; the step can
take no less than the largest of the three (`Roofline.seconds`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from alm_jax import aot

# The HLO text conventions `aot` already reads: computation headers, element sizes, TPU generation names.
_COMPUTATION = aot._COMPUTATION  # pylint: disable=protected-access
_DTYPE_BYTES = aot._DTYPE_BYTES  # pylint: disable=protected-access
_TPU_FAMILIES = aot._TPU_FAMILIES  # pylint: disable=protected-access

# ----------------------------------------------------------------------------
# Published peaks per chip.


@dataclasses.dataclass(frozen=True)
class ChipPeaks:
  """One chip's published peaks: dense bf16 FLOP/s, HBM bytes/s and ICI bytes/s.

  `ici_bytes_per_s` is one direction over all of the chip's links together (half the "bidirectional"
  figure Google now publishes, equal to its older "Gbps" figure / 8): the most a collective can move
  through one chip per second, so collective times from it are lower bounds.
  """

  name: str
  flops_per_s: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  source: str = ""


_CLOUD_TPU_DOCS = "https://cloud.google.com/tpu/docs/"

# Keyed by generation as `alm-jax compile --topology` names it (`aot.parse_topology`).
CHIP_PEAKS: dict[str, ChipPeaks] = {
    # 459 TFLOP/s bf16, 2765 GB/s HBM2e, bidirectional ICI 1200 GB/s per chip (= 4800 Gbps one way).
    "v5p": ChipPeaks("v5p", 459e12, 2765e9, 600e9, _CLOUD_TPU_DOCS + "v5p"),
    # 197 TFLOP/s bf16, 819 GB/s HBM2, bidirectional ICI 400 GB/s per chip (= 1600 Gbps one way).
    "v5e": ChipPeaks("v5e", 197e12, 819e9, 200e9, _CLOUD_TPU_DOCS + "v5e"),
    # 918 TFLOP/s bf16, 1638 GB/s HBM, bidirectional ICI 800 GB/s per chip (the launch page said 3584 Gbps).
    "v6e": ChipPeaks("v6e", 918e12, 1638e9, 400e9, _CLOUD_TPU_DOCS + "v6e"),
    # 275 TFLOP/s bf16, 1200 GB/s HBM2 (Google's v4 table); ICI is not in that table: assumed 6 links x
    # 400 Gbps per direction, as the TPU v4 paper (arXiv:2304.01433) describes the links.
    "v4": ChipPeaks("v4", 275e12, 1200e9, 300e9, _CLOUD_TPU_DOCS + "v4; ICI assumed from arXiv:2304.01433"),
}

# `jax.Device.device_kind` of each generation's chips, as libtpu's topology descriptions report them.
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5e", "tpu v5e": "v5e",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def chip_peaks(target: str) -> ChipPeaks | None:
  """The peaks of a TPU generation named as a topology (`v5p:4x4x4`, `v5p-128`, `v5e`, `v5litepod-16`) or a
  device kind (`TPU v5 lite`); None for anything else (CPU, GPU models)."""
  lowered = target.strip().lower()
  if lowered in _DEVICE_KINDS:
    return CHIP_PEAKS[_DEVICE_KINDS[lowered]]
  family = _TPU_FAMILIES.get(re.split(r"[:=\-]", lowered, maxsplit=1)[0])
  return CHIP_PEAKS.get(family[0]) if family else None


# ----------------------------------------------------------------------------
# The program as computations of instructions.


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: `%name = shape opcode(operands), attributes`."""

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  operand_text: str  # what is between the parentheses (a constant's literal)
  attributes: str


@dataclasses.dataclass
class Computation:
  """One HLO computation: its instructions in order, by name, and its root."""

  name: str
  instructions: list[Instruction]
  root: Instruction | None = None

  def __post_init__(self) -> None:
    self.by_name = {inst.name: inst for inst in self.instructions}
    self.users: dict[str, list[Instruction]] = {}
    for inst in self.instructions:
      for operand in inst.operands:
        self.users.setdefault(operand, []).append(inst)
    self.parameters = {int(i.operand_text): i for i in self.instructions
                       if i.opcode == "parameter" and i.operand_text.isdigit()}

  def parameter(self, index: int) -> Instruction | None:
    """The instruction `parameter(index)`."""
    return self.parameters.get(index)


@dataclasses.dataclass
class Module:
  """The computations of one optimised HLO module and the name of its entry."""

  computations: dict[str, Computation]
  entry: str


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")


def _split_operands(rest: str) -> tuple[str, str]:
  """`a, b), attrs` -> (`a, b`, `attrs`): the operand list up to its closing parenthesis, and what follows."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return rest[:i], rest[i + 1:].lstrip(", ")
  return rest, ""


def parse_instruction(line: str) -> tuple[Instruction, bool] | None:
  """The instruction on one line of HLO text and whether it is its computation's ROOT (None if none)."""
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  root, name, shape, opcode, rest = m.groups()
  operand_text, attributes = _split_operands(rest)
  operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
  return Instruction(name, shape, opcode, operands, operand_text.strip(), attributes), bool(root)


def parse_module(hlo_text: str) -> Module:
  """Splits optimised HLO text into computations (headers as `aot` reads them)."""
  computations: dict[str, Computation] = {}
  entry, name, body, root = "", None, [], None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name, body, root = header.group(1), [], None
      entry = name if line.startswith("ENTRY") else entry
      continue
    if name is None:
      continue
    if line.rstrip() == "}":  # not `}}, metadata=...`: a custom call's multi-line backend config (splash)
      computations[name] = Computation(name, body, root)
      name = None
      continue
    parsed = parse_instruction(line)
    if parsed:
      body.append(parsed[0])
      root = parsed[0] if parsed[1] else root
  return Module(computations, entry)


_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")  # `aot._SHAPE` with the layout


def arrays(shape_text: str) -> list[tuple[int, int]]:
  """(bytes, memory space) of each array in an HLO shape such as `(f32[8,128]{1,0}, bf16[4]{0:S(1)})`."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      space = re.search(r"S\((\d+)\)", layout or "")
      out.append((_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d),
                  int(space.group(1)) if space else 0))
  return out


def hbm_bytes_of(shape_text: str) -> int:
  """Bytes of the arrays in `shape_text` that live in device memory (memory space 0)."""
  return sum(size for size, space in arrays(shape_text) if space == 0)


def dims_of(shape_text: str) -> tuple[int, ...]:
  """Dimensions of the first array in a shape string."""
  m = _ARRAY.search(shape_text)
  return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


# ----------------------------------------------------------------------------
# Loops and how often each computation runs.


@dataclasses.dataclass(frozen=True)
class Loop:
  """One while loop: where it is, its trip count (None: unknown, counted once) and how that was found."""

  name: str
  computation: str
  body: str
  trip_count: int | None
  source: str  # "known_trip_count", "induction variable" or "unknown"
  op_name: str = ""


def _called(inst: Instruction, name: str) -> list[str]:
  """Computations an attribute such as `body=%b` or `branch_computations={%a, %b}` names."""
  m = re.search(rf"\b{name}=(\{{[^}}]*\}}|%?[\w.\-]+)", inst.attributes)
  return re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []


def _callees(inst: Instruction) -> list[tuple[str, bool]]:
  """(computation, fused?) for each computation `inst` runs once per execution, other than loop bodies.

  Reducers (`to_apply` of reduce, scatter, sort, all-reduce...) are applied per element and hold no
  dots; they are left out. A conditional's branches all count, as if each were taken.
  """
  if inst.opcode == "fusion":
    return [(c, True) for c in _called(inst, "calls")]
  if inst.opcode == "call":
    return [(c, False) for c in _called(inst, "to_apply")]
  if inst.opcode == "conditional":
    names = _called(inst, "branch_computations") or _called(inst, "true_computation") + _called(
        inst, "false_computation")
    return [(c, False) for c in names]
  if inst.opcode in ("async-start", "custom-call"):
    return [(c, False) for c in _called(inst, "calls") + _called(inst, "called_computations")]
  return []


def _scalar(comp: Computation, name: str, depth: int = 0) -> tuple[str, int] | None:
  """What a scalar is, looking through copies: ("const", value), or ("index", i) for element i of the
  computation's tuple parameter (a loop's state); None for anything else."""
  inst = comp.by_name.get(name)
  if inst is None or depth > 16:
    return None
  if inst.opcode == "constant" and dims_of(inst.shape) == ():
    m = re.fullmatch(r"-?\d+", inst.operand_text)
    return ("const", int(inst.operand_text)) if m else None
  if inst.opcode in ("copy", "bitcast", "convert", "reshape") and inst.operands:
    return _scalar(comp, inst.operands[0], depth + 1)
  if inst.opcode == "get-tuple-element" and inst.operands:
    source = comp.by_name.get(inst.operands[0])
    index = re.search(r"\bindex=(\d+)", inst.attributes)
    if source is not None and source.opcode == "parameter" and index:
      return ("index", int(index.group(1)))
  return None


def _binary(module: Module, comp: Computation, inst: Instruction, opcode: str) -> tuple[
    Computation, Instruction, list[str]] | None:
  """`inst` as a binary `opcode` (directly, or a fusion wrapping one): (computation, op, operands in `comp`)."""
  if inst.opcode == opcode:
    return comp, inst, list(inst.operands)
  if inst.opcode != "fusion":
    return None
  called = module.computations.get(next(iter(_called(inst, "calls")), ""))
  if called is None or called.root is None or called.root.opcode != opcode:
    return None
  index = {param.name: i for i, param in called.parameters.items()}
  mapped = [inst.operands[index[n]] if index.get(n, len(inst.operands)) < len(inst.operands) else ""
            for n in called.root.operands]
  return called, called.root, mapped


def _induction_trip_count(module: Module, caller: Computation, loop: Instruction) -> int | None:
  """Trip count from the loop's induction variable: `i = start; while i <op> N: i += step`, all constants."""
  condition = module.computations.get(next(iter(_called(loop, "condition")), ""))
  body = module.computations.get(next(iter(_called(loop, "body")), ""))
  init = caller.by_name.get(loop.operands[0]) if loop.operands else None
  if condition is None or condition.root is None or body is None or body.root is None or init is None:
    return None
  compare = _binary(module, condition, condition.root, "compare")
  direction = re.search(r"direction=(\w+)", compare[1].attributes) if compare else None
  if not compare or not direction or len(compare[2]) != 2:
    return None
  lhs, rhs = (_scalar(condition, n) for n in compare[2])
  flip = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE", "EQ": "EQ"}
  op = direction.group(1)
  if lhs and rhs and lhs[0] == "const" and rhs[0] == "index":
    lhs, rhs, op = rhs, lhs, flip[op]
  if not (lhs and rhs and lhs[0] == "index" and rhs[0] == "const"):
    return None
  index, limit = lhs[1], rhs[1]
  if init.opcode != "tuple" or body.root.opcode != "tuple" or index >= min(len(init.operands), len(body.root.operands)):
    return None
  start = _scalar(caller, init.operands[index])
  update = body.by_name.get(body.root.operands[index])
  add = _binary(module, body, update, "add") if update is not None else None
  if not start or start[0] != "const" or not add:
    return None
  terms = [_scalar(body, n) for n in add[2]]
  steps = [t[1] for t in terms if t and t[0] == "const"]
  if len(steps) != 1 or ("index", index) not in terms:
    return None
  return _count(start[1], steps[0], limit, op)


def _count(start: int, step: int, limit: int, op: str) -> int | None:
  """Iterations of `i = start; while i <op> limit: i += step` (None when it would not end)."""
  if step > 0 and op in ("LT", "LE"):
    return max(0, (limit - start + (op == "LE") + step - 1) // step)
  if step < 0 and op in ("GT", "GE"):
    return max(0, (start - limit + (op == "GE") - step - 1) // -step)
  if op == "NE" and step and (limit - start) % step == 0 and (limit - start) // step >= 0:
    return (limit - start) // step
  return None


def trip_count(module: Module, caller: Computation, loop: Instruction) -> tuple[int | None, str]:
  """A while loop's trip count and its source: the compiler's `known_trip_count`, else the induction variable."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  if known:
    return int(known.group(1)), "known_trip_count"
  count = _induction_trip_count(module, caller, loop)
  return (count, "induction variable") if count is not None else (None, "unknown")


Edges = dict[str, list[tuple[str, float, bool]]]  # caller -> (callee, runs per caller run, fused?)


def call_graph(module: Module) -> tuple[Edges, list[Loop]]:
  """Which computations each computation runs, how often per run of it, and whether fused; and every
  while loop in the module (reachable or not)."""
  edges: Edges = {}
  loops = []
  for comp in module.computations.values():
    out = edges.setdefault(comp.name, [])
    for inst in comp.instructions:
      if inst.opcode == "while":
        n, source = trip_count(module, comp, inst)
        name = re.search(r'op_name="([^"]*)"', inst.attributes)
        bodies = _called(inst, "body")
        loops.append(Loop(inst.name, comp.name, bodies[0] if bodies else "", n, source, name.group(1) if name else ""))
        out += [(b, float(n if n is not None else 1), False) for b in bodies]
        out += [(c, float(n + 1 if n is not None else 1), False) for c in _called(inst, "condition")]
      else:
        out += [(c, 1.0, fused) for c, fused in _callees(inst)]
  return edges, loops


def multipliers(module: Module, root: str | None = None) -> tuple[dict[str, float], set[str], list[Loop]]:
  """How many times each computation runs per run of `root` (default: the entry, i.e. per run of the
  program), which computations are fusion bodies, and the while loops inside `root`'s subtree.
  Computations `root` never reaches (reducers, everything outside a subtree) are absent.

  `root` may be any computation, e.g. a loop body (`Loop.body`): the counts are then per iteration.
  """
  root = root or module.entry
  if root not in module.computations:
    raise KeyError(f"no computation named {root!r} in the module")
  edges, loops = call_graph(module)
  order = _callers_first(root, edges)
  counts: dict[str, float] = {root: 1.0}
  fused: set[str] = set()
  for name in order:
    for callee, factor, is_fused in edges.get(name, []):
      counts[callee] = counts.get(callee, 0.0) + counts.get(name, 0.0) * factor
      if is_fused:
        fused.add(callee)
  return counts, fused, [loop for loop in loops if loop.computation in counts]


def reachable(edges: Edges, start: str) -> set[str]:
  """The computations `start` runs, directly or through others (itself included)."""
  seen, stack = {start}, [start]
  while stack:
    for callee, _, _ in edges.get(stack.pop(), []):
      if callee not in seen:
        seen.add(callee)
        stack.append(callee)
  return seen


class LoopNotFound(ValueError):
  """No single loop answers the question (none, or several candidates): the message lists what was found."""


def outermost_unknown_loop(module: Module) -> Loop:
  """The one while loop, reachable from the entry, whose trip count is unknown and which no other such
  loop contains: a generation program's decode loop (`step < max_new & ~all(done)` is data-dependent,
  while the layer scans inside it have constant counts). Raises `LoopNotFound` when there is none, or
  more than one (the message names them), rather than guess.
  """
  edges, _ = call_graph(module)
  _, _, loops = multipliers(module)
  unknown = [loop for loop in loops if loop.trip_count is None]
  inside = {loop.name: reachable(edges, loop.body) for loop in unknown}
  outer = [loop for loop in unknown
           if not any(other is not loop and loop.computation in inside[other.name] for other in unknown)]
  if len(outer) == 1:
    return outer[0]
  described = "; ".join(f"{loop.name} in {loop.computation} ({loop.op_name or 'no op_name'})" for loop in outer)
  if not outer:
    known = ", ".join(f"{loop.name}: {loop.trip_count}" for loop in loops) or "none"
    raise LoopNotFound(f"no while loop with an unknown (data-dependent) trip count; loops found: {known}")
  raise LoopNotFound(f"{len(outer)} outermost loops with unknown trip counts, cannot tell which decodes: {described}")


def _callers_first(entry: str, edges: Edges) -> list[str]:
  """The computations reachable from `entry`, each after every computation that calls it."""
  below = reachable(edges, entry)
  pending = {name: 0 for name in below}
  for name in below:
    for callee, _, _ in edges.get(name, []):
      if callee in pending:
        pending[callee] += 1
  order, ready = [], [entry]
  while ready:
    name = ready.pop()
    order.append(name)
    for callee, _, _ in edges.get(name, []):
      pending[callee] -= 1
      if pending[callee] == 0:
        ready.append(callee)
  return order


# ----------------------------------------------------------------------------
# FLOPs and HBM bytes.


def instruction_flops(comp: Computation, inst: Instruction) -> float:
  """2 x output elements x contracted elements of a `dot` or `convolution` (0 for anything else)."""
  if inst.opcode not in ("dot", "convolution") or len(inst.operands) < 2:
    return 0.0
  lhs, rhs = (comp.by_name.get(n) for n in inst.operands[:2])
  if lhs is None or rhs is None:
    return 0.0
  if inst.opcode == "convolution":
    return convolution_flops(inst, dims_of(lhs.shape), dims_of(rhs.shape))
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
  lhs_dims = dims_of(lhs.shape)
  axes = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
  return 2.0 * math.prod(dims_of(inst.shape)) * math.prod(lhs_dims[a] for a in axes if a < len(lhs_dims))


def convolution_flops(inst: Instruction, lhs: tuple[int, ...], kernel: tuple[int, ...]) -> float:
  """2 x (output elements / output positions) x input features per group x the (output position, kernel tap)
  pairs that land on input data, not on padding or the zeros of an lhs dilation: XLA's count. The
  TPU compiler writes matmuls as window-less convolutions (`dim_labels=bf_io->bf`)."""
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", inst.attributes)
  out = dims_of(inst.shape)
  if not labels or any(len(lab) != len(d) for lab, d in zip(labels.groups(), (lhs, kernel, out))):
    return 0.0
  lhs_labels, kernel_labels, out_labels = labels.groups()
  spatial = sorted(c for c in kernel_labels if c.isdigit())
  window = _window(inst.attributes, len(spatial))
  taps = 1
  for d, (_, stride, pad, lhs_dilate, rhs_dilate) in zip(spatial, window):
    taps *= _valid_taps(lhs[lhs_labels.index(d)], out[out_labels.index(d)], kernel[kernel_labels.index(d)], stride,
                        pad, lhs_dilate, rhs_dilate)
  positions = math.prod(out[out_labels.index(d)] for d in spatial)
  features = math.prod(kernel) / max(kernel[kernel_labels.index("o")], 1) / max(
      math.prod(kernel[kernel_labels.index(d)] for d in spatial), 1)
  return 2.0 * math.prod(out) / max(positions, 1) * features * taps


def _window(attributes: str, rank: int) -> list[tuple[int, int, int, int, int]]:
  """(size, stride, low padding, lhs dilation, rhs dilation) per spatial dimension of `window={...}`."""
  m = re.search(r"window=\{([^}]*)\}", attributes)
  fields = dict(re.findall(r"(\w+)=([\w\-]+)", m.group(1))) if m else {}
  column = lambda key, default: [int(v.split("_")[0]) for v in fields[key].split("x")] if key in fields else [
      default] * rank
  return list(zip(column("size", 1), column("stride", 1), column("pad", 0), column("lhs_dilate", 1),
                  column("rhs_dilate", 1)))


def _valid_taps(size_in: int, size_out: int, window: int, stride: int, pad: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read input data."""
  extent = (size_in - 1) * lhs_dilate + 1  # the input with lhs-dilation zeros between its elements
  count = 0
  for k in range(window):
    offset = k * rhs_dilate - pad
    if lhs_dilate == 1:  # the o with 0 <= o * stride + offset < extent
      first, last = max(0, -(offset // stride)), min(size_out - 1, (extent - 1 - offset) // stride)
      count += max(0, last - first + 1)
    else:
      count += sum(1 for o in range(size_out)
                   if 0 <= o * stride + offset < extent and (o * stride + offset) % lhs_dilate == 0)
  return count


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "async-start", "async-update", "async-done", "opt-barrier",
               "add-dependency", "domain"}
_SLICES = ("slice", "dynamic-slice", "gather")


def _effective_users(comp: Computation, name: str) -> list[tuple[Instruction, str]]:
  """(user, the operand name it uses) of `name` in `comp`, looking through bitcasts."""
  out = []
  for user in comp.users.get(name, []):
    if user.opcode == "bitcast":
      out += _effective_users(comp, user.name)
    else:
      out.append((user, name))
  return out


def _fused_read(module: Module, fused: Computation, index: int, full: int, depth: int = 0) -> int:
  """Bytes a fusion reads of its operand `index` (`full` in HBM): a sliced operand reads its slices, the
  buffer a dynamic-update-slice writes into is not read (but what the fusion then reads back of the updated
  buffer is: a KV cache written and sliced for attention in one fusion); nested fusions are followed."""
  param = fused.parameter(index)
  users = _effective_users(fused, param.name) if param is not None else []
  if not users or depth > 8:
    return full
  return _value_read(module, fused, users, full, depth, updated=False)


def _value_read(module: Module, fused: Computation, users: list[tuple[Instruction, str]], full: int,
                depth: int, *, updated: bool) -> int:
  """Bytes of a `full`-byte buffer in HBM that `users` (inside fusion `fused`) read; see `_fused_read`.
  `updated`: the users see the buffer after an in-place dynamic-update-slice (passing it out reads nothing)."""
  read = 0
  for user, name in users:
    if user.opcode in _SLICES and user.operands[0] == name:
      # The slice is read from where the operand lives (HBM: `full` > 0), whatever memory space it lands in
      # (the TPU compiler puts a decode step's KV-cache slice straight into VMEM, `S(1)`).
      read += sum(size for size, _ in arrays(user.shape))
    elif user.opcode == "dynamic-update-slice" and user.operands[0] == name:
      # Written in place; the updated buffer's own users (slices read back, or the fusion's output) decide.
      read += _value_read(module, fused, _effective_users(fused, user.name), full, depth + 1, updated=True)
    elif user.opcode == "tuple" and updated:
      continue  # the updated buffer is an output of the fusion, written in place: not a read
    elif user.opcode == "fusion":
      nested = module.computations.get(next(iter(_called(user, "calls")), ""))
      if nested is None:
        return full
      read += sum(_fused_read(module, nested, i, full, depth + 1) for i, n in enumerate(user.operands) if n == name)
    else:
      return full
  return min(full, read)


def _written(comp: Computation, inst: Instruction | None, full: int) -> int:
  """Bytes an output of `full` bytes writes: a dynamic-update-slice writes only its update."""
  while inst is not None and inst.opcode == "bitcast" and inst.operands:
    inst = comp.by_name.get(inst.operands[0])
  if inst is not None and inst.opcode == "dynamic-update-slice" and len(inst.operands) > 1:
    update = comp.by_name.get(inst.operands[1])
    return min(full, hbm_bytes_of(update.shape)) if update is not None else full
  return full


def instruction_bytes(module: Module, comp: Computation, inst: Instruction) -> int:
  """HBM bytes one execution of a top-level instruction reads and writes (see the module docstring)."""
  op = inst.opcode
  if op in _NO_TRAFFIC or op.endswith("-done") or 'custom_call_target="AllocateBuffer"' in inst.attributes:
    return 0
  operand = lambda n: hbm_bytes_of(comp.by_name[n].shape) if n in comp.by_name else 0
  if op in _SLICES:
    return 2 * hbm_bytes_of(inst.shape)
  if op in ("dynamic-update-slice", "scatter") and len(inst.operands) > 1:
    return 2 * operand(inst.operands[-1] if op == "scatter" else inst.operands[1])
  if op == "copy-start":  # (destination, source, context): a prefetch or eviction between memory spaces
    dest = arrays(inst.shape)[:1]
    return sum(operand(n) for n in inst.operands) + sum(size for size, space in dest if space == 0)
  if op.endswith("-start"):  # an async collective: its operands, and results as `aot.collective_ops` reads them
    results = [(s, m) for s, m in arrays(inst.shape) if s > 4]  # without the u32[] context scalars
    results = results[len(results) // 2:] if op in ("all-gather-start", "collective-permute-start") else results
    return sum(operand(n) for n in inst.operands) + sum(s for s, m in results if m == 0)
  if op == "fusion":
    fused = module.computations.get(next(iter(_called(inst, "calls")), ""))
    if fused is not None:
      read = sum(_fused_read(module, fused, i, operand(n)) for i, n in enumerate(inst.operands))
      return read + _fusion_written(fused, inst)
  return sum(operand(n) for n in inst.operands) + hbm_bytes_of(inst.shape)


def _fusion_written(fused: Computation, inst: Instruction) -> int:
  """Bytes a fusion writes: each output in HBM, or only the update of one that is a dynamic-update-slice."""
  outputs = arrays(inst.shape)
  root = fused.root
  elements = [fused.by_name.get(n) for n in root.operands] if root is not None and root.opcode == "tuple" else [root]
  if len(elements) != len(outputs):
    return sum(s for s, m in outputs if m == 0)
  return sum(_written(fused, e, s) for e, (s, m) in zip(elements, outputs) if m == 0)


# ----------------------------------------------------------------------------
# The estimate.

# Bytes a ring moves through each device, per result byte, for a group of n devices.
_WIRE = {
    "all-gather": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1.0,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


@dataclasses.dataclass(frozen=True)
class CollectiveTraffic:
  """One kind of collective per device per step: executions, result bytes, and bytes through the device's links."""

  count: float = 0.0
  result_bytes: float = 0.0
  wire_bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Per-device work of one step and the time it implies on a chip (`peaks`; None: counts only).

  `flops` are measured from the program (dots and convolutions, loops counted), `hbm_bytes` and the
  collectives' `wire_bytes` are estimates (see the module docstring). `seconds` is the largest of
  the three times: the step time if everything else overlapped perfectly, a lower bound;
  `serial_seconds`, their sum, is the bound with no overlap at all. `model_flops` (per device, from
  the caller: 6·N·tokens / devices, say) give the MFU; without them only the hardware FLOPs
  utilisation of the counted FLOPs (`hfu`) is known.
  """

  flops: float
  hbm_bytes: float
  collectives: dict[str, CollectiveTraffic]
  peaks: ChipPeaks | None = None
  model_flops: float | None = None
  model_flops_source: str = ""
  cost_analysis_flops: float | None = None  # XLA's figure for the same program (loop bodies once)
  loops: tuple[Loop, ...] = ()

  @property
  def collective_bytes(self) -> float:
    return sum(c.wire_bytes for c in self.collectives.values())

  @property
  def unknown_loops(self) -> list[Loop]:
    return [loop for loop in self.loops if loop.trip_count is None]

  @property
  def compute_seconds(self) -> float | None:
    return self.flops / self.peaks.flops_per_s if self.peaks else None

  @property
  def memory_seconds(self) -> float | None:
    return self.hbm_bytes / self.peaks.hbm_bytes_per_s if self.peaks else None

  @property
  def collective_seconds(self) -> float | None:
    return self.collective_bytes / self.peaks.ici_bytes_per_s if self.peaks else None

  def _times(self) -> dict[str, float]:
    return {} if not self.peaks else {"compute": self.compute_seconds, "memory": self.memory_seconds,
                                      "collectives": self.collective_seconds}

  @property
  def seconds(self) -> float | None:
    """Predicted step time with perfect overlap: the largest of the three times."""
    return max(self._times().values()) if self.peaks else None

  @property
  def serial_seconds(self) -> float | None:
    """Step time with no overlap: the sum of the three times."""
    return sum(self._times().values()) if self.peaks else None

  @property
  def bound(self) -> str | None:
    """Which time is the largest: "compute", "memory" or "collectives"."""
    times = self._times()
    return max(times, key=times.get) if times else None

  @property
  def mfu(self) -> float | None:
    """Model FLOPs per device / predicted step time / peak FLOP/s."""
    return _utilisation(self.model_flops, self.seconds, self.peaks)

  @property
  def hfu(self) -> float | None:
    """Counted (hardware) FLOPs per device / predicted step time / peak FLOP/s: 1.0 when compute-bound."""
    return _utilisation(self.flops, self.seconds, self.peaks)

  def format(self) -> str:
    """The lines `alm-jax compile` prints."""
    cost = self.cost_analysis_flops
    cost = f"   (XLA cost analysis, loop bodies once: {cost:.3e})" if cost else ""
    kinds = [f"{k} x{c.count:g} {aot.human_bytes(c.wire_bytes)}" for k, c in self.collectives.items() if c.count]
    lines = [f"roofline per device per step ({_loops_text(self.loops)}):",
             f"  {'dot FLOPs (counted)':<28}{self.flops:>12.3e}{cost}",
             f"  {'HBM bytes (estimate)':<28}{aot.human_bytes(self.hbm_bytes):>12}",
             f"  {'collective bytes (estimate)':<28}{aot.human_bytes(self.collective_bytes):>12}"
             + (f"   ({', '.join(kinds)})" if kinds else "")]
    if self.unknown_loops:
      names = ", ".join(loop.op_name or loop.name for loop in self.unknown_loops)
      lines.append(f"  loops with unknown trip counts, counted once: {names}")
    if not self.peaks:
      return "\n".join(lines + ["  no published peaks for this target: counts only"])
    p = self.peaks
    mfu = f", MFU {self.mfu:.1%} ({self.model_flops_source or 'model FLOPs'} = {self.model_flops:.3e})" \
        if self.mfu is not None else ""
    lines += [f"  on {p.name} ({p.flops_per_s / 1e12:g} TFLOP/s, HBM {p.hbm_bytes_per_s / 1e9:g} GB/s, "
              f"ICI {p.ici_bytes_per_s / 1e9:g} GB/s per chip):",
              f"    compute {duration(self.compute_seconds)}, memory {duration(self.memory_seconds)}, "
              f"collectives {duration(self.collective_seconds)}",
              f"    step >= {duration(self.seconds)} ({self.bound}-bound, perfect overlap); "
              f"{duration(self.serial_seconds)} with no overlap",
              f"    implied HFU {self.hfu:.1%} (counted FLOPs){mfu}"]
    return "\n".join(lines)

  def minus(self, part: Roofline) -> Roofline:
    """This roofline less `part` of it (a subtree's, from `analyse_hlo(root=...)`): FLOPs, HBM and collective
    bytes subtracted, e.g. a generation program less one decode step is its prefill. No model FLOPs."""
    kinds = set(self.collectives) | set(part.collectives)
    zero = CollectiveTraffic()
    collectives = {k: CollectiveTraffic(*(a - b for a, b in zip(dataclasses.astuple(self.collectives.get(k, zero)),
                                                                 dataclasses.astuple(part.collectives.get(k, zero)))))
                   for k in sorted(kinds)}
    loops = tuple(loop for loop in self.loops if loop not in part.loops)
    return Roofline(flops=self.flops - part.flops, hbm_bytes=self.hbm_bytes - part.hbm_bytes,
                    collectives=collectives, peaks=self.peaks, loops=loops)

  def to_dict(self) -> dict:
    """JSON-friendly form, with the derived times."""
    d = dataclasses.asdict(self)
    d["loops"] = [dataclasses.asdict(loop) for loop in self.loops]
    d.update(collective_bytes=self.collective_bytes, compute_seconds=self.compute_seconds,
             memory_seconds=self.memory_seconds, collective_seconds=self.collective_seconds, seconds=self.seconds,
             serial_seconds=self.serial_seconds, bound=self.bound, mfu=self.mfu, hfu=self.hfu)
    return d


def _loops_text(loops: tuple[Loop, ...], most: int = 8) -> str:
  """`no loops`, or `4 loops, trip counts 32, 32, 4, ?`."""
  if not loops:
    return "no loops"
  counts = [str(loop.trip_count) if loop.trip_count is not None else "?" for loop in loops]
  more = f", ... ({len(counts) - most} more)" if len(counts) > most else ""
  return f"{len(loops)} loop{'s' if len(loops) > 1 else ''}, trip counts {', '.join(counts[:most])}{more}"


def _utilisation(flops: float | None, seconds: float | None, peaks: ChipPeaks | None) -> float | None:
  if flops is None or not seconds or peaks is None:
    return None
  return flops / seconds / peaks.flops_per_s


def duration(seconds: float | None) -> str:
  """`1.23 s`, `45.6 ms` or `7.8 us`."""
  if seconds is None:
    return "?"
  if seconds >= 1:
    return f"{seconds:.3g} s"
  return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def collective_traffic(hlo_text: str, counts: Mapping[str, float], num_devices: int,
                       outside: float = 1.0) -> dict[str, CollectiveTraffic]:
  """Collectives per kind (`aot.collective_ops`), each times how often its computation runs (`counts`);
  one in a computation `counts` lacks runs `outside` times (0 for a subtree: it is not part of it)."""
  totals = {kind: [0.0, 0.0, 0.0] for kind in aot.COLLECTIVES}
  for op in aot.collective_ops(hlo_text):
    runs = counts.get(op.computation, outside)
    n = op.group_size or num_devices
    t = totals[op.kind]
    t[0] += runs
    t[1] += runs * op.result_bytes
    t[2] += runs * op.result_bytes * (_WIRE[op.kind](n) if n > 1 or op.kind == "collective-permute" else 0.0)
  return {kind: CollectiveTraffic(*t) for kind, t in totals.items()}


def analyse_hlo(hlo_text: str, num_devices: int = 1, peaks: ChipPeaks | None = None,
                model_flops: float | None = None, model_flops_source: str = "",
                cost_analysis_flops: float | None = None, root: str | None = None) -> Roofline:
  """The roofline of one optimised SPMD program (`compiled.as_text()`), per device.

  `root`: only the subtree of that computation, per run of it (a loop body: one iteration, its own inner
  loops counted by their trip counts); the default is the whole program (the entry).
  """
  module = parse_module(hlo_text)
  counts, fused, loops = multipliers(module, root)
  flops, hbm = 0.0, 0.0
  for name, runs in counts.items():
    comp = module.computations.get(name)
    if comp is None or not runs:
      continue
    flops += runs * sum(instruction_flops(comp, inst) for inst in comp.instructions)
    if name not in fused:
      hbm += runs * sum(instruction_bytes(module, comp, inst) for inst in comp.instructions)
  collectives = collective_traffic(hlo_text, counts, num_devices, outside=1.0 if root is None else 0.0)
  return Roofline(flops=flops, hbm_bytes=hbm, collectives=collectives, peaks=peaks, model_flops=model_flops,
                  model_flops_source=model_flops_source, cost_analysis_flops=cost_analysis_flops, loops=tuple(loops))


def cost_analysis_flops(compiled: Any) -> float | None:
  """XLA's FLOPs for a compiled program (loop bodies counted once), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def roofline(compiled: Any, num_devices: int = 1, peaks: ChipPeaks | None = None, model_flops: float | None = None,
             model_flops_source: str = "") -> Roofline:
  """`analyse_hlo` of a compiled program (`jax.stages.Compiled`), with XLA's FLOPs alongside."""
  return analyse_hlo(compiled.as_text(), num_devices, peaks, model_flops, model_flops_source,
                     cost_analysis_flops(compiled))


def model_flops_per_device(parameters: int, tokens: int, num_devices: int) -> float:
  """The usual 6·N·D training FLOPs (forward 2, backward 4 per parameter per token), per device."""
  return 6.0 * parameters * tokens / max(num_devices, 1)
