"""The audio-tagging objective: pooling each row's clip, bag-of-words targets, the one-clip check, and a tagging step that trains only the encoders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax.data import batch_checks
from alm_jax.errors import DataError
from alm_jax.models import tagging

AUDIO = 7  # placeholder id in these hand-made batches


def test_pool_rows_pools_every_window_of_a_row_and_ignores_padding():
  rng = np.random.default_rng(0)
  frames = rng.standard_normal((3, 2, 5, 3)).astype(np.float32)  # 3 rows x 2 window slots
  valid = np.ones((3, 2, 5), bool)
  valid[0, 0, 3:] = False
  valid[1, 0, 2:] = False
  clip = np.array([[0, 0], [0, -1], [-1, -1]])  # row 0: one clip over two windows; row 2: no audio
  pooled, has = tagging.pool_rows(jnp.asarray(frames), jnp.asarray(valid), jnp.asarray(clip))
  pooled, has = np.asarray(pooled), np.asarray(has)
  np.testing.assert_array_equal(has, [True, True, False])
  row0 = np.concatenate([frames[0, 0][valid[0, 0]], frames[0, 1][valid[0, 1]]])
  np.testing.assert_allclose(pooled[0], np.concatenate([row0.mean(0), row0.max(0)]), rtol=1e-6)
  row1 = frames[1, 0][valid[1, 0]]  # the padding slot's frames are left out
  np.testing.assert_allclose(pooled[1], np.concatenate([row1.mean(0), row1.max(0)]), rtol=1e-6)
  np.testing.assert_array_equal(pooled[2], 0.0)


def test_bag_of_words_takes_answer_tokens_minus_ignored_ids():
  tokens = np.array([[1, AUDIO, 4, 5, 5, 9, 0], [1, 2, 3, 6, 9, 0, 0]])
  loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]], np.float32)
  hot = np.asarray(tagging.bag_of_words(jnp.asarray(tokens), jnp.asarray(loss_mask), 10, ignore_ids=(9,)))
  assert hot.shape == (2, 10)
  assert np.flatnonzero(hot[0]).tolist() == [5]  # 4 is prompt, 9 is ignored, 5 counts once
  assert np.flatnonzero(hot[1]).tolist() == [6]


def test_check_one_clip_per_example_names_the_examples():
  batch = {"tokens": np.array([[AUDIO, 1, AUDIO], [AUDIO, 2, 2], [3, 3, 3]]),
           "audio_clip": np.array([[0, 1], [0, -1], [-1, -1]]), "example_id": np.array([11, 12, 13])}
  with pytest.raises(DataError, match=r"\[11\].*one clip per example"):
    batch_checks.check_one_clip_per_example(batch, AUDIO)
  batch["audio_clip"] = np.array([[0, 0], [0, -1], [-1, -1]])  # one clip over two windows is fine
  batch_checks.check_one_clip_per_example(batch, AUDIO)


def test_tagging_loss_is_zero_only_for_the_right_tags():
  tokens = np.array([[AUDIO, 2, 5, 9], [AUDIO, 2, 6, 9]])
  loss_mask = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
  batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask),
           "token_mask": jnp.ones(tokens.shape, bool), "audio_clip": jnp.asarray([[0], [0]])}
  has = jnp.asarray([True, True])
  right = np.full((2, 10), -30.0, np.float32)
  right[0, 5] = right[1, 6] = 30.0
  loss, metrics = tagging.tagging_loss(jnp.asarray(right), has, batch, AUDIO, ignore_ids=(9,))
  assert float(loss) < 1e-6 and float(metrics["token_accuracy"]) == 1.0
  swapped = right[::-1].copy()
  loss, metrics = tagging.tagging_loss(jnp.asarray(swapped), has, batch, AUDIO, ignore_ids=(9,))
  assert float(loss) > 50 and float(metrics["tag_recall"]) == 0.0


def test_tagging_step_trains_only_encoders_and_head(tiny_corpus_trainer):
  trainer, batch = tiny_corpus_trainer
  state = trainer.initial_state(iter([]))
  before = {p: np.asarray(v) for p, v in {**state.trainable, **state.frozen}.items()}
  compiled = trainer.compiled_train_step(state, batch)
  trainable, opt_state = state.trainable, state.opt_state
  for _ in range(2):  # the warmup's first learning rate is 0
    trainable, opt_state, metrics = compiled(trainable, state.frozen, opt_state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["target_tokens"]) > 0
  assert set(trainable) == {p for p in before if p.startswith(("encoder/", "tagger/"))}
  moved = [p for p, v in trainable.items() if not np.array_equal(np.asarray(v), before[p])]
  assert any(p.startswith("tagger/") for p in moved) and any(p.startswith("encoder/whisper") for p in moved)
  assert any(p.startswith("encoder/beats") for p in moved)


def test_tagging_refuses_a_stage_that_trains_more_than_the_encoders(tagging_corpus, tmp_path):
  from alm_jax.config import ConfigError

  with pytest.raises(ConfigError, match=r"config.train.stage: stage 'full' trains .*tagging"):
    _trainer(tagging_corpus, tmp_path, "full", {})


ENCODER_STAGE = {"encoder": [["^encoder/", True], ["^tagger/", True]]}


@pytest.fixture(scope="module")
def tagging_corpus(tmp_path_factory):
  from alm_jax.data import synth

  data = str(tmp_path_factory.mktemp("tagging") / "data")
  synth.write_corpus(data, 60, seed=1)
  return data


def _trainer(data: str, tmp_path, stage: str, stages: dict):
  from alm_jax.config import load_config
  from alm_jax.run_config import validate
  from alm_jax.train.loop import Trainer
  from tests.helpers import TINY

  config = load_config(TINY + ":micro")
  config.data.path = data
  config.data.batch_size = 4
  config.data.tasks = ("caption", "transcribe")
  config.train.stage = stage
  config.train.stages = stages
  config.train.objective = "tagging"
  return Trainer(validate(config), str(tmp_path / "run"), quiet=True)


@pytest.fixture
def tiny_corpus_trainer(tagging_corpus, tmp_path):
  from alm_jax.data.pipeline import make_dataset
  from alm_jax.train.loop import _local_batch_to_global

  trainer = _trainer(tagging_corpus, tmp_path, "encoder", ENCODER_STAGE)
  local = next(iter(make_dataset(trainer.cfg.data, trainer.spec, trainer.tokenizer, split="train", seed=0)))
  batch_checks.check_one_clip_per_example(local, trainer.model_cfg.audio_token_id)
  return trainer, _local_batch_to_global(local, trainer.mesh, trainer.rules)
