"""Orbax training checkpoints: round trips, retention, iterator state, meshes, mismatches, preemption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from alm_jax.checkpoints.orbax import (
    CheckpointConfig,
    TrainCheckpointer,
    has_checkpoint,
    read_metadata,
    restore_params_only,
)
from alm_jax.config import ConfigError, from_dict
from alm_jax.errors import CheckpointError
from alm_jax.train import stages
from alm_jax.train.optimizer import OptimizerConfig, abstract_opt_state, make_optimizer
from alm_jax.train.preemption import PreemptionWatcher, install_preemption_handler

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "encoder/whisper/layers/0/fc1/kernel": (8, 16),
    "bridge/proj/kernel": (16, 8),
    "bridge/proj/bias": (8,),
    "llm/layers/0/mlp/up/kernel": (8, 16),
    "llm/final_norm/scale": (8,),
}
CONFIG = {"train": {"stage": "projector", "steps": 10}, "model": {"dim": 8}}


def make_params(shapes=SHAPES) -> dict:
  rng = np.random.default_rng(0)
  return {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}


def make_state(params=None, stage="projector"):
  """Params, mask, optimizer and a non-trivial opt state (one update taken)."""
  params = make_params() if params is None else params
  mask = stages.trainable_mask(params, stage)
  trainable, _ = stages.split(params, mask)
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2), trainable, total_steps=10)
  grads = jax.tree.map(lambda x: 0.1 * x + 0.01, trainable)
  _, opt_state = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
  return params, mask, tx, trainable, opt_state


def abstract(tree, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def assert_trees_equal(a, b, rtol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol)


def test_round_trip_with_metadata_and_iterator(tmp_path):
  params, mask, tx, trainable, opt_state = make_state()
  dataset = grain.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()
  iterator, reference = iter(dataset), iter(dataset)
  for _ in range(3):
    next(iterator), next(reference)
  with TrainCheckpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.save(7, params, opt_state, stage="projector", mask=mask, config=CONFIG, data_iterator=iterator,
                     metrics={"val_loss": 1.25, "loss": 2})
    assert not ckpt.save(7, params, opt_state, stage="projector", mask=mask)  # already there
  expected_next = [next(reference).tolist() for _ in range(2)]

  assert has_checkpoint(tmp_path) and not has_checkpoint(tmp_path / "nothing")
  meta = read_metadata(tmp_path)  # a workdir: finds checkpoints/ and the latest step
  assert (meta.step, meta.stage, meta.mask, meta.config) == (7, "projector", mask, CONFIG)
  assert meta.metrics == {"val_loss": 1.25, "loss": 2.0}
  assert set(meta.items) == {"params", "opt_state", "data", "meta"}

  fresh = iter(dataset)
  ckpt = TrainCheckpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 7 and json.loads(ckpt.data_state()) == {"next_index": 3}
  restored = ckpt.restore(None, abstract(params), jax.eval_shape(tx.init, trainable), data_iterator=fresh)
  ckpt.close()
  assert restored.step == 7 and restored.metadata == meta
  assert_trees_equal(restored.params, params)
  assert_trees_equal(restored.opt_state, opt_state)  # same namedtuple structure, same values
  assert [next(fresh).tolist() for _ in range(2)] == expected_next


class CountingIterator:
  """A non-Grain iterator with JSON (or bytes) state, as a custom data pipeline might have."""

  def __init__(self, as_bytes=False):
    self.position, self.as_bytes = 0, as_bytes

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    state = {"position": self.position}
    return json.dumps(state).encode() if self.as_bytes else state

  def set_state(self, state):
    self.position = (json.loads(state) if self.as_bytes else state)["position"]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_custom_iterator_state_round_trip(tmp_path, as_bytes):
  params = {"bridge/w": jnp.ones((2, 2))}
  iterator = CountingIterator(as_bytes)
  for _ in range(5):
    next(iterator)
  with TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False)) as ckpt:
    ckpt.save(1, params, stage="projector", mask={"bridge/w": True}, data_iterator=iterator)
    fresh = CountingIterator(as_bytes)
    ckpt.restore(1, abstract(params), data_iterator=fresh)
  assert next(fresh) == 6


def test_save_copies_arrays_so_caller_may_donate(tmp_path):
  params = {p: v + 0 for p, v in make_params().items()}
  expected = {p: np.asarray(v) for p, v in params.items()}
  with TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, params, stage="full", mask={p: True for p in params})
    for value in params.values():  # what a donated train step does to its inputs
      value.delete()
    ckpt.save(2, expected, stage="full", mask={p: True for p in params})  # waits for step 1 first
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    restored = ckpt.restore(1, abstract(make_params()))
  assert_trees_equal(restored.params, expected)
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_keep_last_n(tmp_path):
  params = {"bridge/w": jnp.zeros((2,))}
  with TrainCheckpointer(tmp_path, CheckpointConfig(keep_last=2)) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, {"bridge/w": jnp.full((2,), float(step))}, stage="projector", mask={"bridge/w": True})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [4, 5]
  with TrainCheckpointer(tmp_path) as ckpt:
    np.testing.assert_array_equal(ckpt.restore(None, abstract(params)).params["bridge/w"], [5.0, 5.0])


def test_keep_best_by_validation_loss(tmp_path):
  cfg = from_dict(CheckpointConfig, {"keep_best": 1, "keep_last": 1, "best_metric": "val_loss"}, "config.x")
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0, 6: None}
  with TrainCheckpointer(tmp_path, cfg) as ckpt:
    for step, loss in losses.items():
      metrics = {"val_loss": loss} if loss is not None else {"loss": 0.5}  # step 6: no validation run
      ckpt.save(step, {"bridge/w": jnp.zeros((2,))}, stage="projector", mask={"bridge/w": True}, metrics=metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6]  # the best, and the latest (to resume from)
    assert ckpt.best_step() == 2
  with TrainCheckpointer(tmp_path, cfg) as reopened:  # metrics are read back from disk
    assert reopened.best_step() == 2
    assert reopened.metadata(2).metrics == {"val_loss": 1.0}


def test_checkpoint_config_validation():
  with pytest.raises(ConfigError) as info:
    from_dict(CheckpointConfig, {"keep_last": 0}, "config.train.checkpoint")
  assert info.value.key == "config.train.checkpoint.keep_last"
  with pytest.raises(ConfigError) as info:
    from_dict(CheckpointConfig, {"best_mode": "lowest"}, "config.train.checkpoint")
  assert info.value.key == "config.train.checkpoint.best_mode"


def test_unfinalized_checkpoint_is_ignored(tmp_path):
  params, mask, *_ = make_state()
  later = {p: v + 1 for p, v in params.items()}
  with TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False)) as ckpt:
    ckpt.save(1, params, stage="projector", mask=mask)
  # What a run killed mid-save leaves: step 2 written into Orbax's temporary
  # directory but never renamed (finalised). Its content is complete here, so
  # only the missing finalisation can keep it from being used.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
  assert has_checkpoint(tmp_path) and read_metadata(tmp_path).step == 1
  with TrainCheckpointer(tmp_path, read_only=True) as reader:
    assert reader.latest_step() == 1 and reader.all_steps() == [1]
    assert_trees_equal(reader.restore(None, abstract(params)).params, params)
    with pytest.raises(CheckpointError, match="no checkpoint for step 2"):
      reader.restore(2, abstract(params))
  assert (tmp_path / "2.orbax-checkpoint-tmp").exists()  # a reader leaves it alone
  with TrainCheckpointer(tmp_path) as writer:  # the resumed run cleans up and re-saves step 2
    assert writer.save(2, later, stage="projector", mask=mask)
    writer.wait()
    assert writer.all_steps() == [1, 2]
    assert_trees_equal(writer.restore(None, abstract(params)).params, later)
  assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()


def test_metadata_reads_no_arrays(tmp_path):
  params, mask, *_ = make_state()
  with TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False)) as ckpt:
    ckpt.save(1, params, stage="projector", mask=mask, config=CONFIG, metrics={"val_loss": 0.5})
  for name in os.listdir(tmp_path / "1" / "params"):  # drop the array data, keep the tree metadata files
    if name == "d" or name.startswith("ocdbt."):
      shutil.rmtree(tmp_path / "1" / "params" / name)
  meta = read_metadata(tmp_path / "1")
  assert (meta.step, meta.stage, meta.mask, meta.metrics) == (1, "projector", mask, {"val_loss": 0.5})
  with TrainCheckpointer(tmp_path, read_only=True) as ckpt:  # but the arrays are gone
    message = _one_line_error(lambda: ckpt.restore(1, abstract(params)), str(tmp_path / "1"))
  assert len(message) < 500


def _one_line_error(call, *needles):
  with pytest.raises(CheckpointError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message
  return message


def test_mismatched_restore_is_one_line_error_naming_the_key(tmp_path):
  params, mask, tx, trainable, opt_state = make_state()
  with TrainCheckpointer(tmp_path, CheckpointConfig(async_save=False)) as ckpt:
    ckpt.save(1, params, opt_state, stage="projector", mask=mask)
    wrong_shape = {**abstract(params), "bridge/proj/kernel": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
    _one_line_error(lambda: ckpt.restore(1, wrong_shape), "params/bridge/proj/kernel", "(16, 8)", "(16, 4)")
    missing = {**abstract(params), "llm/layers/0/mlp/up/lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32)}
    _one_line_error(lambda: ckpt.restore(1, missing), "params/llm/layers/0/mlp/up/lora_a", "missing")
    fewer = {p: v for p, v in abstract(params).items() if p != "llm/final_norm/scale"}
    _one_line_error(lambda: ckpt.restore(1, fewer), "params/llm/final_norm/scale", "not expected")
    # An optimizer over a different trainable set (the lora stage's) does not fit.
    other = {**trainable, "llm/x/lora_a": jnp.zeros((8, 2))}
    other_tx = make_optimizer(OptimizerConfig(), other, total_steps=10)
    _one_line_error(lambda: ckpt.restore(1, abstract(params), jax.eval_shape(other_tx.init, other)),
                    "opt_state/", "llm/x/lora_a")
    _one_line_error(lambda: ckpt.restore(5, abstract(params)), "no checkpoint for step 5")
    ckpt.save(2, params, stage="projector", mask=mask)  # params only
    _one_line_error(lambda: ckpt.restore(2, abstract(params), jax.eval_shape(tx.init, trainable)), "no optimizer")
    _one_line_error(lambda: ckpt.restore(2, abstract(params), data_iterator=CountingIterator()), "no data-iterator")
  _one_line_error(lambda: TrainCheckpointer(tmp_path / "empty").restore(None, abstract(params)), "no finalized")
  _one_line_error(lambda: read_metadata(tmp_path / "empty"), "no finalized")


def test_restore_params_only_for_the_next_stage(tmp_path):
  params, mask, _, _, opt_state = make_state()
  with TrainCheckpointer(tmp_path / "checkpoints", CheckpointConfig(async_save=False)) as ckpt:
    ckpt.save(4, params, opt_state, stage="projector", mask=mask)
  # The lora stage's model has adapters the projector checkpoint lacks.
  lora_model = {**abstract(params), "llm/layers/0/mlp/up/lora_a": jax.ShapeDtypeStruct((8, 2), jnp.float32),
                "llm/layers/0/mlp/up/lora_b": jax.ShapeDtypeStruct((2, 16), jnp.float32)}
  loaded = restore_params_only(tmp_path, lora_model, allow_missing=r"(^|/)lora_[ab]$")
  assert set(loaded) == set(params)
  assert_trees_equal(loaded, params)
  _one_line_error(lambda: restore_params_only(tmp_path, lora_model), "params/llm/layers/0/mlp/up/lora_a", "missing")
  # A step directory works too; params the new model lacks must be allowed explicitly.
  smaller = {p: v for p, v in abstract(params).items() if not p.startswith("encoder/")}
  _one_line_error(lambda: restore_params_only(tmp_path / "checkpoints" / "4", smaller), "encoder/whisper")
  loaded = restore_params_only(tmp_path / "checkpoints" / "4", smaller, ignore_unused="^encoder/")
  assert set(loaded) == set(smaller)
  assert_trees_equal(loaded, {p: params[p] for p in smaller})


# ---------------------------------------------------------------------------
# Across meshes: save on 8 devices, restore on a (2, 4) mesh, on one device,
# and in this (1-device) process.


def _run(main: str, *args: str, devices: int = 1, **popen) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import test_orbax_checkpoint as t; t.{main}(*sys.argv[1:])"
  return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **popen)


def multi_device_main(directory: str) -> None:
  """Runs with 8 CPU devices: saves sharded state, restores it onto other meshes."""
  assert jax.device_count() == 8
  devices = np.array(jax.devices())
  mesh8 = Mesh(devices, ("fsdp",))
  spec8 = lambda x: P("fsdp") if x.ndim == 2 else P()  # noqa: E731
  params, mask, tx, trainable, opt_state = make_state()
  params = {p: jax.device_put(v, NamedSharding(mesh8, spec8(v))) for p, v in params.items()}
  trainable, _ = stages.split(params, mask)
  state_shardings = jax.tree.map(lambda s: s.sharding, abstract_opt_state(tx, abstract_like(trainable)))
  opt_state = jax.device_put(opt_state, state_shardings)
  assert params["bridge/proj/kernel"].sharding.spec == P("fsdp")
  with TrainCheckpointer(directory) as ckpt:
    ckpt.save(3, params, opt_state, stage="projector", mask=mask, config=CONFIG)

  mesh24 = Mesh(devices.reshape(2, 4), ("data", "model"))
  spec24 = lambda x: P("model", "data") if x.ndim == 2 else P("data")  # noqa: E731
  targets = {
      "mesh (2, 4)": {p: NamedSharding(mesh24, spec24(v)) for p, v in params.items()},
      "one device": {p: SingleDeviceSharding(devices[5]) for p in params},
  }
  for name, shardings in targets.items():
    target = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p]) for p, v in params.items()}
    target_trainable, _ = stages.split(target, mask)
    with TrainCheckpointer(directory, read_only=True) as ckpt:
      restored = ckpt.restore(None, target, abstract_opt_state(tx, target_trainable))
    for p, v in restored.params.items():
      assert v.sharding == shardings[p], (name, p, v.sharding)
      np.testing.assert_array_equal(np.asarray(v), np.asarray(params[p]))
    mu = restored.opt_state[1][0].mu["bridge/proj/kernel"]
    assert mu.sharding == shardings["bridge/proj/kernel"], (name, mu.sharding)
    assert_trees_equal(restored.opt_state, opt_state)
  print("multi-device OK", flush=True)


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_restore_onto_other_meshes(tmp_path):
  process = _run("multi_device_main", str(tmp_path), devices=8, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0 and "multi-device OK" in output, output[-3000:]
  # And in this process, which has a single device.
  params, mask, tx, trainable, opt_state = make_state()
  with TrainCheckpointer(tmp_path, read_only=True) as ckpt:
    restored = ckpt.restore(3, abstract(params), jax.eval_shape(tx.init, trainable))
  assert restored.params["bridge/proj/kernel"].sharding == SingleDeviceSharding(jax.devices()[0])
  assert_trees_equal(restored.params, params)
  assert_trees_equal(restored.opt_state, opt_state, rtol=1e-6)
  assert restored.metadata.config == CONFIG


# ---------------------------------------------------------------------------
# Preemption.


def test_watcher_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  watcher = PreemptionWatcher()
  with watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the handler runs between bytecodes of the main thread
      if watcher.requested:
        break
      time.sleep(0.01)
    assert watcher.requested and watcher.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) is before


def preempted_loop_main(directory: str) -> None:
  """A stand-in train loop: counts steps until SIGTERM, then saves and exits 0."""
  watcher = install_preemption_handler()
  params = {"bridge/w": jnp.zeros((4,))}
  with TrainCheckpointer(directory) as ckpt:
    for step in range(1, 100_000):
      params = {"bridge/w": params["bridge/w"] + 1.0}  # the "train step"
      if step == 3:
        print("ready", flush=True)
      if watcher.should_stop(step):
        ckpt.save(step, params, stage="projector", mask={"bridge/w": True}, config=CONFIG)
        print(f"saved {step}", flush=True)
        return
      time.sleep(0.005)
  raise SystemExit(3)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  process = _run("preempted_loop_main", str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  try:
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, output
  step = int(output.split("saved ")[1])
  assert step >= 3
  with TrainCheckpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == step
    restored = ckpt.restore(None, {"bridge/w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(restored.params["bridge/w"], np.full((4,), float(step)))
  assert restored.metadata.stage == "projector"
