"""Device meshes, the logical-axis rules table, and sharded state.

One mesh with axes `data`, `fsdp`, `tensor` serves every model. Models name
their dimensions with logical axes (`alm_jax.models.partitioning.LOGICAL_AXES`);
`DEFAULT_RULES` below maps each name to mesh axes, and `config.mesh.rules`
overrides entries. From those two things this module derives the
`NamedSharding` of every parameter, optimizer-state leaf and batch array, creates
state already sharded (`jax.eval_shape` + `jax.jit(out_shardings=...)`), places
host arrays from imported checkpoints shard by shard, and refuses meshes or
rule tables that cannot work before anything is compiled.

Parameters themselves are laid out by `alm_jax.params.ParamLayout` (flat
path dicts, one `NamedSharding` per path from the rules here); that is the one
parameter API training, checkpoints, inference and `alm-jax compile` share.

Typical use (single- or multi-process alike)::

  mesh_config = sharding.mesh_config_from(config.mesh)
  mesh = sharding.make_mesh(mesh_config)
  rules = mesh_config.logical_rules
  layout = ParamLayout(lambda rngs: Model(cfg, rngs=rngs))
  sharding.assert_params_sufficiently_sharded(layout.abstract_sharded(mesh, rules), mesh,
                                              mesh_config.sharding_tolerance)
  params = layout.init(seed, mesh, rules)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from alm_jax.config import ConfigError, from_dict, require
from alm_jax.models import partitioning
from alm_jax.models.partitioning import LOGICAL_AXES, Rules, logical_to_spec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. The one table; `config.mesh.rules` overrides entries.
#
# * `batch` spreads examples over `data` and `fsdp`: FSDP is data parallelism
#   whose weights are also split, so both axes see different examples.
# * `embed` (the model width of every tower) is the FSDP dimension: every
#   kernel has it, so splitting it shards all big weights and their optimizer
#   state across `fsdp`; XLA all-gathers a layer's weights before use and
#   reduce-scatters its gradients.
# * `mlp`, `heads`, `kv_heads`, `vocab` are the Megatron tensor-parallel
#   dimensions (column/row-parallel matmuls, vocab-parallel logits).
# * Everything else stays whole: `length`/`kv_length`/`audio_frames`/`queries`
#   are activation axes (sequence parallelism would be a separate axis);
#   `head_dim`, `lora_rank`, `conv_kernel`, `mel` and `norm` are small, and
#   splitting them would only add collectives inside one matmul or norm;
#   `layers` is the scan axis, which must stay whole on every device.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("kv_length", None),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    ("layers", None),
    ("conv_kernel", None),
    ("mel", None),
    ("queries", None),
    ("audio_frames", None),
)


def _normalise_target(key: str, target: Any) -> str | tuple[str, ...] | None:
  """Checks one rule target: None, a mesh axis name, or a sequence of them."""
  # `--config.mesh.rules.embed=None` reaches us as the string "None" (the key's type is locked to str).
  if target is None or target in ("", "None", "none") or target == ():
    return None
  names = (target,) if isinstance(target, str) else target
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    raise ConfigError(key, f"expected None, a mesh axis or a list of mesh axes, got {target!r}")
  for name in names:
    require(name in MESH_AXES, key, f"unknown mesh axis {name!r} (mesh axes: {', '.join(MESH_AXES)})")
  require(len(set(names)) == len(names), key, f"mesh axis repeated in {target!r}")
  return names[0] if len(names) == 1 else tuple(names)


def make_rules(overrides: Mapping[str, Any] | None = None, key: str = "config.mesh.rules") -> Rules:
  """`DEFAULT_RULES` with `overrides` (logical name -> mesh axes) applied; names are checked."""
  table = dict(DEFAULT_RULES)
  for name, target in (overrides or {}).items():
    require(name in LOGICAL_AXES, f"{key}.{name}", f"unknown logical axis (known: {', '.join(LOGICAL_AXES)})")
    table[name] = _normalise_target(f"{key}.{name}", target)
  return tuple((name, table[name]) for name in LOGICAL_AXES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh and the logical-axis rules (`config.mesh`).

  Attributes:
    shape: sizes of the (`data`, `fsdp`, `tensor`) axes within a slice (a TPU
      slice, or one host for GPU/CPU when `dcn_shape` is used); one may be -1
      for "all remaining devices".
    dcn_shape: sizes of the same axes across slices/hosts over the data-center
      network (multi-slice TPU, multi-node GPU); (1, 1, 1) means one flat mesh.
      One entry may be -1. Mesh axis i then has size `shape[i] * dcn_shape[i]`.
      Devices are grouped by TPU slice, else by process; a single process with
      all devices (ahead-of-time compilation on CPU) splits them into blocks.
    rules: overrides of `DEFAULT_RULES`: logical name -> None, a mesh axis, or a
      list of mesh axes (sharded over their product, in order).
    sharding_tolerance: `assert_params_sufficiently_sharded` fails when the
      parameters on one device exceed perfect sharding by more than this fraction.
  """

  shape: tuple[int, ...] = (1, -1, 1)
  dcn_shape: tuple[int, ...] = (1, 1, 1)
  rules: dict = dataclasses.field(default_factory=dict)
  sharding_tolerance: float = 0.02

  def __post_init__(self):
    for name in ("shape", "dcn_shape"):
      value = tuple(getattr(self, name))
      key = f"config.mesh.{name}"
      require(len(value) == len(MESH_AXES), key, f"needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {value}")
      require(all(v == -1 or v >= 1 for v in value), key, f"sizes must be positive or -1, got {value}")
    require(
        (tuple(self.shape) + tuple(self.dcn_shape)).count(-1) <= 1,
        "config.mesh.shape",
        f"at most one -1 in shape {tuple(self.shape)} and dcn_shape {tuple(self.dcn_shape)}",
    )
    require(self.sharding_tolerance >= 0, "config.mesh.sharding_tolerance", "must be >= 0")
    make_rules(self.rules)  # validates names and targets

  @property
  def logical_rules(self) -> Rules:
    """The full rules table: defaults with this config's overrides."""
    return make_rules(self.rules)


def mesh_config_from(values: Any = None, prefix: str = "config.mesh") -> MeshConfig:
  """Builds a `MeshConfig` from a dict/ConfigDict section (`config.mesh`)."""
  return from_dict(MeshConfig, values, prefix)


def default_mesh_section() -> dict:
  """The `config.mesh` section with every key spelled out (for config files, so each is overridable)."""
  return {
      "shape": (1, -1, 1),
      "dcn_shape": (1, 1, 1),
      "rules": {name: target for name, target in DEFAULT_RULES},
      "sharding_tolerance": 0.02,
  }


def resolve_shape(
    shape: Sequence[int], num_devices: int, key: str = "config.mesh.shape", unit: str = "devices"
) -> tuple[int, ...]:
  """Fills a -1 entry so the sizes multiply to `num_devices`, or raises `ConfigError` naming `key`."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    require(
        num_devices % known == 0,
        key,
        f"{shape} cannot cover {num_devices} {unit}: the fixed sizes multiply to {known}, "
        f"which does not divide {num_devices}",
    )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  require(
      math.prod(shape) == num_devices,
      key,
      f"{shape} multiplies to {math.prod(shape)} but there are {num_devices} {unit} "
      f"(use -1 for one axis to take the rest)",
  )
  return shape


def _granules(devices: Sequence[Any]) -> list[list[Any]]:
  """Groups devices by TPU slice, or by process elsewhere (the units joined over DCN)."""
  groups: dict[int, list[Any]] = {}
  for d in devices:
    slice_index = getattr(d, "slice_index", None) if d.platform == "tpu" else None
    groups.setdefault(d.process_index if slice_index is None else slice_index, []).append(d)
  return [groups[k] for k in sorted(groups)]


def _ici_mesh(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
  """Device array for one slice, following the physical torus where jax knows it."""
  from jax.experimental import mesh_utils

  for split in (False, True):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except (ValueError, NotImplementedError, AssertionError):
      continue
  log.warning("no topology-aware device order for mesh %s; using device order", shape)
  return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(config: MeshConfig | Mapping[str, Any] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (`data`, `fsdp`, `tensor`) mesh over `devices` (default: all devices of all processes).

  Shapes are checked against the device count first, so an impossible shape
  is a `ConfigError` naming `config.mesh.shape`, not a compile failure.
  """
  if not isinstance(config, MeshConfig):
    config = mesh_config_from(config)
  devices = list(jax.devices() if devices is None else devices)
  if tuple(config.dcn_shape) == (1, 1, 1):
    shape = resolve_shape(config.shape, len(devices))
    array = _ici_mesh(shape, devices)
  else:
    granules = _granules(devices)
    dcn_count = math.prod(config.dcn_shape)
    if len(granules) == 1 and -1 not in config.dcn_shape and dcn_count > 1 and devices[0].platform != "tpu":
      # One process holding every device (a CPU model of a GPU cluster for ahead-of-time compilation):
      # contiguous blocks of devices stand in for the hosts.
      if len(devices) % dcn_count == 0:
        per = len(devices) // dcn_count
        granules = [devices[i * per : (i + 1) * per] for i in range(dcn_count)]
    sizes = {len(g) for g in granules}
    require(len(sizes) == 1, "config.mesh.dcn_shape", f"slices/hosts hold different device counts {sorted(sizes)}")
    per_granule = sizes.pop()
    dcn = resolve_shape(config.dcn_shape, len(granules), "config.mesh.dcn_shape", "slices/processes")
    ici = resolve_shape(config.shape, per_granule, "config.mesh.shape", "devices per slice/process")
    blocks = np.empty(dcn + ici, dtype=object)
    for index, granule in zip(np.ndindex(*dcn), granules):
      blocks[index] = _ici_mesh(ici, granule)
    # Axis i of the mesh is (dcn_i, ici_i) flattened: DCN outermost, so the slow
    # network carries only the outer (usually data-parallel) split.
    array = blocks.transpose(0, 3, 1, 4, 2, 5).reshape(tuple(d * i for d, i in zip(dcn, ici)))
  return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def path_str(path: Sequence[Any]) -> str:
  """A jax key path (`DictKey('tokens'), ...`) -> `tokens/...`, for error messages."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


# ----------------------------------------------------------------------------
# Tracing with the rules.


def bind_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
  """Wraps `fn` so `partitioning.constrain` sees `mesh`/`rules` whenever it is traced.

  Sharding constraints are applied at trace time; binding the rules to the
  function (rather than around a call site) keeps jit's cache from reusing a
  trace made without them.
  """

  def wrapped(*args, **kwargs):
    with partitioning.use_rules(mesh, rules):
      return fn(*args, **kwargs)

  wrapped.__name__ = getattr(fn, "__name__", "bound")
  wrapped.__wrapped__ = fn
  return wrapped


use_rules = partitioning.use_rules


# ----------------------------------------------------------------------------
# Batches.


def batch_axes(batch: Any, axes: Mapping[str, Sequence[str | None]] | None = None) -> Any:
  """Logical axes per batch leaf: `axes[name]` for top-level keys it names, else (`batch`, None, ...)."""
  axes = dict(axes or {})

  def one(path, x):
    top = path_str(path[:1])
    if top in axes:
      return tuple(axes[top])
    return ("batch",) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else ()

  return jax.tree_util.tree_map_with_path(one, batch)


def batch_shardings(
    batch: Any, mesh: Mesh, rules: Rules, axes: Mapping[str, Sequence[str | None]] | None = None
) -> Any:
  """`NamedSharding` per batch leaf (leading dimension over `data` x `fsdp` by default)."""
  logical = batch_axes(batch, axes)
  return jax.tree.map(
      lambda a: NamedSharding(mesh, logical_to_spec(a, rules)), logical, is_leaf=lambda a: isinstance(a, tuple)
  )


def batch_shard_count(mesh: Mesh, rules: Rules) -> int:
  """How many devices a batch's rows are split over (the mesh axes the `batch` rule names)."""
  return _axis_size(mesh, logical_to_spec(("batch",), rules)[0])


def check_batch(batch: Any, shardings: Any, mesh: Mesh, key: str = "config.mesh.shape") -> None:
  """Raises `ConfigError` when a global batch dimension does not split over its mesh axes."""
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree.leaves(shardings)):
    for dim, entry in enumerate(tuple(s.spec)):
      parts = _axis_size(mesh, entry)
      if np.shape(x)[dim] % parts:
        raise ConfigError(
            key, f"batch field {path_str(path)} has size {np.shape(x)[dim]} in dim {dim}, "
            f"not divisible by {entry}={parts} devices of mesh {dict(mesh.shape)}"
        )


# ----------------------------------------------------------------------------
# Checks.


@dataclasses.dataclass(frozen=True)
class ShardingSummary:
  """Parameter counts: total, held by the fullest device, and the ideal under perfect sharding."""

  total_params: int
  per_device_params: int
  ideal_per_device: float
  model_parallel_devices: int
  largest_replicated: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def excess(self) -> float:
    """How much the fullest device holds beyond perfect sharding (0.05 = 5 % more)."""
    return self.per_device_params / self.ideal_per_device - 1.0 if self.ideal_per_device else 0.0


def sharding_summary(params: Mapping[str, Any], mesh: Mesh) -> ShardingSummary:
  """How evenly `params` (path -> array or `ShapeDtypeStruct` with a `NamedSharding`) split over `fsdp` x `tensor`.

  Takes what `ParamLayout.abstract_sharded` returns, so it runs before anything is
  allocated or compiled.
  """
  total = per_device = 0
  replicated = []
  for path, leaf in params.items():
    shape = tuple(int(s) for s in leaf.shape)
    spec = tuple(leaf.sharding.spec) + (None,) * (len(shape) - len(leaf.sharding.spec))
    shard = tuple(-(-size // _axis_size(mesh, entry)) for size, entry in zip(shape, spec))
    total += math.prod(shape)
    per_device += math.prod(shard)
    if shard == shape and math.prod(shape) > 1:
      replicated.append((math.prod(shape), path, shape))
  parallel = mesh.shape["fsdp"] * mesh.shape["tensor"]
  replicated.sort(key=lambda r: -r[0])
  return ShardingSummary(
      total_params=total,
      per_device_params=per_device,
      ideal_per_device=total / parallel,
      model_parallel_devices=parallel,
      largest_replicated=tuple((p, s) for _, p, s in replicated[:5]),
  )


def assert_params_sufficiently_sharded(params: Mapping[str, Any], mesh: Mesh, tolerance: float = 0.02) -> ShardingSummary:
  """Fails a run whose parameters are left mostly unsharded (MaxText's check of the same name).

  Compares the parameters held by one device with perfect sharding over
  `fsdp` x `tensor` (`data` replicates by design) and raises `ConfigError`
  naming `config.mesh.rules` when the excess is above `tolerance`
  (`config.mesh.sharding_tolerance`). `alm-jax train` and `alm-jax compile` call it
  before compiling.
  """
  summary = sharding_summary(params, mesh)
  if summary.excess > tolerance:
    worst = ", ".join(f"{p} {s}" for p, s in summary.largest_replicated) or "-"
    raise ConfigError(
        "config.mesh.rules",
        f"parameters are {summary.excess:.1%} above perfect sharding over {summary.model_parallel_devices} "
        f"devices (tolerance config.mesh.sharding_tolerance={tolerance:.1%}): {summary.per_device_params:,} of "
        f"{summary.total_params:,} per device; largest replicated: {worst}",
    )
  return summary
