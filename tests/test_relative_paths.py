"""Every command takes paths relative to the current directory (Orbax itself wants absolute ones).

A new user runs `alm-jax generate --ckpt workdir/demo/stages/full ...` from the
repository root; this drives the real CLI from a temporary current directory
with relative paths only: corpus → packed shards → stage 1 → stage 2
(`init_from`) → generate → eval. Both stages are projector stages, whose
train step compiles fastest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alm_jax.checkpoints import orbax as ckpt_lib
from tests.helpers import REPO, TINY, cli_env

TRAIN = ("train", "--config", TINY + ":micro,projector", "--config.train.steps=1",
         "--config.train.checkpoint_every=1", "--config.train.eval_batches=0", "--config.data.batch_size=4",
         "--config.data.length_buckets=(128,)", "--config.data.window_buckets=(4,)")


def _run(cwd: str, *args: str) -> str:
  """`python -m alm_jax ARGS` in `cwd`; returns stdout, failing the test on a non-zero exit."""
  env = cli_env(
      PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),  # this checkout's package
      # Both stages compile the same train step; the second reads it from this cache (saves ~15 s).
      JAX_COMPILATION_CACHE_DIR=os.path.join(cwd, "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  proc = subprocess.run([sys.executable, "-m", "alm_jax", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, f"alm-jax {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


def test_checkpoint_functions_take_relative_and_home_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path))
  params = {"llm/w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  with ckpt_lib.TrainCheckpointer(os.path.join("run", "checkpoints"), ckpt_lib.CheckpointConfig(async_save=False)) as c:
    assert c.directory == tmp_path / "run" / "checkpoints"
    c.save(1, params, stage="full", mask={"llm/w": True})
  for path in ("run", "./run/checkpoints", "run/checkpoints/1", "~/run"):
    assert ckpt_lib.has_checkpoint(path) and ckpt_lib.read_metadata(path).step == 1, path
    restored = ckpt_lib.restore_params_only(path, params)
    np.testing.assert_array_equal(np.asarray(restored["llm/w"]), params["llm/w"])


@pytest.mark.slow
def test_train_init_from_generate_eval_with_relative_paths(tmp_path):
  cwd = str(tmp_path)
  _run(cwd, "data", "synth", "--out", "corpus", "--n", "24", "--workers", "1")
  _run(cwd, "data", "pack", "corpus/train.jsonl", "packed")
  assert (tmp_path / "packed" / "train-00000-of-00001.array_record").is_file()

  _run(cwd, *TRAIN, "--workdir", "run", "--config.data.path=corpus")
  _run(cwd, *TRAIN, "--workdir", "stages/run2", "--config.train.init_from=run", "--config.data.path=packed",
       "--config.data.tokenizer=corpus/tokenizer.json")
  for workdir in ("run", "stages/run2"):
    assert (tmp_path / workdir / "checkpoints" / "1").is_dir(), workdir
    assert (tmp_path / workdir / "tokenizer.json").is_file(), workdir

  with open(tmp_path / "corpus" / "test.jsonl") as f:
    audio = os.path.join("corpus", json.loads(f.readline())["audio"][0])
  assert (tmp_path / audio).is_file()
  _run(cwd, "generate", "--ckpt", "stages/run2", "--audio", audio, "--prompt", "What is this?", "--max-new-tokens", "2")

  _run(cwd, "eval", "--ckpt", "stages/run2/checkpoints", "--benchmark", "mmau", "--data", "corpus/test.jsonl",
       "--out", "reports/report.json", "--limit", "1", "--batch-size", "1", "--max-new-tokens", "2")
  with open(tmp_path / "reports" / "report.json") as f:
    report = json.load(f)
  assert report["n"] == 1 and report["checkpoint"] == str(tmp_path / "stages" / "run2" / "checkpoints")
