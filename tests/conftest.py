"""Shared test set-up: float32 everywhere, CPU backend, quiet logs, one compilation cache per run."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TPU topology compiles (libtpu, no TPU needed) in parallel test workers and their subprocesses: libtpu's
# lock file would refuse all but one process at a time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Several tests (and the CLI and worker subprocesses they start, which inherit this) compile the same
# programs: the micro config's train steps, the resumed run of a kill-and-resume test, the processes of a
# multi-process run. One persistent cache per test run (fresh each run, shared by the xdist workers) lets
# them compile once. It changes no numerics: a hit is the same executable.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"alm_jax-test-jit-{_RUN}"))
# The tests' own compiles of tiny models use the same fast, unoptimised XLA as their CLI subprocesses
# (helpers.FAST_XLA): compiling dominates them (the whole suite ran 1313 s -> 1064 s on 2 cores, 2026-12-02).
# A test that is about what the optimising compiler does asks for it per compile (`OPTIMISED_XLA`).
from helpers import FAST_XLA  # noqa: E402  (tests/ is on sys.path, as for the tests' own imports)

os.environ.setdefault("XLA_FLAGS", FAST_XLA)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# With `--dist loadfile` each file goes to one worker whole, and xdist hands files out in collection order
# (pytest.ini turns off its default reordering by number of tests, which sent the one-test files that run for
# minutes last, so one worker finished them alone). The files that take longest go first, as measured
# (seconds in the full suite on 2 busy cores: only their order matters); the rest follow in their usual order.
# Only the order changes.
SLOW_FILES = {
    "test_alm_sharding.py": 400, "test_alm_sharding_bf16.py": 340, "test_demo.py": 325, "test_eval_mesh.py": 220,
    "test_train_loop.py": 175, "test_multihost.py": 165, "test_relative_paths.py": 125, "test_aot.py": 120,
    "test_alm_train_command.py": 110, "test_compile_fit.py": 100, "test_precision.py": 70,
    "test_quiet_loop.py": 100, "test_compilation_cache.py": 65,  # measured alone (-n 0) on the busy cores
}


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: -SLOW_FILES.get(item.path.name, 0))  # stable: file order otherwise unchanged
