"""Multi-process runs: environment detection, the launchers, and 2 processes x 2 CPU devices over loopback.

The training parity run starts two processes with `launch/local.sh`; they join
with `jax.distributed` (gloo collectives on CPU), each feeds only its rows of
the global batch, and Orbax checkpoints are written and read by both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from alm_jax import distributed
from alm_jax.config import ConfigError
from parity_harness import REPO, assert_same_training, run_step_in_subprocess
from test_alm_sharding import BF16_TOLERANCE, F32_TOLERANCE

LOCAL = os.path.join(REPO, "launch", "local.sh")

# ----------------------------------------------------------------------------
# Where a process learns its place in the run.


def test_detect_single_process_by_default():
  assert distributed.detect(environ={}, tpu_vm=False) == distributed.ClusterSpec("single")
  assert not distributed.detect(environ={}, tpu_vm=False).distributed


def test_detect_from_launcher_environment():
  env = {"ALM_JAX_COORDINATOR": "10.0.0.1:1234", "ALM_JAX_NUM_PROCESSES": "4", "ALM_JAX_PROCESS_ID": "3",
         "ALM_JAX_LOCAL_DEVICE_IDS": "0,1"}
  assert distributed.detect(environ=env, tpu_vm=False) == distributed.ClusterSpec(
      "env", "10.0.0.1:1234", 4, 3, (0, 1))


def test_flags_take_precedence_over_environment():
  env = {"ALM_JAX_COORDINATOR": "10.0.0.1:1234", "ALM_JAX_NUM_PROCESSES": "4", "ALM_JAX_PROCESS_ID": "3"}
  spec = distributed.detect("h:9", 2, 1, "5", environ=env, tpu_vm=False)
  assert spec == distributed.ClusterSpec("flags", "h:9", 2, 1, (5,))


def test_slurm_fills_process_count_and_id():
  slurm = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
  # The sbatch script exports only the coordinator; the rest comes from SLURM.
  spec = distributed.detect(environ=dict(slurm, ALM_JAX_COORDINATOR="node01:23456"), tpu_vm=False)
  assert spec == distributed.ClusterSpec("env", "node01:23456", 16, 5, None)
  # Bare `srun`: JAX's SLURM detection finds the coordinator.
  assert distributed.detect(environ=slurm, tpu_vm=False) == distributed.ClusterSpec("slurm", None, 16, 5, None)
  # A one-task allocation is a single process.
  assert distributed.detect(environ=dict(slurm, SLURM_NTASKS="1", SLURM_PROCID="0"), tpu_vm=False).source == "single"


def test_tpu_vm_and_modes():
  assert distributed.detect(environ={}, tpu_vm=True).source == "tpu"
  assert distributed.detect(environ={"ALM_JAX_DISTRIBUTED": "on"}, tpu_vm=False).source == "on"
  assert distributed.detect(environ={"ALM_JAX_DISTRIBUTED": "off"}, tpu_vm=True).source == "single"
  with pytest.raises(ConfigError, match="ALM_JAX_DISTRIBUTED: must be auto, off or on"):
    distributed.detect(environ={"ALM_JAX_DISTRIBUTED": "yes"})


@pytest.mark.parametrize(
    "args,env,pattern",
    [
        ((None, None, 1), {}, r"--coordinator: multi-process run needs"),
        (("h:1", 2, None), {}, r"--process-id: multi-process run needs"),
        (("h:1", 2, 2), {}, r"--process-id: must be in \[0, 2\), got 2"),
        (("h", 2, 0), {}, r"--coordinator: expected host:port"),
        ((None, None, None), {"ALM_JAX_NUM_PROCESSES": "two"}, r"ALM_JAX_NUM_PROCESSES: expected an integer"),
        ((None, None, None), {"ALM_JAX_PROCESS_ID": "0"}, r"ALM_JAX_COORDINATOR: multi-process run needs"),
    ],
)
def test_incomplete_settings_name_the_missing_piece(args, env, pattern):
  with pytest.raises(ConfigError, match=pattern):
    distributed.detect(*args, environ=env, tpu_vm=False)


# ----------------------------------------------------------------------------
# Launchers.


def _run(command, env=None, timeout=60):
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def test_local_launcher_gives_each_process_its_identity_and_devices():
  script = ("import os; print(os.environ['ALM_JAX_PROCESS_ID'], os.environ['ALM_JAX_NUM_PROCESSES'], "
            "os.environ['ALM_JAX_COORDINATOR'], os.environ['XLA_FLAGS'].split()[-1])")
  proc = _run([LOCAL, "3", sys.executable, "-c", script], env={"ALM_JAX_DEVICES_PER_PROCESS": "2"})
  assert proc.returncode == 0, proc.stderr
  lines = sorted(proc.stdout.splitlines())
  assert [line.split()[:3] for line in lines] == [["[p0]", "0", "3"], ["[p1]", "1", "3"], ["[p2]", "2", "3"]]
  coordinators = {line.split()[3] for line in lines}
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
  assert all(line.endswith("--xla_force_host_platform_device_count=2") for line in lines)


def test_local_launcher_fails_when_one_process_fails_and_stops_the_rest():
  # Process 0 fails at once; process 1 would wait a minute (as in a collective) unless stopped.
  script = "import os, sys, time; i = int(os.environ['ALM_JAX_PROCESS_ID']); time.sleep(60 * i); sys.exit(3)"
  proc = _run([LOCAL, "2", sys.executable, "-c", script], timeout=50)
  assert proc.returncode == 3
  assert "process 0 exited with status 3; stopping the others" in proc.stderr


def test_local_launcher_rejects_bad_usage():
  assert _run([LOCAL]).returncode == 2
  assert _run([LOCAL, "two", "true"]).returncode == 2


def test_tpu_pod_launcher_runs_on_all_workers_and_collects_logs(tmp_path):
  proc = _run([os.path.join(REPO, "launch", "tpu_pod.sh"), "--tpu", "pod1", "--zone", "us-east5-a", "--project", "p",
               "--env", "FOO=1", "--log-dir", str(tmp_path), "--dry-run", "--",
               "alm-jax", "train", "--config", "configs/tiny.py"])
  assert proc.returncode == 0, proc.stderr
  run_line = next(line for line in proc.stdout.splitlines() if "ssh" in line)
  assert "--worker=all" in run_line and "pod1" in run_line and "us-east5-a" in run_line
  assert "ALM_JAX_DISTRIBUTED=on" in run_line and "FOO=1" in run_line and "alm-jax\\ train" in run_line
  assert "tee" in run_line and "--worker=0" in next(line for line in proc.stdout.splitlines() if " scp " in line)
  assert _run([os.path.join(REPO, "launch", "tpu_pod.sh"), "--", "true"]).returncode == 2  # no --tpu/--zone


def test_slurm_script_sets_coordinator_and_per_task_ids(tmp_path):
  env = {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu001", "ALM_JAX_DRY_RUN": "1",
         "SLURM_GPUS_ON_NODE": "8", "ALM_JAX_LOG_DIR": str(tmp_path)}
  proc = _run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "alm-jax", "train"], env=env)
  assert proc.returncode == 0, proc.stderr
  assert "ALM_JAX_NUM_PROCESSES=4" in proc.stdout and ":21234" in proc.stdout  # port 20000 + job id % 20000
  assert "srun --kill-on-bad-exit=1" in proc.stdout and "alm-jax train" in proc.stdout.replace("\\ ", " ")
  # The per-task snippet turns SLURM's ids into ours.
  assert "ALM_JAX_PROCESS_ID=\\$SLURM_PROCID" in proc.stdout or "ALM_JAX_PROCESS_ID=$SLURM_PROCID" in proc.stdout


# ----------------------------------------------------------------------------
# Two processes x two devices.

RUNS = [
    {"shape": (1, 1, 1)},  # per-process 1-device reference
    {"shape": (1, -1, 1), "init": "mesh"},  # FSDP over both processes, parameters created in their shards
    # hybrid: DCN data parallel, FSDP within a process, with the pod settings (bf16 compute, accumulation)
    {"shape": (1, 2, 1), "dcn_shape": (2, 1, 1), "dtype": "bfloat16", "accum": 2},
]


@pytest.mark.slow
@pytest.mark.multihost
def test_two_processes_train_like_one_device_and_share_checkpoints():
  results = run_step_in_subprocess("test_alm_sharding:alm_case", RUNS, devices=2, processes=2, checkpoints=True)
  reference = results[0]
  assert reference.mesh == {"data": 1, "fsdp": 1, "tensor": 1}
  assert results[1].mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert_same_training(results[1], reference, F32_TOLERANCE)
  assert results[1].placed_matches_init
  assert_same_training(results[2], reference, BF16_TOLERANCE)
  for result in results[1:]:
    assert set(np.unique(result.process_grid)) == {0, 1}
  # The DCN axis is the process: data index i lives on process i.
  np.testing.assert_array_equal(results[2].process_grid[:, :, 0], [[0, 0], [1, 1]])
  assert results[1].collectives["all-gather"] > 0
  # The last run restored the checkpoint both processes wrote on the FSDP mesh, resharded to its own layout.
  assert len(results[2].restored_checkpoints) == 1 and all(results[2].restored_checkpoints.values())
