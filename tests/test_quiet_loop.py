"""The train loop does not wait on the devices between fetch points: no device-to-host transfer
between log/validation/checkpoint steps, a non-finite step is still caught before anything after
it is saved, and prefetched batches do not leak into the data-iterator state a checkpoint saves."""

import contextlib
import json
import os

import jax.numpy as jnp
import pytest

from alm_jax.train.prefetch import BatchPrefetcher


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  from tests.helpers import make_corpus  # pylint: disable=import-outside-toplevel

  return make_corpus(str(tmp_path_factory.mktemp("corpus")), n=32)


def _trainer(corpus: str, workdir: str, **train):
  """A micro-model Trainer with one batch shape (one compile), in this process, transfers guarded."""
  from alm_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from alm_jax.run_config import validate  # pylint: disable=import-outside-toplevel
  from alm_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import TINY  # pylint: disable=import-outside-toplevel

  config = load_config(TINY + ":micro")
  config.data.path = corpus
  config.data.batch_size = 4
  config.data.length_buckets = (128,)
  config.data.window_buckets = (4,)
  config.train.update({"steps": 6, "eval_batches": 0, **train})
  return Trainer(validate(config), workdir, quiet=True, guard_transfers=True)


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _saved(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _wrap_step(trainer, after):
  """Wraps the trainer's compiled train steps: `after(call_number, outputs)` may replace a step's outputs."""
  original = trainer.compiled_train_step
  calls = [0]

  def compiled_train_step(state, batch):
    compiled = original(state, batch)

    def step(*args):
      calls[0] += 1
      return after(calls[0], compiled(*args))

    return step

  trainer.compiled_train_step = compiled_train_step


class HostReadError(AssertionError):
  """A device value was read (or waited for) on the host between fetch points."""


def _forbid_host_reads_in_steady_steps(monkeypatch) -> list[int]:
  """Makes any host read of a jax.Array (jax.device_get, float(), .item(), .tolist(), block_until_ready)
  raise while the Trainer is inside `_steady()`, the steps between fetch points; returns a counter of
  the steps entered. On CPU, JAX's device-to-host transfer guard (which `guard_transfers=True` turns on
  there too, and which catches these on GPU/TPU) lets them through: CPU arrays are already in host memory.
  """
  from jax._src import array  # pylint: disable=import-outside-toplevel

  from alm_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel

  steady = [0]
  inside = [False]
  value, block = array.ArrayImpl._value, array.ArrayImpl.block_until_ready

  def guarded_value(self):
    if inside[0]:
      raise HostReadError("a device value was read on the host between fetch points")
    return value.fget(self)

  def guarded_block(self):
    if inside[0]:
      raise HostReadError("the host waited for the devices between fetch points")
    return block(self)

  original = Trainer._steady

  @contextlib.contextmanager
  def watched_steady(self):
    with original(self):
      steady[0] += 1
      inside[0] = True
      try:
        yield
      finally:
        inside[0] = False

  monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded_value))
  monkeypatch.setattr(array.ArrayImpl, "block_until_ready", guarded_block)
  monkeypatch.setattr(Trainer, "_steady", watched_steady)
  return steady


@pytest.mark.slow
def test_steps_between_fetch_points_make_no_device_to_host_transfer(corpus, tmp_path, monkeypatch):
  # Every step's dispatch (batch from the prefetcher, train step, next batches loaded) runs where a host
  # read raises; the metrics come to the host only at steps 3 and 6 (log, validation, checkpoint).
  # Checked by hand: a jax.device_get(metrics) put back after the step call fails this test.
  steady = _forbid_host_reads_in_steady_steps(monkeypatch)
  workdir = str(tmp_path / "run")
  trainer = _trainer(corpus, workdir, log_every=3, checkpoint_every=3, eval_batches=1, prefetch_batches=2)
  result = trainer.run()
  assert result["step"] == 6 and steady[0] == 6
  records = _records(workdir)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [3, 6]
  for record in train:
    for key in ("loss", "grad_norm", "token_accuracy", "learning_rate", "step_time", "tokens_per_s", "mfu"):
      assert key in record and record[key] == record[key], key  # present and not NaN
    assert record["step_time"] > 0 and record["tokens_per_s"] > 0
  assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
  assert _saved(workdir) == [3, 6]


@pytest.mark.slow
def test_a_non_finite_step_between_fetch_points_stops_the_run_before_the_next_save(corpus, tmp_path):
  from alm_jax.train.loop import TrainingError  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  trainer = _trainer(corpus, workdir, log_every=4, checkpoint_every=2)

  def poison_step_3(call, outputs):
    trainable, opt_state, metrics = outputs
    if call == 3:  # as the step reports a refused update (it returns the old state; here any state will do)
      metrics = {**metrics, "loss": metrics["loss"] * jnp.nan, "finite": jnp.zeros_like(metrics["finite"])}
    return trainable, opt_state, metrics

  _wrap_step(trainer, poison_step_3)
  with pytest.raises(TrainingError, match=r"non-finite loss \(nan\).* at step 3;.*nothing was saved after step 2"):
    trainer.run()
  # Step 3 is found at the step-4 checkpoint's fetch, before that checkpoint is written.
  assert _saved(workdir) == [2]
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or not any(
      "loss" in r for r in _records(workdir))


@pytest.mark.slow
def test_a_stop_between_checkpoints_resumes_exactly_despite_prefetched_batches(corpus, tmp_path, monkeypatch):
  # Preempted after step 3 with 2 batches read ahead: the checkpoint must hold the data iterator as step
  # 3 left it, so the resumed steps 4-6 see the batches (and give the losses) of an uninterrupted run.
  from alm_jax.train import loop  # pylint: disable=import-outside-toplevel

  reference = str(tmp_path / "reference")
  _trainer(corpus, reference, log_every=1, checkpoint_every=6).run()
  want = {r["step"]: r["loss"] for r in _records(reference) if "loss" in r}
  assert sorted(want) == [1, 2, 3, 4, 5, 6]

  watchers = []
  install = loop.install_preemption_handler
  monkeypatch.setattr(loop, "install_preemption_handler", lambda **kw: watchers.append(install(**kw)) or watchers[-1])
  run = str(tmp_path / "run")
  trainer = _trainer(corpus, run, log_every=1, checkpoint_every=6)

  def stop_at_3(call, outputs):
    if call == 3:
      watchers[-1].request()
    return outputs

  _wrap_step(trainer, stop_at_3)
  assert trainer.run()["step"] == 3
  assert _saved(run) == [3]
  monkeypatch.setattr(loop, "install_preemption_handler", install)
  _trainer(corpus, run, log_every=1, checkpoint_every=6).run()
  got = {r["step"]: r["loss"] for r in _records(run) if "loss" in r}
  assert sorted(got) == sorted(want)
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got[step], want[step])


class _Counter:
  """A data iterator whose state is the number of batches taken."""

  def __init__(self):
    self.taken = 0

  def __next__(self):
    self.taken += 1
    return self.taken

  def get_state(self):
    return {"taken": self.taken}

  def set_state(self, state):
    self.taken = state["taken"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_reports_the_state_after_the_consumed_batch_and_reads_no_further_than_its_limit(depth):
  counter = _Counter()
  prefetcher = BatchPrefetcher(counter, lambda: next(counter), depth, limit=5)
  for want in range(1, 6):
    assert prefetcher.next() == want
    prefetcher.fill()
    assert prefetcher.waiting == min(depth, 5 - want)
    assert counter.taken == want + prefetcher.waiting
    saved = prefetcher.consumed_state()
    assert saved.get_state() == {"taken": want}
  assert counter.taken == 5
  with pytest.raises(StopIteration):
    prefetcher.next()
  saved.set_state({"taken": 2})  # a restore goes to the real iterator
  assert counter.taken == 2
