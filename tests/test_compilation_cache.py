"""`train.compilation_cache_dir`: a second run with the same cache folder loads the compiled train and
eval steps from JAX's persistent cache instead of compiling them (fresh processes, as a rerun is)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, cli_env, make_corpus

WORKER = """
import json, sys
import jax

hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
from alm_jax.config import load_config
from alm_jax.run_config import validate
from alm_jax.train.loop import Trainer

corpus, workdir, cache = sys.argv[1:4]
config = load_config(sys.argv[4] + ":micro")
config.data.path = corpus
config.data.batch_size = 4
config.data.length_buckets = (128,)
config.data.window_buckets = (4,)
config.train.update({"steps": 2, "log_every": 1, "checkpoint_every": 2, "eval_batches": 1,
                     "compilation_cache_dir": cache})
trainer = Trainer(validate(config), workdir, quiet=True)
trainer.run()
print("RESULT " + json.dumps({"hits": len(hits), "compile_seconds": trainer.compile_seconds,
                              "cache_dir": jax.config.jax_compilation_cache_dir}))
"""


def _train(corpus: str, workdir: str, cache: str) -> dict:
  env = cli_env(PYTHONPATH=REPO)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test session's shared cache (conftest) would take precedence
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  proc = subprocess.run([sys.executable, "-c", WORKER, corpus, workdir, cache, TINY], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_a_second_run_loads_the_compiled_steps_from_the_persistent_cache(tmp_path):
  corpus = make_corpus(str(tmp_path / "corpus"), n=16)
  first = str(tmp_path / "first")
  cold = _train(corpus, first, "")  # "": <workdir>/compile_cache
  cache = os.path.join(first, "compile_cache")
  assert cold["cache_dir"] == cache
  assert cold["hits"] == 0
  assert os.path.isdir(cache) and len(os.listdir(cache)) >= 2  # at least the train and the eval step
  warm = _train(corpus, str(tmp_path / "second"), cache)  # a new workdir sharing the first one's cache
  assert warm["hits"] >= 2
  assert warm["compile_seconds"] < cold["compile_seconds"]
  print(f"train-step compile: cold {cold['compile_seconds']:.2f} s, cached {warm['compile_seconds']:.2f} s")


def test_none_sets_no_cache_and_the_environment_wins(tmp_path, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel

  from alm_jax.train import loop  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert loop.use_compilation_cache("", str(tmp_path / "run")) == str(tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    path = loop.use_compilation_cache("", str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "compile_cache") == jax.config.jax_compilation_cache_dir
    assert loop.use_compilation_cache("none", str(tmp_path / "run")) is None
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

    compilation_cache.reset_cache()
