"""The train loop end to end on a micro model: metrics files, SIGTERM saves and exits
cleanly, and a run killed with SIGKILL resumes with exactly the uninterrupted loss curve."""

import json
import os
import signal
import time

import pytest

from tests.helpers import TINY, alm_jax, make_corpus, start_alm_jax

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(str(tmp_path_factory.mktemp("corpus")), n=48)


def train_args(corpus, workdir):
  return ("train", "--config", TINY + ":micro", "--workdir", workdir, f"--config.data.path={corpus}",
          f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
          "--config.train.eval_batches=1", "--config.data.batch_size=4", "--config.data.length_buckets=(128,)",
          "--config.data.window_buckets=(4,)")


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def steps_saved(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def wait_for(predicate, process, timeout=300):
  start = time.time()
  while time.time() - start < timeout:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f"process ended early with code {process.returncode}")
    time.sleep(0.2)
  raise AssertionError("timed out")


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(corpus, tmp_path):
  reference = str(tmp_path / "reference")
  result = alm_jax(*train_args(corpus, reference))
  assert result.returncode == 0, result.stderr[-3000:]
  want = losses(reference)
  assert sorted(want) == list(range(1, STEPS + 1))
  for name in ("metrics.jsonl", "tokenizer.json"):
    assert os.path.isfile(os.path.join(reference, name))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(reference, "tensorboard")))
  first = json.loads(open(os.path.join(reference, "metrics.jsonl")).readline())
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s"):
    assert key in first

  run = str(tmp_path / "interrupted")
  # SIGTERM (preemption): the run saves where it is and exits cleanly.
  process = start_alm_jax(*train_args(corpus, run), log_path=str(tmp_path / "term.log"))
  wait_for(lambda: os.path.exists(os.path.join(run, "metrics.jsonl")) and len(losses(run)) >= 3, process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0, open(tmp_path / "term.log").read()[-3000:]
  stopped_at = max(steps_saved(run))
  assert stopped_at >= 3 and stopped_at < STEPS

  # SIGKILL (a crash) after one more checkpoint: nothing is saved on the way out.
  process = start_alm_jax(*train_args(corpus, run), log_path=str(tmp_path / "kill.log"))
  wait_for(lambda: max(steps_saved(run)) > stopped_at and len(losses(run)) > max(steps_saved(run)), process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)

  result = alm_jax(*train_args(corpus, run))
  assert result.returncode == 0, result.stderr[-3000:]
  got = losses(run)
  assert sorted(got) == sorted(want)
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got[step], want[step])
