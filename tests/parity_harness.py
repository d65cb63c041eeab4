"""Sharded-training parity on the production path: the step `alm-jax train` runs, on any mesh.

`run_step_in_subprocess(case_ref, runs)` starts a fresh Python with N CPU devices
(or N processes with `launch/local.sh`) and, for each run (a mesh, a compute
dtype and a number of accumulated micro-batches), builds the model with
`ParamLayout`, creates its parameters in their shards (`ParamLayout.init`),
the optimizer with `make_optimizer` and the step with `jit_train_step` — the
functions `Trainer` uses — and returns, per run, the losses, the updated
parameters, the compiled step's memory and collectives, and where each
parameter lives. A case is named `module:function` (tests/ is on the worker's
path), e.g. `run_step_in_subprocess("test_alm_sharding:alm_case", [{"shape": (1, 8, 1)}])`.

With `accum = k` the run splits the case's global batch into k micro-batches
of consecutive rows, so it must equal the k = 1 run on the whole batch.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class StepCase:
  """One parity experiment.

  Attributes:
    model_factory: `rngs -> nnx.Module` with `loss(batch) -> (loss, metrics)` (metrics with `target_tokens`
      and `tokens`), as `AudioLanguageModel` has.
    batch: the global batch as host numpy arrays, every field row-major (each process takes its rows).
    optimizer: an `OptimizerConfig` (the production optimizer is built from it).
    frozen: regex of parameter paths kept frozen (None: train everything).
    steps: optimizer steps on the same batch.
    seed: init seed.
  """

  model_factory: Callable[[Any], Any]
  batch: dict[str, np.ndarray]
  optimizer: Any
  frozen: str | None = None
  steps: int = 2
  seed: int = 0


@dataclasses.dataclass
class StepResult:
  """What one run produced (numpy / plain Python, picklable)."""

  run: dict[str, Any]
  mesh: dict[str, int]
  losses: list[float]
  params: dict[str, np.ndarray]
  frozen_dtypes: dict[str, str]
  memory: dict[str, int]
  state_bytes_per_device: int
  collectives: dict[str, int]
  entry_params: list[tuple[str, tuple[int, ...]]]
  leaves: dict[str, dict]
  placed_matches_init: bool
  largest_host_read_fraction: float
  process_grid: np.ndarray  # process index of each mesh position
  restored_checkpoints: dict[str, bool] = dataclasses.field(default_factory=dict)  # ckpt -> equal after restore
  # collectives whose results are not parameter-sized (aot.classify_collectives): kind, arrays, bytes, op_name,
  # integer (token ids and other indices)
  activation_collectives: list[dict] = dataclasses.field(default_factory=list)

  @property
  def key(self) -> tuple:
    return (tuple(self.mesh.values()), self.run.get("dtype", "float32"), self.run.get("accum", 1))


def _sizes(run: Mapping[str, Any]) -> tuple[int, ...]:
  return tuple(run.get("shape", (1, -1, 1))) + tuple(run.get("dcn_shape", (1, 1, 1)))


def _micro_batches(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
  """The global batch as `accum` micro-batches of consecutive rows, stacked on a leading axis."""
  rows = len(next(iter(batch.values())))
  assert rows % accum == 0, (rows, accum)
  return {k: np.asarray(v).reshape(accum, rows // accum, *np.shape(v)[1:]) for k, v in batch.items()}


def run_case(case: StepCase, run: Mapping[str, Any], host_params: Mapping[str, np.ndarray] | None = None,
             save_to: str | None = None, restore_from: Mapping[str, Mapping[str, np.ndarray]] | None = None
             ) -> tuple[StepResult, dict[str, np.ndarray]]:
  """Runs `case` once in this process (one of possibly several); returns the result and the initial params."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from alm_jax import aot, distributed, sharding
  from alm_jax.params import ParamLayout
  from alm_jax.train.optimizer import abstract_opt_state, make_optimizer
  from alm_jax.train.step import jit_train_step

  config = sharding.mesh_config_from({k: run[k] for k in ("shape", "dcn_shape") if k in run})
  devices = None  # all devices of all processes
  if -1 not in _sizes(run):
    count = int(np.prod(_sizes(run)))
    # A mesh that fits in one process's devices runs there, independently in every process (e.g. the
    # 1-device reference inside a multi-process run).
    devices = jax.local_devices()[:count] if count <= jax.local_device_count() else jax.devices()[:count]
  mesh = sharding.make_mesh(config, devices)
  rules = config.logical_rules
  dtype = jnp.bfloat16 if run.get("dtype", "float32") == "bfloat16" else jnp.float32
  accum = int(run.get("accum", 1))

  layout = ParamLayout(case.model_factory)
  placed_ok, read_fraction = True, 0.0
  if host_params is None or run.get("init") == "mesh":
    params = layout.init(case.seed, mesh, rules)  # created in its shards
    init_host = distributed.to_host(params)
  if host_params is not None:  # the checkpoint-import path: each device reads only its slice of a host array
    reads = []

    class Recorder:
      """A host array that records which fraction of it each read takes."""

      def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

      def __getitem__(self, index):
        part = self.array[index]
        reads.append(part.size / max(self.array.size, 1))
        return part

    placed = {p: layout.place(p, Recorder(host_params[p]), mesh, rules) for p in layout.paths}
    if run.get("init") == "mesh":
      placed_host = distributed.to_host(placed)
      placed_ok = all(np.array_equal(placed_host[p], init_host[p]) for p in layout.paths)
    params, init_host = placed, dict(host_params)
    partial_reads = [r for r in reads if r < 1.0]
    read_fraction = max(partial_reads) if partial_reads else 1.0
  trainable_paths = [p for p in layout.paths if not (case.frozen and re.search(case.frozen, p))]
  frozen_paths = [p for p in layout.paths if p not in trainable_paths]
  trainable = {p: params[p] for p in trainable_paths}
  frozen = {p: params[p] for p in frozen_paths}
  tx = make_optimizer(case.optimizer, {p: layout.abstract[p] for p in trainable_paths}, total_steps=10)
  opt_abstract = abstract_opt_state(tx, layout.abstract_sharded(mesh, rules, trainable_paths))
  opt_state = jax.jit(tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, opt_abstract))(trainable)

  case_batch = case.batch
  if "rows" in run:  # the first rows only (e.g. the same rows per device on a smaller mesh)
    case_batch = {k: np.asarray(v)[: int(run["rows"])] for k, v in case_batch.items()}
  host_batch = case_batch if accum == 1 else _micro_batches(case_batch, accum)
  lead = () if accum == 1 else (None,)
  axes = {k: lead + ("batch",) + (None,) * (np.ndim(v) - 1 - len(lead)) for k, v in host_batch.items()}
  batch_shardings = sharding.batch_shardings(host_batch, mesh, rules, axes)
  rows_per_batch = len(next(iter(case_batch.values()))) // accum
  row_sharding = NamedSharding(mesh, PartitionSpec(sharding.logical_to_spec(("batch",), rules)[0]))
  rows = distributed.process_rows(row_sharding, (rows_per_batch,))
  local = {k: (v[rows] if accum == 1 else v[:, rows]) for k, v in host_batch.items()}
  batch = distributed.global_batch(local, mesh, rules, axes=axes)

  jitted = jit_train_step(layout, tx, mesh, rules, trainable_paths=trainable_paths, frozen_paths=frozen_paths,
                          batch_shardings=batch_shardings, compute_dtype=dtype, grad_accum_steps=accum)
  compiled = jitted.lower(trainable, frozen, opt_state, batch).compile()
  report = aot.analyse(compiled, mesh)
  split = aot.classify_collectives(aot.collective_ops(compiled.as_text()), aot.parameter_sized_counts(
      layout.gathered_shapes(), mesh.shape))
  activation_collectives = [{"kind": op.kind, "arrays": op.arrays, "bytes": op.result_bytes, "op_name": op.op_name,
                             "integer": kind == aot.INDICES}
                            for kind in (aot.ACTIVATIONS, aot.INDICES) for op in split[kind]]
  batch_bytes = sum(int(np.prod(s.shard_shape(np.shape(x)))) * np.asarray(x).dtype.itemsize
                    for x, s in zip(jax.tree.leaves(host_batch), jax.tree.leaves(batch_shardings)))
  leaves = {}
  for path, s in layout.shardings(mesh, rules).items():
    shape = tuple(layout.abstract[path].shape)
    leaves[path] = {"shape": shape, "shard_shape": tuple(s.shard_shape(shape)), "spec": tuple(s.spec)}

  losses = []
  for _ in range(int(run.get("steps", case.steps))):
    trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch)
    losses.append(float(distributed.to_host(metrics["loss"])))
  params = {**trainable, **frozen}
  restored = {}
  if save_to or restore_from:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    if save_to:
      checkpointer.save(save_to, params, force=True)
      checkpointer.wait_until_finished()
    for path, expected in (restore_from or {}).items():
      got = distributed.to_host(checkpointer.restore(path, layout.abstract_sharded(mesh, rules)))
      restored[path] = got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
  result = StepResult(
      run=dict(run),
      mesh=dict(mesh.shape),
      losses=losses,
      params=distributed.to_host(params),
      frozen_dtypes={p: str(v.dtype) for p, v in frozen.items()},
      memory=dataclasses.asdict(report.memory),
      state_bytes_per_device=report.memory.arguments - batch_bytes,
      collectives={k: v.count for k, v in report.collectives.items()},
      entry_params=aot.entry_parameter_shapes(compiled.as_text()),
      leaves=leaves,
      placed_matches_init=placed_ok,
      largest_host_read_fraction=read_fraction,
      process_grid=np.vectorize(lambda d: d.process_index)(mesh.devices),
      restored_checkpoints=restored,
      activation_collectives=activation_collectives,
  )
  return result, init_host


def _load_case(ref: str) -> StepCase:
  module, _, name = ref.partition(":")
  return getattr(importlib.import_module(module), name)()


def worker_main(argv: Sequence[str]) -> int:
  """Subprocess entry: `--case mod:fn --runs JSON --out FILE`; process 0 pickles the results."""
  import argparse

  import jax

  from alm_jax import distributed

  parser = argparse.ArgumentParser()
  parser.add_argument("--case", required=True)
  parser.add_argument("--runs", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoint-dir", default=None, help="save each run's params; restore all into the last")
  args = parser.parse_args(argv)
  distributed.initialize()
  jax.config.update("jax_default_matmul_precision", "highest")
  case = _load_case(args.case)
  results, first_init, saved = [], None, {}
  runs = json.loads(args.runs)
  for i, run in enumerate(runs):
    # Only meshes over all devices are saved: a per-process mesh holds private copies, not one global array.
    global_mesh = -1 in _sizes(run) or int(np.prod(_sizes(run))) == jax.device_count()
    save_to = os.path.join(args.checkpoint_dir, f"run_{i}") if args.checkpoint_dir and global_mesh else None
    restore_from = saved if args.checkpoint_dir and i == len(runs) - 1 else None
    result, init_host = run_case(case, run, first_init, save_to, restore_from)
    if save_to:
      saved[save_to] = result.params
    first_init = init_host if first_init is None else first_init
    results.append(result)
    if distributed.is_main_process():
      print(f"run {run} mesh {result.mesh}: losses {result.losses} collectives {result.collectives}", flush=True)
  if distributed.is_main_process():
    with open(args.out, "wb") as f:
      pickle.dump(results, f)
  return 0


def run_step_in_subprocess(case_ref: str, runs: Sequence[Sequence[int] | Mapping[str, Any]], *, devices: int = 8,
                           processes: int = 1, checkpoints: bool = False, timeout: int = 900) -> list[StepResult]:
  """Runs `case_ref` (`module:function` returning a `StepCase`) for each run in a fresh process.

  A run is a mesh shape or a dict with `shape`, optional `dcn_shape`, `dtype` (`float32` / `bfloat16`
  compute), `accum` (micro-batches), `rows` (the case batch's first rows only), `steps` (instead of the
  case's) and `init` (`mesh`: create the parameters in this mesh's shards and
  check they equal the first run's placed shard by shard; by default later runs place the first run's
  initial parameters, as a checkpoint import does, which saves compiling an initialiser per mesh). `devices` CPU devices per process; `processes > 1` starts them
  with `launch/local.sh` (jax.distributed over loopback, gloo collectives). With `checkpoints`, each run's
  trained params are saved with Orbax and the last run restores all of them into its own shardings.
  Raises `AssertionError` with the worker's output if it fails.
  """
  runs = [dict(r) if isinstance(r, Mapping) else {"shape": list(r)} for r in runs]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "results.pkl")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--case", case_ref,
               "--runs", json.dumps(runs), "--out", out]
    if checkpoints:
      command += ["--checkpoint-dir", os.path.join(tmp, "checkpoints")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    # Tiny models: compiling dominates; LLVM's -O0 halves it and the classic fusion emitters cut it 3-4x
    # again (tests/helpers.py FAST_XLA; no fast math, and every run of the matrix compiles with the same flags).
    from tests.helpers import FAST_XLA  # pylint: disable=import-outside-toplevel

    env["XLA_FLAGS"] = FAST_XLA
    for key in ("ALM_JAX_COORDINATOR", "ALM_JAX_NUM_PROCESSES", "ALM_JAX_PROCESS_ID", "ALM_JAX_LOCAL_DEVICE_IDS"):
      env.pop(key, None)
    env["ALM_JAX_DISTRIBUTED"] = "auto" if processes > 1 else "off"  # never join a surrounding SLURM job
    if processes > 1:
      env["ALM_JAX_DEVICES_PER_PROCESS"] = str(devices)
      env["ALM_JAX_INIT_TIMEOUT"] = "120"
      command = [os.path.join(REPO, "launch", "local.sh"), str(processes)] + command
    else:
      env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(out):
      raise AssertionError(f"worker failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    with open(out, "rb") as f:
      return pickle.load(f)


def assert_same_training(result: StepResult, reference: StepResult, tolerance: float) -> None:
  """Losses and updated params of `result` equal `reference`'s within `tolerance` (absolute)."""
  np.testing.assert_allclose(result.losses, reference.losses, atol=tolerance, rtol=0,
                             err_msg=f"losses of {result.run}")
  assert result.params.keys() == reference.params.keys()
  for name, want in reference.params.items():
    np.testing.assert_allclose(result.params[name], want, atol=tolerance, rtol=0, err_msg=f"{name} in {result.run}")


if __name__ == "__main__" and "--worker" in sys.argv:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import parity_harness as _harness  # run as the importable module so case refs resolve to the same classes

  sys.exit(_harness.worker_main([a for a in sys.argv[1:] if a != "--worker"]))
