"""Audio-aware packing: several examples per row train exactly as one example per row.

The pipeline packs training rows (each example a segment with its own clips); the model restarts positions
and keeps attention inside each segment. Checked here on the micro model: the loss and gradients of a packed
batch equal those of the same examples one per row; changing one segment (its tokens or its audio) leaves the
other segments' logits alone (the model's xla attention here; every implementation's segment masking is
checked against the numpy reference in test_attention.py); the packed train split covers every example once
and pads far less.
"""

import collections
import dataclasses

import jax
import numpy as np
import pytest

from alm_jax.data.batch_checks import check_audio_slots
from alm_jax.data.examples import Prepare
from alm_jax.data.pipeline import collate, make_dataset
from alm_jax.data.sources import open_source
from helpers import TINY, make_corpus


def micro_setup(tmp_path_factory, **model):
  """The micro model (with `model` settings) on a 24-example corpus: trainer, fresh params, train source and a
  `Prepare` for it."""
  from alm_jax.config import load_config
  from alm_jax.run_config import validate
  from alm_jax.train.loop import Trainer

  data = make_corpus(str(tmp_path_factory.mktemp("corpus")), 24, seed=0)
  config = load_config(TINY + ":micro")
  config.data.path = data
  config.data.batch_size = 4
  config.model.update(model)
  trainer = Trainer(validate(config), str(tmp_path_factory.mktemp("run")), quiet=True)
  params = trainer.layout.init(0, trainer.mesh, trainer.rules)
  source = open_source(data, "train")
  return trainer, params, source, Prepare(trainer.cfg.data, trainer.spec, trainer.tokenizer, train=False, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  trainer, params, source, prepare = micro_setup(tmp_path_factory)
  examples = []
  for i in range(len(source)):
    meta = prepare.measure(i, source[i])
    if meta["status"] == "ok":
      examples.append(prepare.load(meta, source[i]))
    if len(examples) == 6:
      break
  return trainer, params, examples


def batches(trainer, examples):
  """The six examples one per row, and the same examples packed two per row (in the same order)."""
  pad = trainer.tokenizer.pad_id
  spec = trainer.spec
  rows = max(e["tokens"].size for e in examples), max(e["window_samples"].size for e in examples)
  one = collate(examples, 6, rows[0], rows[1], spec, pad)
  pairs = [examples[i : i + 2] for i in range(0, 6, 2)]
  length = max(sum(e["tokens"].size for e in p) for p in pairs)
  windows = max(sum(e["window_samples"].size for e in p) for p in pairs)
  packed = collate(pairs, 3, length, windows, spec, pad)
  for b in (one, packed):
    check_audio_slots(b, spec, trainer.model_cfg.audio_token_id)
  assert packed["segment_ids"].max() == 2 and (packed["audio_clip"].max(-1) >= 1).all()
  return one, packed


FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}  # compile time dominates


def loss_and_grads(trainer, params, batch, grad=True):
  layout = trainer.layout

  def loss(p):
    return layout.model(p).loss(jax.tree.map(np.asarray, batch))

  if not grad:
    value, metrics = jax.jit(loss).lower(params).compile(FAST)(params)
    return float(value), metrics, None
  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile(FAST)(params)
  return float(value), metrics, grads


def test_a_packed_batch_has_the_loss_and_gradients_of_its_examples_one_per_row(setup):
  trainer, params, examples = setup
  one, packed = batches(trainer, examples)
  loss_one, metrics_one, grads_one = loss_and_grads(trainer, params, one)
  loss_packed, metrics_packed, grads_packed = loss_and_grads(trainer, params, packed)
  assert float(metrics_one["target_tokens"]) == float(metrics_packed["target_tokens"]) > 0
  np.testing.assert_allclose(loss_packed, loss_one, rtol=2e-6)
  largest = max(float(np.abs(np.asarray(g)).max()) for g in grads_one.values())
  for path in grads_one:  # relative to each leaf (those that are zero in exact arithmetic: to the largest)
    g, p = np.asarray(grads_one[path]), np.asarray(grads_packed[path])
    assert np.abs(p - g).max() <= 1e-4 * np.abs(g).max() + 1e-7 * largest, path
  # Without its segment ids the packed row is one long example (positions run on, attention crosses): the
  # comparison above would catch that.
  crossed = {k: v for k, v in packed.items() if k != "segment_ids"}
  assert abs(loss_and_grads(trainer, params, crossed, grad=False)[0] - loss_one) > 1e-4 * abs(loss_one)


def test_changing_one_segment_leaves_the_other_segments_logits_alone(setup):
  trainer, params, examples = setup
  _, packed = batches(trainer, examples)
  cfg = trainer.model_cfg
  jitted = jax.jit(lambda p, b: trainer.layout.model(p)(b))
  logits = lambda p, b: jitted.lower(p, b).compile(FAST)(p, b)
  before = np.asarray(logits(params, packed))
  first = packed["segment_ids"][0] == 1
  second = packed["segment_ids"][0] == 2
  # Segment 1 of row 0: its text tokens (not its placeholders) and its clip's audio change.
  changed = {k: v.copy() for k, v in packed.items()}
  text = np.flatnonzero(first & (packed["tokens"][0] != cfg.audio_token_id))[1:-1]
  changed["tokens"][0, text] = (changed["tokens"][0, text] + 7) % trainer.tokenizer.vocab_size
  changed["audio"][0, packed["audio_clip"][0] == 0] += 0.3
  after = np.asarray(logits(params, changed))
  assert np.abs(after[0, first] - before[0, first]).max() > 1e-3  # the change reaches its own segment
  np.testing.assert_allclose(after[0, second], before[0, second], rtol=0, atol=1e-5)
  np.testing.assert_allclose(after[1:], before[1:], rtol=0, atol=1e-5)


def segments(batch):
  """Every segment's tokens, as tuples."""
  out = []
  for row in range(batch["tokens"].shape[0]):
    for s in range(1, int(batch["segment_ids"][row].max()) + 1):
      out.append(tuple(batch["tokens"][row][batch["segment_ids"][row] == s].tolist()))
  return out


def test_the_packed_train_split_holds_every_example_once_with_less_padding(setup):
  trainer, _, _ = setup
  data = trainer.cfg.data
  kw = dict(num_epochs=1, shuffle=False, batch_size=4)
  collected = {}
  for packing in (False, True):
    cfg = dataclasses.replace(data, packing=packing, **kw)
    got = list(make_dataset(cfg, trainer.spec, trainer.tokenizer, split="train", process_index=0, process_count=1))
    for b in got:
      check_audio_slots(b, trainer.spec, trainer.model_cfg.audio_token_id)
      windows = (b["audio_clip"] >= 0).sum(-1)
      assert windows.max() <= max(data.window_sizes(trainer.spec))
      for row in range(b["tokens"].shape[0]):  # segments are contiguous and numbered in row order
        ids = b["segment_ids"][row][b["token_mask"][row]]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (ids.size == 0 or ids[0] == 1)
    fill = sum(b["token_mask"].sum() for b in got) / sum(b["token_mask"].size for b in got)
    collected[packing] = (collections.Counter(t for b in got for t in segments(b)), fill, len(got))
  assert collected[True][0] == collected[False][0]  # the same examples, each once
  assert collected[True][2] < collected[False][2] and collected[True][1] > collected[False][1]
