"""Clip-number embeddings (`model.clip_embeddings`): vector k is added to every audio token of each
example's (k+1)-th clip, one example per row or packed, and nothing else moves.

Checked on the micro model with real corpus batches: the difference the option makes to the input
embeddings is exactly the right table row at each clip's placeholders and zero elsewhere (so a wrong
clip number, a number running on across packed examples, or a vector on a text token fails); a packed
batch still has the loss of its examples one per row; the global Q-former numbers clips as the
window one does; a config with fewer vectors than clips is refused.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from alm_jax.config import ConfigError
from alm_jax.models.alm import clip_numbers
from helpers import TINY
from test_packing import FAST, batches, loss_and_grads, micro_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  trainer, params, source, prepare = micro_setup(tmp_path_factory, clip_embeddings=3)
  params = {**params, "bridge/clip_embedding": params["bridge/clip_embedding"] + 1.0}  # well away from zero
  single, multi = [], []
  for i in range(len(source)):
    meta = prepare.measure(i, source[i])
    clips = len(json.loads(source[i].payload)["audio"])
    if meta["status"] == "ok":
      (single if clips == 1 else multi).append(prepare.load(meta, source[i]))
  assert len(single) >= 4 and len(multi) >= 2, (len(single), len(multi))
  # Packed two a row: a multi-clip example second in a row (its clips' row ranks start past 0), and first.
  examples = [single[0], multi[0], multi[1], single[1], single[2], single[3]]
  return trainer, params, examples


def expected_numbers(batch, audio_id):
  """Each audio position's clip number within its example, counted on the host from the batch layout."""
  out = np.full(batch["tokens"].shape, -1)
  segments = batch.get("segment_ids", batch["token_mask"].astype(np.int32))
  for row in range(out.shape[0]):
    windows = batch["audio_clip"][row]
    # the row's clips in order; their placeholder runs come in the same order, split at the clip markers
    slots = np.flatnonzero(batch["tokens"][row] == audio_id)
    clips = sorted(set(windows[windows >= 0].tolist()))
    runs = np.split(slots, np.flatnonzero(np.diff(slots) > 1) + 1) if slots.size else []
    assert len(runs) == len(clips), (len(runs), clips)
    first = {}
    for clip, run in zip(clips, runs):
      segment = int(segments[row][run[0]])
      first.setdefault(segment, clip)
      out[row, run] = clip - first[segment]
  return out


def embedding_difference(trainer, params, batch):
  embed = jax.jit(lambda p, b: trainer.layout.model(p).input_embeddings(b))
  run = lambda p: np.asarray(embed.lower(p, batch).compile(FAST)(p, batch))
  zeroed = {**params, "bridge/clip_embedding": params["bridge/clip_embedding"] * 0}
  return run(params) - run(zeroed)


@pytest.mark.parametrize("packed", [False, True])
def test_each_clip_gets_its_number_vector_and_nothing_else_moves(setup, packed):
  trainer, params, examples = setup
  batch = batches(trainer, examples)[int(packed)]
  audio_id = trainer.model_cfg.audio_token_id
  numbers = expected_numbers(batch, audio_id)
  assert numbers.max() >= 1  # multi-clip examples are in the batch
  if packed:
    assert (batch["audio_clip"].max(-1) > numbers.max(-1)).any()  # row ranks run on across examples
  table = np.asarray(params["bridge/clip_embedding"])
  want = np.where((numbers >= 0)[..., None], table[np.clip(numbers, 0, None)], 0.0)
  np.testing.assert_allclose(embedding_difference(trainer, params, batch), want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(clip_numbers(
      jax.numpy.where(numbers >= 0, numbers + 5, -1), None)), np.where(numbers >= 0, numbers + 5, -1))


def test_a_packed_batch_keeps_the_loss_of_its_examples_one_per_row(setup):
  trainer, params, examples = setup
  one, packed = batches(trainer, examples)
  loss_one = loss_and_grads(trainer, params, one, grad=False)[0]
  loss_packed = loss_and_grads(trainer, params, packed, grad=False)[0]
  np.testing.assert_allclose(loss_packed, loss_one, rtol=2e-6)


def test_clip_numbers_restart_at_each_packed_example():
  ranks = np.array([[-1, 0, 0, -1, 1, -1, 2, 2, -1, 3, -1, -1]])
  segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]])
  got = np.asarray(clip_numbers(jax.numpy.asarray(ranks), jax.numpy.asarray(segments)))
  np.testing.assert_array_equal(got, [[-1, 0, 0, -1, 1, -1, 0, 0, -1, 0, -1, -1]])


def test_the_global_qformer_numbers_tokens_by_clip_slot(setup):
  from alm_jax.models.alm import Bridge

  trainer, _, _ = setup
  cfg = trainer.model_cfg
  qformer = dataclasses.replace(cfg.bridge.qformer, mode="global")
  global_cfg = dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge, qformer=qformer))
  window_bridge, global_bridge = Bridge(cfg, rngs=None), Bridge(global_cfg, rngs=None)
  clip = jax.numpy.asarray([[0, 0, 1, -1], [0, -1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(window_bridge.token_clips(clip, 8)),
                                [[0, 0, 0, 0, 1, 1, -1, -1], [0, 0, -1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(np.asarray(global_bridge.token_clips(clip, 8)),
                                [[0, 0, 1, 1, -1, -1, -1, -1], [0, 0, -1, -1, -1, -1, -1, -1]])


def test_fewer_vectors_than_clips_is_refused():
  from alm_jax.config import load_config
  from alm_jax.run_config import validate

  config = load_config(TINY + ":micro")
  config.model.clip_embeddings = config.data.max_clips - 1
  with pytest.raises(ConfigError, match="model.clip_embeddings"):
    validate(config)
