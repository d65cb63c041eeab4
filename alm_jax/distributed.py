"""Multi-process runs: `jax.distributed` set up from the environment, and per-process data.

The same program runs as one process or as N cooperating processes (TPU pod
workers, SLURM tasks, or N processes on one machine over loopback, which is
how the tests cover multi-host). `initialize()` works out which from, in order:
explicit flags (`--coordinator`, `--num-processes`, `--process-id`), the
`ALM_JAX_*` environment that `launch/*.sh` set, SLURM variables, a TPU VM
(JAX's own pod detection), else a single process. Each process then feeds only
its rows of the global batch (`global_batch`), only process 0 logs and writes
reports (`is_main_process`), and checkpoints are written by all processes
together (Orbax handles that once `jax.distributed` is up).

Call `initialize` before any other JAX call (it must precede backend start).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from alm_jax.config import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "ALM_JAX_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "ALM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ALM_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ALM_JAX_LOCAL_DEVICE_IDS"  # e.g. "0" (one GPU per process) or "0,1,2,3,4,5,6,7"
ENV_MODE = "ALM_JAX_DISTRIBUTED"  # auto (default) | off | on (force JAX's own cluster detection)
ENV_INIT_TIMEOUT = "ALM_JAX_INIT_TIMEOUT"  # seconds to wait for all processes (default 300)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """How this process joins a run. None fields are left to JAX's cluster auto-detection.

  Attributes:
    source: `single`, `flags`, `env`, `slurm` or `tpu` (or `on`: JAX detection forced).
    coordinator: `host:port` of process 0's coordination service.
    num_processes: processes in the run.
    process_id: this process's index in [0, num_processes).
    local_device_ids: accelerator ids this process drives (None: all it sees).
  """

  source: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def distributed(self) -> bool:
    """Whether `jax.distributed.initialize` is called at all."""
    return self.source != "single"


def _int(value: Any, key: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(key, f"expected an integer, got {value!r}") from None


def _ids(value: Any, key: str) -> tuple[int, ...] | None:
  if value is None or value == "":
    return None
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  try:
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(key, f"expected comma-separated device ids, got {value!r}") from None


def _tpu_vm_present() -> bool:
  """True on a Cloud TPU VM (TPU device files present)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    environ: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
  """Decides how to join the run from flags and environment; does not touch JAX.

  Raises `ConfigError` naming the flag or variable when the settings are
  incomplete or inconsistent (e.g. a process id without a process count).
  """
  env = os.environ if environ is None else environ
  mode = env.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in ("auto", "off", "on"):
    raise ConfigError(ENV_MODE, f"must be auto, off or on, got {mode!r}")
  if mode == "off":
    return ClusterSpec("single")
  local_ids = _ids(local_device_ids, "--local-device-ids")
  if local_ids is None:
    local_ids = _ids(env.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS)

  explicit = (coordinator, num_processes, process_id)
  from_env = (env.get(ENV_COORDINATOR) or None, _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
              _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID))
  slurm = "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env
  slurm_values = ((None, _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS"), _int(env.get("SLURM_PROCID"), "SLURM_PROCID"))
                  if slurm else (None, None, None))

  if any(v is not None for v in explicit):
    source, keys, given = "flags", ("--coordinator", "--num-processes", "--process-id"), explicit
  elif any(v is not None for v in from_env):
    source, keys, given = "env", (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), from_env
  elif slurm and (slurm_values[1] or 1) > 1:
    return ClusterSpec("slurm", None, slurm_values[1], slurm_values[2], local_ids)
  elif mode == "on":
    return ClusterSpec("on", None, None, None, local_ids)
  elif tpu_vm if tpu_vm is not None else _tpu_vm_present():
    return ClusterSpec("tpu", None, None, None, local_ids)
  else:
    return ClusterSpec("single")

  # Fill gaps in flags/env from SLURM (the sbatch script exports only the coordinator).
  values = [g if g is not None else s for g, s in zip(given, slurm_values)]
  coord, count, index = values
  if count is None or index is None or (coord is None and not slurm):
    missing = [k for k, v in zip(keys, values) if v is None]
    raise ConfigError(missing[0], f"multi-process run needs {', '.join(keys)} together (missing {', '.join(missing)})")
  if count < 1:
    raise ConfigError(keys[1], f"must be >= 1, got {count}")
  if not 0 <= index < count:
    raise ConfigError(keys[2], f"must be in [0, {count}), got {index}")
  if coord is not None and ":" not in coord:
    raise ConfigError(keys[0], f"expected host:port, got {coord!r}")
  if count == 1 and source != "flags":
    return ClusterSpec("single")
  return ClusterSpec(source, coord, count, index, local_ids)


_CURRENT: ClusterSpec | None = None


def initialize(spec: ClusterSpec | None = None, timeout_s: int | None = None) -> ClusterSpec:
  """Joins the run described by `spec` (default: `detect()`); a no-op for a single process.

  On CPU, cross-process collectives use gloo. Calling it again returns the
  first result.
  """
  global _CURRENT
  if _CURRENT is not None:
    return _CURRENT
  spec = detect() if spec is None else spec
  if spec.distributed:
    import jax

    if timeout_s is None:
      timeout_s = _int(os.environ.get(ENV_INIT_TIMEOUT), ENV_INIT_TIMEOUT) or 300
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if spec.source in ("flags", "env") and spec.coordinator and spec.local_device_ids is None:
      kwargs["cluster_detection_method"] = "deactivate"  # everything is known: do not let SLURM vars pin a GPU
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
        initialization_timeout=timeout_s,
        **kwargs,
    )
    log.info("process %d of %d joined via %s (%d local devices of %d)", jax.process_index(), jax.process_count(),
             spec.source, jax.local_device_count(), jax.device_count())
  _CURRENT = spec
  return spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `--coordinator`, `--num-processes`, `--process-id`, `--local-device-ids` to a command."""
  group = parser.add_argument_group("multi-process (default: from ALM_JAX_*, SLURM or the TPU VM)")
  group.add_argument("--coordinator", default=None, help="host:port of process 0 (also $ALM_JAX_COORDINATOR)")
  group.add_argument("--num-processes", type=int, default=None, help="number of processes ($ALM_JAX_NUM_PROCESSES)")
  group.add_argument("--process-id", type=int, default=None, help="this process's index ($ALM_JAX_PROCESS_ID)")
  group.add_argument("--local-device-ids", default=None, help="comma-separated device ids this process drives")


def initialize_from_args(args: argparse.Namespace) -> ClusterSpec:
  """`initialize(detect(...))` from the flags `add_arguments` defined."""
  return initialize(detect(
      getattr(args, "coordinator", None), getattr(args, "num_processes", None), getattr(args, "process_id", None),
      getattr(args, "local_device_ids", None)))


def is_main_process() -> bool:
  """True on process 0, the one that logs, prints and writes reports."""
  import jax

  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op for one process)."""
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------
# Per-process data.


def process_rows(sharding: Any, global_shape: Sequence[int]) -> np.ndarray:
  """Indices of the global batch rows this process must supply, in the order it supplies them.

  For `jax.make_array_from_process_local_data`, a process's local array is its
  devices' distinct row blocks of dimension 0, concatenated in increasing order.
  A pipeline that reads the same global order everywhere takes
  `global_rows[process_rows(...)]` and matches a single-process run exactly.
  """
  index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  blocks = set()
  for index in index_map.values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(int(global_shape[0]))
    blocks.add((start, stop))
  return np.concatenate([np.arange(a, b) for a, b in sorted(blocks)]) if blocks else np.arange(0)


def global_batch(
    local_batch: Any,
    mesh: Any,
    rules: Any,
    global_batch_size: int | None = None,
    axes: Mapping[str, Sequence[str | None]] | None = None,
) -> Any:
  """Assembles the global batch from each process's local rows (`make_array_from_process_local_data`).

  `local_batch` holds this process's rows (see `process_rows`); with one
  process it is the whole batch. `global_batch_size` defaults to what the
  sharding implies (rows per process x processes for a batch split over all
  devices). Uneven splits raise `ConfigError` naming `config.mesh.shape`.
  """
  import jax

  from alm_jax import sharding as sharding_lib

  shardings = sharding_lib.batch_shardings(local_batch, mesh, rules, axes)
  logical = sharding_lib.batch_axes(local_batch, axes)

  def one(x, s, names):
    x = np.asarray(x)
    shape = None
    if global_batch_size is not None:  # the rows dimension (logical `batch`) holds the global batch
      dim = list(names).index("batch") if "batch" in names else 0
      shape = x.shape[:dim] + (int(global_batch_size),) + x.shape[dim + 1:]
    return jax.make_array_from_process_local_data(s, x, shape)

  try:
    out = jax.tree.map(one, local_batch, shardings, logical, is_leaf=lambda a: isinstance(a, tuple))
  except ValueError as e:
    raise ConfigError("config.mesh.shape", f"cannot assemble the global batch: {str(e).splitlines()[0]}") from None
  sharding_lib.check_batch(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out), shardings, mesh)
  return out


def to_host(tree: Any) -> Any:
  """Copies a tree of (possibly multi-process) arrays to numpy on every process."""
  import jax
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
