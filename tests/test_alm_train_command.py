"""The same `alm-jax train` command on 1 device and as 2 processes over loopback (FSDP across them)
writes the same loss curve — with the tiny config's several length and window buckets, so the
batches differ in shape from step to step and every process must form the same global batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


def _train(corpus, workdir, *extra, env=None, processes=1):
  from tests.helpers import REPO, TINY, cli_env  # pylint: disable=import-outside-toplevel  (workers lack `tests`)

  args = [sys.executable, "-m", "alm_jax", "train", "--config", TINY + ":micro", "--workdir", workdir,
          f"--config.data.path={corpus}", "--config.train.steps=3", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.eval_batches=0", "--config.data.batch_size=8",
          "--config.train.optimizer.eps=1e-6", "--config.train.optimizer.warmup_steps=0", *extra]
  if processes > 1:
    args = [os.path.join(REPO, "launch", "local.sh"), str(processes)] + args
  proc = subprocess.run(args, env=env or cli_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.multihost
def test_train_command_same_losses_on_one_device_and_two_processes(tmp_path):
  from tests.helpers import cli_env, make_corpus  # pylint: disable=import-outside-toplevel

  corpus = make_corpus(str(tmp_path / "corpus"), n=40)
  one = _train(corpus, str(tmp_path / "one"), "--config.mesh.shape=(1,1,1)")
  multi_env = cli_env(ALM_JAX_DEVICES_PER_PROCESS="1", ALM_JAX_INIT_TIMEOUT="120")
  two = _train(corpus, str(tmp_path / "two"), "--config.mesh.shape=(1,-1,1)", env=multi_env, processes=2)
  assert len(one) == 3 and one[-1] < one[0]
  np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
