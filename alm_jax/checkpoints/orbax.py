"""Training checkpoints on Orbax: params, optimizer state, data-iterator state and metadata.

One `TrainCheckpointer` wraps an `orbax.checkpoint.CheckpointManager` over
`WORKDIR/checkpoints/`. Each step directory holds four items:

* `params`    – the flat `{path: array}` dict (sharded arrays are written by
                every process, each its own shards),
* `opt_state` – the optax state over the trainable params (absent when none),
* `data`      – each process's data-iterator state, via Grain's own Orbax handler,
* `meta`      – JSON: step, stage, trainable mask, resolved config, metrics.

Saves are asynchronous (the next save and `close` wait for the previous one);
Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save never leaves a half-written step that `latest_step` or
`restore` would pick up. Restores take abstract trees (`jax.ShapeDtypeStruct`
with `sharding=`), so a checkpoint written on one mesh loads onto any other.
Every function here takes paths relative to the current directory (or `~/...`)
and makes them absolute before Orbax sees them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from typing import Any, Literal, Mapping

import jax
import grain
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from alm_jax.config import require
from alm_jax.errors import CheckpointError

FORMAT_VERSION = 1
KEY_PREFIX = "config.train.checkpoint"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Retention and saving options (`config.train.checkpoint`).

  `keep_last`: keep the N most recent steps (None keeps every step).
  `keep_best`: also keep the N best steps by `metrics[best_metric]`
  (`best_mode` "min" for a loss); with `keep_best` set and `keep_last` None,
  only the latest step is kept besides the best ones, so a run can resume.
  """

  keep_last: int | None = None
  keep_best: int | None = None
  best_metric: str = "val_loss"
  best_mode: Literal["min", "max"] = "min"
  async_save: bool = True

  def __post_init__(self):
    require(self.keep_last is None or self.keep_last >= 1, f"{KEY_PREFIX}.keep_last",
            f"must be None or >= 1, got {self.keep_last}")
    require(self.keep_best is None or self.keep_best >= 1, f"{KEY_PREFIX}.keep_best",
            f"must be None or >= 1, got {self.keep_best}")
    require(self.best_mode in ("min", "max"), f"{KEY_PREFIX}.best_mode",
            f"must be 'min' or 'max', got {self.best_mode!r}")
    require(bool(self.best_metric), f"{KEY_PREFIX}.best_metric", "must name a metric")


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
  """What a checkpoint holds besides arrays; read without loading any array."""

  step: int
  stage: str
  mask: dict[str, bool]
  config: dict[str, Any]
  metrics: dict[str, float]
  items: tuple[str, ...]
  format_version: int = FORMAT_VERSION


@dataclasses.dataclass(frozen=True)
class Restored:
  """The result of `TrainCheckpointer.restore`."""

  step: int
  params: dict[str, jax.Array]
  opt_state: Any
  metadata: CheckpointMetadata


# ---------------------------------------------------------------------------
# Locating checkpoints.


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` with `~` expanded and made absolute; Orbax refuses relative paths.

  Remote paths (`gs://...`) are returned as they are.
  """
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def checkpoint_dir(path: epath.PathLike) -> epath.Path:
  """`W/checkpoints` for a workdir `W` that has one, else `path` itself."""
  path = absolute(path)
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / "params").is_dir() and (path / "_CHECKPOINT_METADATA").exists()


def _finalized_steps(directory: epath.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if _is_step_dir(p))


def has_checkpoint(workdir: epath.PathLike) -> bool:
  """True if `workdir` (or its `checkpoints/`) holds at least one finalized step."""
  path = absolute(workdir)
  if _is_step_dir(path):
    return True
  return bool(_finalized_steps(checkpoint_dir(path)))


def _locate(path: epath.PathLike, step: int | None) -> tuple[epath.Path, int]:
  """(checkpoints directory, step) for a workdir, a checkpoints dir or a step dir."""
  path = absolute(path)
  if _is_step_dir(path) and step is None:
    return path.parent, int(path.name)
  directory = checkpoint_dir(path)
  steps = _finalized_steps(directory)
  if not steps:
    raise CheckpointError(f"{path}: no finalized checkpoint found")
  if step is None:
    return directory, steps[-1]
  if step not in steps:
    raise CheckpointError(f"{directory}: no checkpoint for step {step} (have {steps})")
  return directory, step


# ---------------------------------------------------------------------------
# Data iterators: Grain's own iterators go to Grain's Orbax handler as they
# are; anything else with get_state/set_state is wrapped so its state is JSON.


class _JsonStateIterator:
  """Adapts an iterator whose state is JSON-able (or bytes) to Grain's handler."""

  def __init__(self, inner: Any):
    self.inner = inner

  def get_state(self) -> bytes:
    state = self.inner.get_state()
    if isinstance(state, bytes):
      state = {"__bytes__": base64.b64encode(state).decode("ascii")}
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    value = json.loads(state)
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
      value = base64.b64decode(value["__bytes__"])
    self.inner.set_state(value)

  def start_prefetch(self) -> None:
    if hasattr(self.inner, "start_prefetch"):
      self.inner.start_prefetch()


def _grain_item(iterator: Any) -> Any:
  native = tuple(t for t in (getattr(grain, "DatasetIterator", None), getattr(grain, "DataLoaderIterator", None)) if t)
  if native and isinstance(iterator, native):
    return iterator
  if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
    raise TypeError(f"data iterator {type(iterator).__name__} has no get_state/set_state")
  return _JsonStateIterator(iterator)


# ---------------------------------------------------------------------------
# Abstract trees and mismatch checks.


def _default_sharding() -> jax.sharding.Sharding:
  if jax.process_count() == 1:
    return SingleDeviceSharding(jax.devices()[0])
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  return NamedSharding(mesh, PartitionSpec())


def _as_abstract(tree: Any) -> Any:
  """Arrays / ShapeDtypeStructs → ShapeDtypeStructs with a sharding (default: one device)."""
  default = None

  def convert(leaf):
    nonlocal default
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      default = default or _default_sharding()
      sharding = default
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)

  return jax.tree.map(convert, tree)


def _key_name(entry: Any) -> str:
  """One keypath entry as Orbax names it ("0.mu.llm/x/kernel")."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaf_names(tree: Any) -> dict[str, tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(e) for e in path): tuple(leaf.shape) for path, leaf in flat}


def _stored_names(tree_metadata: Any) -> dict[str, tuple[int, ...]]:
  tree = getattr(tree_metadata, "tree", tree_metadata)
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))
  return {leaf.name: tuple(leaf.shape) for leaf in leaves if hasattr(leaf, "shape")}


def _mismatches(
    item: str,
    stored: Mapping[str, tuple[int, ...]],
    wanted: Mapping[str, tuple[int, ...]],
    allow_missing: re.Pattern | None = None,
    ignore_unused: re.Pattern | None = None,
) -> list[str]:
  problems = []
  for name, shape in wanted.items():
    if name not in stored:
      if allow_missing is None or not allow_missing.search(name):
        problems.append(f"{item}/{name}: missing from checkpoint")
    elif stored[name] != shape:
      problems.append(f"{item}/{name}: shape {stored[name]} in checkpoint, {shape} expected")
  for name in stored:
    if name not in wanted and (ignore_unused is None or not ignore_unused.search(name)):
      problems.append(f"{item}/{name}: in checkpoint but not expected")
  return problems


def _raise_if(where: str, problems: list[str]) -> None:
  if problems:
    shown = "; ".join(problems[:4]) + (f"; ... and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise CheckpointError(f"{where}: {len(problems)} mismatch(es): {shown}")


def _one_line(error: BaseException, limit: int = 300) -> str:
  """The first line of an Orbax/TensorStore error, shortened (some embed a whole spec)."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------
# The checkpointer.


def _preservation_policy(cfg: CheckpointConfig) -> Any:
  policies = ocp.checkpoint_managers
  if cfg.keep_best is None:
    return policies.LatestN(n=cfg.keep_last)
  metric = cfg.best_metric
  best = policies.BestN(
      get_metric_fn=lambda metrics: float(metrics[metric]),
      reverse=cfg.best_mode == "min",
      n=cfg.keep_best,
      keep_checkpoints_without_metrics=False,
  )
  return policies.AnyPreservationPolicy([policies.LatestN(n=cfg.keep_last or 1), best])


def _handler_registry() -> ocp.handlers.CheckpointHandlerRegistry:
  """Names each item's handler, so a fresh manager can read metadata of any item."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  gc = grain.checkpoint
  for item, handler, save, restore in (
      ("params", ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
      ("opt_state", ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
      ("data", gc.CheckpointHandler(), gc.CheckpointSave, gc.CheckpointRestore),
      ("meta", ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore),
  ):
    registry.add(item, save, handler)
    registry.add(item, restore, handler)
  return registry


class TrainCheckpointer:
  """Saves and restores training state under one directory (`WORKDIR/checkpoints`).

  Use as a context manager (or call `close`) so the last asynchronous save
  finishes before the process exits. Every process of a multi-host run must
  call `save` and `restore` together.
  """

  def __init__(self, directory: epath.PathLike, cfg: CheckpointConfig | None = None, *, read_only: bool = False):
    """`read_only` opens an existing directory to read: no directory is created and
    no leftover temporary directories are removed (a run may be writing there).
    `directory` may be relative or start with `~` (see `absolute`)."""
    self.cfg = cfg or CheckpointConfig()
    self.directory = absolute(directory)
    self.read_only = read_only
    metric = self.cfg.best_metric
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=self.cfg.async_save,
        preservation_policy=_preservation_policy(self.cfg),
        best_fn=(lambda metrics: float(metrics[metric])) if self.cfg.keep_best else None,
        best_mode=self.cfg.best_mode,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())

  # -- bookkeeping ----------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Finalized steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finalized step, or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """With `keep_best`: the step with the best `best_metric`; otherwise the latest step."""
    return self._manager.best_step()

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk and finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- saving ---------------------------------------------------------------

  def save(
      self,
      step: int,
      params: Mapping[str, jax.Array],
      opt_state: Any = None,
      *,
      stage: str,
      mask: Mapping[str, bool],
      config: Mapping[str, Any] | None = None,
      data_iterator: Any = None,
      metrics: Mapping[str, float] | None = None,
  ) -> bool:
    """Starts an asynchronous save of step `step`; returns False if it already exists.

    `mask` is the trainable mask of `stage`; `config` the resolved config as a
    JSON-able dict; `data_iterator` anything with `get_state`/`set_state` (a
    Grain iterator is saved by Grain's own handler, one file per process);
    `metrics` (e.g. `{"val_loss": 1.2}`) ranks the step for `keep_best`.
    Arrays are copied off the device before this returns, so the caller may
    donate or overwrite them right away.
    """
    if self.read_only:
      raise ValueError(f"{self.directory}: opened read-only, cannot save")
    self._manager.wait_until_finished()  # one save in flight at a time
    if step in self._manager.all_steps():
      return False
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    items = {"params": ocp.args.StandardSave(dict(params))}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(_grain_item(data_iterator))
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "stage": stage,
        "mask": {str(k): bool(v) for k, v in mask.items()},
        "config": dict(config or {}),
        "metrics": metrics,
        "items": sorted(list(items) + ["meta"]),
    }
    try:
      json.dumps(meta)
    except TypeError as e:
      raise ValueError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
    items["meta"] = ocp.args.JsonSave(meta)
    ranked = metrics if self.cfg.best_metric in metrics else None
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=True)

  # -- reading --------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"{self.directory}: no finalized checkpoint found")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
    return step

  def metadata(self, step: int | None = None) -> CheckpointMetadata:
    """Step, stage, mask, config and metrics of a step (default latest); loads no arrays."""
    step = self._resolve_step(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{self.directory}/{step}: cannot read metadata: {_one_line(e)}") from None
    return CheckpointMetadata(
        step=int(meta["step"]),
        stage=str(meta["stage"]),
        mask={k: bool(v) for k, v in meta["mask"].items()},
        config=dict(meta["config"]),
        metrics={k: float(v) for k, v in meta.get("metrics", {}).items()},
        items=tuple(meta.get("items", ("params", "meta"))),
        format_version=int(meta.get("format_version", FORMAT_VERSION)),
    )

  def data_state(self, step: int | None = None) -> str | None:
    """This process's saved data-iterator state as text (JSON), or None if not saved."""
    step = self._resolve_step(step)
    files = sorted((self.directory / str(step) / "data").glob(f"process_{jax.process_index()}-of-*.json"))
    return files[0].read_text() if files else None

  def _stored(self, step: int) -> Any:
    try:
      return self._manager.item_metadata(step)
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{self.directory}/{step}: unreadable checkpoint: {_one_line(e)}") from None

  def restore(
      self,
      step: int | None,
      abstract_params: Mapping[str, Any],
      abstract_opt_state: Any = None,
      *,
      data_iterator: Any = None,
  ) -> Restored:
    """Restores a step (None: latest) onto the shardings the abstract trees carry.

    Leaves of `abstract_params` / `abstract_opt_state` are ShapeDtypeStructs
    (or arrays) whose `sharding` says where each array goes (one device when
    absent), so any mesh works. The opt state is restored only when
    `abstract_opt_state` is given; `data_iterator` has its state set in place.
    A missing, unexpected or mis-shaped leaf raises one `CheckpointError`
    naming it.
    """
    step = self._resolve_step(step)
    where = f"{self.directory}/{step}"
    meta = self.metadata(step)
    stored = self._stored(step)
    abstract_params = _as_abstract(dict(abstract_params))
    problems = _mismatches("params", _stored_names(stored["params"]), _leaf_names(abstract_params))
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      if "opt_state" not in meta.items:
        raise CheckpointError(f"{where}: no optimizer state in this checkpoint")
      abstract_opt_state = _as_abstract(abstract_opt_state)
      problems += _mismatches("opt_state", _stored_names(stored["opt_state"]), _leaf_names(abstract_opt_state))
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    _raise_if(where, problems)
    if data_iterator is not None:
      if "data" not in meta.items:
        raise CheckpointError(f"{where}: no data-iterator state in this checkpoint")
      items["data"] = grain.checkpoint.CheckpointRestore(_grain_item(data_iterator))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{where}: {_one_line(e)}") from None
    opt_state = restored.opt_state if abstract_opt_state is not None else None
    return Restored(step=step, params=dict(restored.params), opt_state=opt_state, metadata=meta)


# ---------------------------------------------------------------------------
# Functions over a path (no manager kept open).


def read_metadata(path: epath.PathLike, step: int | None = None) -> CheckpointMetadata:
  """Metadata of a checkpoint (workdir, checkpoints dir or step dir; default latest step)."""
  directory, step = _locate(path, step)
  checkpointer = TrainCheckpointer(directory, read_only=True)
  try:
    return checkpointer.metadata(step)
  finally:
    checkpointer.close()


def restore_params_only(
    path: epath.PathLike,
    abstract_params: Mapping[str, Any],
    allow_missing: str | None = None,
    *,
    ignore_unused: str | None = None,
    step: int | None = None,
) -> dict[str, jax.Array]:
  """Loads only the params of a checkpoint (`train.init_from`: stage N+1 from stage N).

  `path` is a workdir, a checkpoints directory or one step directory (default:
  the latest step). Paths of `abstract_params` missing from the checkpoint are
  an error unless `allow_missing` (a regex, e.g. `lora_[ab]$`) matches them;
  they are left out of the result so the caller keeps their fresh init.
  Checkpoint params the model lacks are an error unless `ignore_unused` matches.
  The optimizer state and data state are never read.
  """
  directory, step = _locate(path, step)
  where = f"{directory}/{step}"
  abstract_params = _as_abstract(dict(abstract_params))
  checkpointer = TrainCheckpointer(directory, read_only=True)
  try:
    stored = _stored_names(checkpointer._stored(step)["params"])
  finally:
    checkpointer.close()
  missing_ok = re.compile(allow_missing) if allow_missing else None
  unused_ok = re.compile(ignore_unused) if ignore_unused else None
  _raise_if(where, _mismatches("params", stored, _leaf_names(abstract_params), missing_ok, unused_ok))
  target = {p: v for p, v in abstract_params.items() if p in stored}
  if not target:
    return {}
  try:
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          directory / str(step) / "params",
          args=ocp.args.PyTreeRestore(
              item=target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True,
          ),
      )
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{where}: {_one_line(e)}") from None
  return dict(restored)
