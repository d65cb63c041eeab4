"""Ahead-of-time compilation for device topologies this machine does not have.

`alm-jax compile --topology v5p:4x4x4` answers "will this config fit on a pod,
and what will it communicate?" from a CPU host, the way MaxText's
`train_compile.py` does: `jax.experimental.topologies.get_topology_desc` (with
`libtpu` installed) describes the target chips, the mesh is built over those
device descriptions, the step is lowered with abstract sharded arguments
(`jax.ShapeDtypeStruct`s, never real arrays) and compiled by the real TPU
compiler. The result's per-device memory and the collectives in its HLO are
reported. GPU clusters are modelled as a mesh of CPU devices (`h100:8`), which
gives exact argument sizes and the collective pattern, but CPU-compiler
temporaries.

A command is a handful of calls::

  topology = aot.parse_topology(args.topology, num_slices=args.num_slices)
  aot.prepare_host(topology)                    # before any other JAX call
  mesh = sharding.make_mesh(mesh_config, aot.topology_devices(topology))
  ... abstract state/batch via sharding.abstract_model / with_shardings ...
  _, report = aot.compile_and_report(step, args, in_shardings=..., out_shardings=...,
                                     donate_argnums=(0,), mesh=mesh, rules=rules, topology=topology)
  print(report.format())
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from alm_jax import oom
from alm_jax.config import ConfigError
from alm_jax.models.partitioning import Rules

if TYPE_CHECKING:
  from alm_jax.roofline import Roofline

GB = 10**9
GIB = 2**30

# Nominal HBM per device from the spec sheets (the allocatable limit is a few % lower).
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GB,  # v5p
    "TPU v6 lite": 32 * GB,  # v6e (Trillium)
    "h100": 80 * GB,
    "a100": 80 * GB,
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Chip generations: (name in get_topology_desc, physical dims, TensorCores per chip in "vN-<cores>" names).
_TPU_FAMILIES = {
    "v4": ("v4", 3, 2),
    "v5p": ("v5p", 3, 2),
    "v5e": ("v5e", 2, 1),
    "v5litepod": ("v5e", 2, 1),
    "v6e": ("v6e", 2, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A compile target: TPU chips described by libtpu, or N CPU devices standing in for GPUs.

  Attributes:
    label: what the user asked for (`v5p-128`, `v5p:4x4x4`, `h100:8`).
    platform: `tpu` or `cpu`.
    topology_name: the `get_topology_desc` name (`v5p:4x4x4`) for TPUs.
    num_devices: devices in all slices together.
    num_slices: TPU slices (or modelled GPU nodes) joined over the data-center network.
    hbm_bytes: per-device memory to compare against (None when unknown).
  """

  label: str
  platform: str
  topology_name: str | None
  num_devices: int
  num_slices: int = 1
  hbm_bytes: int | None = None


def _grow(chips: int, dims: int) -> tuple[int, ...]:
  """Standard slice shape for a power-of-two chip count (v5p-128 -> 4x4x4, v5e-32 -> 4x8)."""
  shape = [2, 2] + [1] * (dims - 2)
  if chips < 4 or chips & (chips - 1):
    raise ValueError(chips)
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(text: str, num_slices: int = 1, hbm_gib: float | None = None) -> Topology:
  """Parses `v5p:4x4x4`, `v5p-128` (TensorCores, as Cloud TPU names slices), `v5e:4x4`, `v6e-16`,
  `v4-16`, `cpu:8` or `h100:8` / `a100:8` (CPU devices modelling GPUs). Raises `ConfigError` naming `--topology`.
  """
  label = text.strip()
  lowered = label.lower()
  if num_slices < 1:
    raise ConfigError("--num-slices", f"must be >= 1, got {num_slices}")
  hbm_override = int(hbm_gib * GIB) if hbm_gib else None
  m = re.fullmatch(r"(cpu|h100|a100):(\d+)", lowered)
  if m:
    n = int(m.group(2))
    if n < 1:
      raise ConfigError("--topology", f"{label}: need at least one device")
    hbm = hbm_override or HBM_BYTES.get(m.group(1))
    return Topology(label, "cpu", None, n * num_slices, num_slices, hbm)
  m = re.fullmatch(r"([a-z0-9]+)[:=]((?:\d+x)*\d+)", lowered)
  family = _TPU_FAMILIES.get(m.group(1)) if m else None
  if m and family:
    name, dims, _ = family
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != dims:
      example = f"{name}:{'x'.join(['2'] * dims)}"
      raise ConfigError("--topology", f"{label}: {m.group(1)} slices have {dims} dimensions, e.g. {example}")
  else:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", lowered)
    family = _TPU_FAMILIES.get(m.group(1)) if m else None
    if not family:
      raise ConfigError(
          "--topology", f"cannot parse {label!r}: use e.g. v5p:4x4x4, v5p-128, v5e:4x4, v6e-16, v4-8 or h100:8")
    name, dims, cores = family
    chips = int(m.group(2)) // cores
    try:
      shape = _grow(chips, dims)
    except ValueError:
      raise ConfigError("--topology", f"{label}: give the slice shape explicitly, e.g. {name}:4x4x4") from None
  topology_name = f"{name}:{'x'.join(str(s) for s in shape)}"
  kind = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}[name]
  return Topology(label, "tpu", topology_name, math.prod(shape) * num_slices, num_slices,
                  hbm_override or HBM_BYTES.get(kind))


def prepare_host(topology: Topology) -> None:
  """Makes enough CPU devices for a `cpu:`/`h100:` topology; call before any other JAX use."""
  if topology.platform != "cpu":
    return
  from jax._src import xla_bridge  # the only way to ask without initialising the backend

  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_num_cpu_devices", max(topology.num_devices, 1))
  available = len(jax.devices("cpu"))
  if available < topology.num_devices:
    raise ConfigError(
        "--topology", f"{topology.label} needs {topology.num_devices} CPU devices but JAX started with {available} "
        f"(set XLA_FLAGS=--xla_force_host_platform_device_count={topology.num_devices})")


def topology_devices(topology: Topology) -> list[Any]:
  """Device descriptions to build a mesh over (TPU: from libtpu, no TPU needed)."""
  if topology.platform == "cpu":
    prepare_host(topology)
    return list(jax.devices("cpu")[: topology.num_devices])
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if topology.topology_name.startswith("v4:") else {}
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name, num_slices=topology.num_slices, **kwargs)
  except Exception as e:  # libtpu missing or the name rejected: both are user-fixable
    raise ConfigError("--topology", f"{topology.label}: no TPU topology description ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); install the [tpu] extra for libtpu") from None
  return list(desc.devices)


def hbm_bytes(device: Any) -> int | None:
  """Nominal HBM of one device, from its `device_kind`."""
  return HBM_BYTES.get(getattr(device, "device_kind", ""))


# ----------------------------------------------------------------------------
# Reading a compiled program.


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device memory of one compiled SPMD program (bytes), from `compiled.memory_analysis()`."""

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int
  peak: int | None = None
  hbm: int | None = None

  @property
  def total(self) -> int:
    """Live at once at worst: arguments, outputs not aliased to (donated) arguments, temporaries, code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool | None:
    return None if self.hbm is None else self.total <= self.hbm

  def format(self, partial: bool = False) -> str:
    """The table `alm-jax compile` prints; `partial`: only arguments and temporaries are known."""
    rows = [("arguments", self.arguments), ("outputs (not aliased)", self.outputs - self.aliased),
            ("temporaries", self.temporaries), ("generated code", self.generated_code), ("total", self.total)]
    if partial:
      rows = [rows[0], rows[2], ("total (at least)", self.total)]
    lines = [f"  {name:<24}{human_bytes(v):>12}" for name, v in rows]
    if self.hbm:
      verdict = "fits" if self.fits else f"does NOT fit: needs {human_bytes(self.total)} of {human_bytes(self.hbm)}"
      used = f"{self.total / self.hbm:.1%} used: {verdict}"
      lines.append(f"  {'HBM per device':<24}{human_bytes(self.hbm):>12}   ({used})")
    return "\n".join(lines)


def human_bytes(n: int | float) -> str:
  """Human-readable bytes: GiB from 1 GiB, MiB from 1 MiB, else KiB."""
  if n >= GIB:
    return f"{n / GIB:.2f} GiB"
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def memory_report(compiled: Any, hbm: int | None = None) -> MemoryReport:
  """Per-device memory of `compiled` (a `jax.stages.Compiled`)."""
  m = compiled.memory_analysis()
  return MemoryReport(
      arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes),
      aliased=int(m.alias_size_in_bytes),
      temporaries=int(m.temp_size_in_bytes),
      generated_code=int(m.generated_code_size_in_bytes),
      peak=int(getattr(m, "peak_memory_in_bytes", 0)) or None,
      hbm=hbm,
  )


@dataclasses.dataclass(frozen=True)
class CollectiveStat:
  """How often one collective appears in the program text, and the bytes its results hold."""

  count: int = 0
  result_bytes: int = 0


_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_OPCODES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter", "reduce-scatter-start": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
}


def array_bytes(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape string such as `f32[128,512]{1,0}` or a tuple of them."""
  return [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
          for dtype, dims in _SHAPE.findall(shape_text) if dtype in _DTYPE_BYTES]


@dataclasses.dataclass(frozen=True)
class CollectiveOp:
  """One collective in a compiled program: its kind, the arrays it produces and the JAX op it came from."""

  kind: str
  arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array, per device
  op_name: str = ""
  computation: str = ""  # the HLO computation it is in (a loop body runs it once per iteration)
  group_size: int = 0  # devices in each of its replica groups (0: every device, or not stated)

  @property
  def result_bytes(self) -> int:
    return sum(_DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in self.arrays)


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _SHAPE.findall(shape_text) if dtype in _DTYPE_BYTES]


def replica_group_size(line: str) -> int:
  """Devices per replica group of one HLO collective, from any of the three forms XLA prints:
  `{{0,1,2,3},{4,5,6,7}}`, the iota form `[2,4]<=[8]` and the mesh-axes form
  `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`; 0 when the groups are empty (every device) or absent."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len([d for d in m.group(1).split(",") if d]) if m else 0


def collective_ops(hlo_text: str) -> list[CollectiveOp]:
  """Every collective in optimised HLO text (`compiled.as_text()`), in program order.

  Async pairs count once, at `-start`: an all-gather's or permute's start tuple
  holds operands then results (the results are kept), an all-reduce's holds its
  results. The TPU compiler's fused reduce-scatter (a fusion calling
  `%all-reduce-scatter...`) counts as one reduce-scatter, not as the all-reduce
  inside it. Ops inside a loop body are listed once, however many iterations run;
  each op names its computation, from which `roofline` multiplies by the trip counts.
  """
  ops = []
  computation = ""
  fused_groups: dict[str, int] = {}  # replica group size of each fused reduce-scatter (callees are printed first)
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    op = _OP.match(line)
    if not op:
      continue
    shape, opcode = op.groups()
    kind = _OPCODES.get(opcode)
    group_size = replica_group_size(line)
    fused = re.search(r"calls=%?(all-reduce-scatter[\w.\-]*)", line) if opcode == "fusion" else None
    if fused:
      kind, group_size = "reduce-scatter", fused_groups.get(fused.group(1), 0)
    elif kind and computation.startswith("all-reduce-scatter"):
      fused_groups[computation] = group_size
      kind = None  # counted at the fusion that calls this computation
    if not kind:
      continue
    arrays = _arrays(shape)
    if opcode in ("all-gather-start", "collective-permute-start") and len(arrays) >= 2:
      arrays = [a for a in arrays if a[0] != "u32" or a[1]]  # drop the u32[] context scalars
      arrays = arrays[len(arrays) // 2:]
    elif opcode.endswith("-start") and arrays:
      arrays = [max(arrays, key=lambda a: _DTYPE_BYTES[a[0]] * math.prod(a[1]))]
    name = re.search(r'op_name="([^"]*)"', line)
    ops.append(CollectiveOp(kind, tuple(arrays), name.group(1) if name else "", computation, group_size))
  return ops


def count_collectives(hlo_text: str) -> dict[str, CollectiveStat]:
  """Counts collectives in optimised HLO text by kind, with the bytes their results hold (see `collective_ops`)."""
  counts: dict[str, list[int]] = {k: [0, 0] for k in COLLECTIVES}
  for op in collective_ops(hlo_text):
    counts[op.kind][0] += 1
    counts[op.kind][1] += op.result_bytes
  return {k: CollectiveStat(c, b) for k, (c, b) in counts.items()}


WEIGHTS, ACTIVATIONS, INDICES = "weights/gradients", "activations", "indices (integer)"
_INTEGER = {"pred", "s4", "u4", "s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64"}


def parameter_sized_counts(parameter_shapes: Iterable[Sequence[int]], mesh_shape: Mapping[str, int]) -> set[int]:
  """Element counts a weight, gradient or optimizer-state collective can produce on one device.

  A parameter of n elements appears whole (gathered) or split over any subset
  of the mesh axes: n / (product of those axes' sizes).
  """
  sizes = [s for s in mesh_shape.values() if s > 1]
  splits = {1}
  for size in sizes:
    splits |= {d * size for d in splits}
  counts = set()
  for shape in parameter_shapes:
    n = math.prod(shape)
    counts.update(n // d for d in splits if n % d == 0)
  return counts


def classify_collectives(ops: Sequence[CollectiveOp], parameter_counts: set[int]) -> dict[str, list[CollectiveOp]]:
  """Splits collective results by what they carry: weights/gradients (floating point and parameter-sized, see
  `parameter_sized_counts`), indices (integers: token ids for an embedding lookup, positions) and activations
  (any other floating-point data: batch, hidden states, losses). A combined op is split between them."""
  out: dict[str, list[CollectiveOp]] = {WEIGHTS: [], ACTIVATIONS: [], INDICES: []}
  for op in ops:
    groups: dict[str, list] = {WEIGHTS: [], ACTIVATIONS: [], INDICES: []}
    for dtype, dims in op.arrays:
      kind = INDICES if dtype in _INTEGER else WEIGHTS if math.prod(dims) in parameter_counts else ACTIVATIONS
      groups[kind].append((dtype, dims))
    for kind, arrays in groups.items():
      if arrays:
        out[kind].append(dataclasses.replace(op, arrays=tuple(arrays)))
    if not op.arrays:
      out[ACTIVATIONS].append(op)
  return out


_NOT_BUFFERS = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant", "after-all", "partition-id",
                "replica-id", "iota", "copy-start"}  # copy-start: an async copy's tuple repeats its operand


def largest_arrays(hlo_text: str, top: int = 8) -> list[dict]:
  """The largest arrays an optimised program materialises per device, each `{"bytes", "shape", "op_name"}`.

  Outputs of instructions outside fused computations (a fusion's insides are never stored), without
  the program's inputs and aliases (parameters, bitcasts, tuples); one entry per JAX op and shape.
  Not a liveness analysis: what is live at the peak depends on the schedule, but the largest arrays
  say which activations a batch makes big.
  """
  seen: dict[tuple[str, str], dict] = {}
  computation, fused = "", False
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      fused = computation.startswith(("fused_", "wrapped_", "all-reduce-scatter")) or ".fused" in computation
      continue
    op = _OP.match(line)
    if not op or fused:
      continue
    shape, opcode = op.groups()
    if opcode in _NOT_BUFFERS or opcode.endswith("-done"):
      continue
    arrays = _arrays(shape)
    if not arrays:
      continue
    dtype, dims = max(arrays, key=lambda a: _DTYPE_BYTES[a[0]] * math.prod(a[1]))
    name = re.search(r'op_name="([^"]*)"', line)
    key = (name.group(1) if name else opcode, _shapes_text([(dtype, dims)]))
    size = _DTYPE_BYTES[dtype] * math.prod(dims)
    if key not in seen or seen[key]["bytes"] < size:
      seen[key] = {"bytes": size, "shape": key[1], "op_name": key[0]}
  return sorted(seen.values(), key=lambda b: -b["bytes"])[:top]


def entry_parameter_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(`op_name` metadata, per-device shape) of each parameter of the ENTRY computation."""
  out, in_entry = [], False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if in_entry and line.rstrip() == "}":
      break
    if in_entry and " parameter(" in line:
      shape = _SHAPE.search(line.split("=", 1)[1])
      name = re.search(r'op_name="([^"]*)"', line)
      dims = tuple(int(d) for d in shape.group(2).split(",") if d) if shape else ()
      out.append((name.group(1).replace("\\'", "'") if name else "", dims))
  return out


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What `alm-jax compile` prints: target, mesh, per-device memory, collectives, cost, roofline."""

  target: str
  num_devices: int
  mesh_shape: dict[str, int]
  memory: MemoryReport
  collectives: dict[str, CollectiveStat]
  flops: float | None
  compile_seconds: float
  traffic: dict[str, CollectiveStat] = dataclasses.field(default_factory=dict)
  largest_activation_collectives: list[dict] = dataclasses.field(default_factory=list)
  compiler_error: str = ""  # the compiler refused the program (out of memory): its message's first line
  largest_buffers: list[dict] = dataclasses.field(default_factory=list)  # as the compiler's message names them
  roofline: Roofline | None = None  # FLOPs, HBM and collective bytes with loops counted, and the time they imply

  @property
  def fits(self) -> bool | None:
    return False if self.compiler_error else self.memory.fits

  def format(self) -> str:
    if self.compiler_error:
      lines = [f"did not compile for {self.target}: {self.num_devices} devices, mesh {self.mesh_shape}, "
               f"after {self.compile_seconds:.1f} s: the compiler ran out of device memory",
               f"  {self.compiler_error}",
               "per-device memory (arguments from the sharded inputs, temporaries from the compiler's message):",
               self.memory.format(partial=True)]
      if self.largest_buffers:
        lines.append("largest allocations (compiler):")
        lines += [f"  {human_bytes(b['bytes']):>12}  {b['shape']}  {b['op_name'][:100]}"
                  for b in self.largest_buffers[:8]]
      return "\n".join(lines)
    lines = [f"compiled for {self.target}: {self.num_devices} devices, mesh {self.mesh_shape}, "
             f"in {self.compile_seconds:.1f} s", "per-device memory:", self.memory.format(),
             "collectives (ops in the program):"]
    for kind, stat in self.collectives.items():
      lines.append(f"  {kind:<24}{stat.count:>6}   results {human_bytes(stat.result_bytes)}")
    if self.traffic:
      lines.append("collective results by what they carry:")
      for kind, stat in self.traffic.items():
        lines.append(f"  {kind:<24}{stat.count:>6}   results {human_bytes(stat.result_bytes)}")
      for op in self.largest_activation_collectives:
        lines.append(f"    {op['kind']} {op['shape']} ({human_bytes(op['bytes'])}) from {op['op_name'] or '?'}")
    if self.flops:
      lines.append(f"flops per device per step: {self.flops:.3e} (XLA cost analysis; loop bodies counted once)")
    if self.roofline is not None:
      lines.append(self.roofline.format())
    return "\n".join(lines)

  def to_dict(self) -> dict:
    """JSON-friendly form (for reports and docs/scaling.md tables)."""
    d = dataclasses.asdict(self)
    d["memory"]["total"] = self.memory.total
    d["fits"] = self.fits
    d["roofline"] = self.roofline.to_dict() if self.roofline is not None else None
    return d


def compile_step(
    fn: Callable,
    args: Sequence[Any],
    *,
    in_shardings: Any,
    out_shardings: Any,
    mesh: Any,
    rules: Rules,
    donate_argnums: Sequence[int] = (),
    static_argnums: Sequence[int] = (),
) -> Any:
  """Lowers and compiles `fn` for `args` (abstract or concrete) with logical rules active while tracing."""
  from alm_jax.sharding import bind_rules

  jitted = jax.jit(bind_rules(fn, mesh, rules), in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=tuple(donate_argnums), static_argnums=tuple(static_argnums))
  return jitted.lower(*args).compile()


def collective_traffic(hlo_text: str, parameter_shapes: Iterable[Sequence[int]], mesh_shape: Mapping[str, int],
                       top: int = 5) -> tuple[dict[str, CollectiveStat], list[dict]]:
  """Collective results split by what they carry (`classify_collectives`), and the `top` largest that are
  not weights: the ones to look at when a step communicates more than its weights."""
  split = classify_collectives(collective_ops(hlo_text), parameter_sized_counts(parameter_shapes, mesh_shape))
  traffic = {k: CollectiveStat(len(v), sum(op.result_bytes for op in v)) for k, v in split.items()}
  largest = sorted(split[ACTIVATIONS] + split[INDICES], key=lambda op: -op.result_bytes)[:top]
  listed = [{"kind": op.kind, "shape": _shapes_text(op.arrays), "bytes": op.result_bytes, "op_name": op.op_name}
            for op in largest if op.result_bytes]
  return traffic, listed


def _shapes_text(arrays: Sequence[tuple[str, tuple[int, ...]]]) -> str:
  """`bf16[4,8], f32[] x12` for a combined op's result arrays (repeats counted, order kept)."""
  counts: dict[str, int] = {}
  for dtype, dims in arrays:
    text = f"{dtype}[{','.join(map(str, dims))}]"
    counts[text] = counts.get(text, 0) + 1
  return ", ".join(text if n == 1 else f"{text} x{n}" for text, n in counts.items())


def analyse(compiled: Any, mesh: Any, target: str = "", hbm: int | None = None, seconds: float = 0.0,
            parameter_shapes: Iterable[Sequence[int]] | None = None, model_flops: float | None = None,
            model_flops_source: str = "") -> CompileReport:
  """Builds a `CompileReport` from a compiled program; `parameter_shapes` (global) split collective
  results into weights/gradients and activations; `model_flops` (per device) give the roofline's MFU.
  The roofline has times where the devices are a TPU generation with published peaks, counts otherwise."""
  # Imported here: `roofline` reads HLO text with this module's helpers.
  from alm_jax import roofline  # pylint: disable=import-outside-toplevel

  devices = list(np.asarray(mesh.devices).flat)
  if hbm is None and devices:
    hbm = hbm_bytes(devices[0])
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = float(cost["flops"]) if cost and "flops" in cost else None
  text = compiled.as_text()
  traffic, largest = ({}, []) if parameter_shapes is None else collective_traffic(text, parameter_shapes, mesh.shape)
  peaks = roofline.chip_peaks(getattr(devices[0], "device_kind", "")) if devices else None
  return CompileReport(
      target=target or getattr(devices[0], "device_kind", "?"),
      num_devices=len(devices),
      mesh_shape=dict(mesh.shape),
      memory=memory_report(compiled, hbm),
      collectives=count_collectives(text),
      flops=flops,
      compile_seconds=seconds,
      traffic=traffic,
      largest_activation_collectives=largest,
      roofline=roofline.analyse_hlo(text, len(devices), peaks, model_flops, model_flops_source, flops),
  )


def compile_and_report(
    fn: Callable,
    args: Sequence[Any],
    *,
    in_shardings: Any,
    out_shardings: Any,
    mesh: Any,
    rules: Rules,
    donate_argnums: Sequence[int] = (),
    topology: Topology | None = None,
    parameter_shapes: Iterable[Sequence[int]] | None = None,
    model_flops: float | None = None,
    model_flops_source: str = "",
) -> tuple[Any, CompileReport]:
  """`compile_step` + `analyse`; returns `(compiled, report)`.

  A program the compiler refuses for want of device memory is not an error here: the result is
  `(None, report)` with `report.fits == False`, the arguments' bytes from the sharded inputs and the
  temporaries and largest allocations the compiler's message names (`oom.parse`).
  """
  start = time.perf_counter()
  target = topology.label if topology else ""
  hbm = topology.hbm_bytes if topology else None
  try:
    compiled = compile_step(fn, args, in_shardings=in_shardings, out_shardings=out_shardings, mesh=mesh,
                            rules=rules, donate_argnums=donate_argnums)
  except Exception as e:  # pylint: disable=broad-except
    if not oom.is_out_of_memory(e):
      raise
    return None, out_of_memory_report(oom.parse(str(e)), args, mesh, target, hbm, time.perf_counter() - start)
  seconds = time.perf_counter() - start
  return compiled, analyse(compiled, mesh, target, hbm, seconds, parameter_shapes, model_flops, model_flops_source)


def sharded_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s (the most any device holds)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    shape = tuple(sharding.shard_shape(leaf.shape)) if sharding is not None else tuple(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def out_of_memory_report(error: oom.OutOfMemory, args: Sequence[Any], mesh: Any, target: str, hbm: int | None,
                         seconds: float) -> CompileReport:
  """The report of a program the compiler refused: what is known of its memory, and the compiler's words."""
  devices = list(np.asarray(mesh.devices).flat)
  memory = MemoryReport(arguments=sharded_bytes(args), outputs=0, aliased=0, temporaries=error.temporaries or 0,
                        generated_code=0, hbm=error.available or hbm or (hbm_bytes(devices[0]) if devices else None))
  return CompileReport(target=target or getattr(devices[0], "device_kind", "?"), num_devices=len(devices),
                       mesh_shape=dict(mesh.shape), memory=memory, collectives={}, flops=None, compile_seconds=seconds,
                       compiler_error=error.message, largest_buffers=list(error.largest))
