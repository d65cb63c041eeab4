"""Shared test helpers: running the CLI in a subprocess and building a small corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# XLA flags for CPU subprocesses of tests, where compiling tiny models dominates: LLVM at -O0 and XLA's classic
# elemental fusion emitters instead of the MLIR fusion emitters (3-4x faster to compile the ALM train step on CPU,
# measured). Neither enables fast math; every run a test compares with another gets the same flags. TPU
# compiles (`alm-jax compile --topology v5p:...`) ignore both.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# The compiler's defaults, for a compile (`.lower(...).compile(OPTIMISED_XLA)`) in a test process that runs
# with FAST_XLA (conftest.py) but checks what the optimised program computes.
OPTIMISED_XLA = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def cli_env(**extra: str) -> dict[str, str]:
  """Environment for CLI subprocesses: CPU only, fast (unoptimised) XLA compiles; libtpu (for `alm-jax
  compile --topology v5p:...`, which only compiles) may load while another test process holds its lock."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=FAST_XLA,
             PYTHONUNBUFFERED="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.update(extra)
  return env


def run_worker(code: str, *args: str, tag: str, devices: int = 8, timeout: float = 300) -> dict:
  """Runs `python -c code args...` on `devices` CPU devices (fast unoptimised compiles) and returns the JSON
  the worker printed after `tag + " "`; a failing worker fails the test with its output."""
  env = cli_env(PYTHONPATH=REPO,
                XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.split(tag + " ", 1)[1])


def alm_jax(*args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
  """Runs `python -m alm_jax ARGS...` and returns the completed process (text output)."""
  return subprocess.run([sys.executable, "-m", "alm_jax", *args], capture_output=True, text=True, timeout=timeout,
                        env=cli_env(), cwd=REPO, **popen)


def start_alm_jax(*args: str, log_path: str) -> subprocess.Popen:
  """Starts `python -m alm_jax ARGS...` in the background, output to `log_path`."""
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, "-m", "alm_jax", *args], stdout=log, stderr=subprocess.STDOUT,
                          env=cli_env(), cwd=REPO)


def make_corpus(out: str, n: int = 48, seed: int = 0) -> str:
  """A small synthetic corpus (train/validation/test + tokenizer) in `out`."""
  from alm_jax.data import synth  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(os.path.join(out, "corpus.json")):
    synth.write_corpus(out, n, seed=seed)
  return out
