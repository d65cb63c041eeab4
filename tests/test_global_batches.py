"""Every process forms the same global batches: N simulated processes' rows, put together, are the 1-process batch."""

import json

import numpy as np
import pytest

from alm_jax.data.pipeline import BATCH_KEYS, DataConfig, make_dataset
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.models.audio_slots import AudioTokenSpec
from helpers import make_corpus

# 1 s windows: the corpus's 1.5–3 s clips take 2–3 windows, its 3-clip questions up to 9.
SPEC = AudioTokenSpec(window_seconds=1.0, max_windows=3, pool=True)
BATCH = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(str(tmp_path_factory.mktemp("corpus")), 48, seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
  return Tokenizer.load(corpus, "tiny")


def config(corpus, **kw):
  return DataConfig.from_config({"path": corpus, "eval_path": f"{corpus}/train.jsonl", "batch_size": BATCH,
                                 "length_buckets": (96, 160, 256), "seed": 3, **kw})


def run(cfg, tok, split, n=None, *, restore_at=None, **where):
  """Up to `n` batches; with `restore_at`, a fresh iterator restored from the JSON state saved there gives the rest."""
  ds = make_dataset(cfg, SPEC, tok, split=split, **where)
  out, it = [], iter(ds)
  try:
    while n is None or len(out) < n:
      if len(out) == restore_at:
        state = json.loads(json.dumps(it.get_state()))  # what Orbax stores
        it.close()
        it = iter(make_dataset(cfg, SPEC, tok, split=split, **where))
        it.set_state(state)
      try:
        out.append(next(it))
      except StopIteration:
        break
  finally:
    it.close()
  return out


def assert_rows_make_the_global_batches(parts, reference):
  """`parts`: [(rows, batches)] over processes; each global batch row comes from exactly the process that loads it."""
  assert all(len(batches) == len(reference) for _, batches in parts)
  for step, want in enumerate(reference):
    for rows, batches in parts:
      got = batches[step]
      assert set(got) == set(BATCH_KEYS)
      for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key][list(rows)], err_msg=f"batch {step}, {key}, rows {rows}")


def shapes(batches):
  return {(b["tokens"].shape[1], b["audio"].shape[1]) for b in batches}


@pytest.mark.parametrize("processes,packing", [(2, False), (4, False), (2, True)])
def test_processes_load_their_rows_of_the_one_process_batches(corpus, tok, processes, packing):
  cfg = config(corpus, packing=packing)
  reference = run(cfg, tok, "train", 8, process_index=0, process_count=1)
  assert packing or len(shapes(reference)) >= 3, "the test should cover several (L, K) buckets"
  if packing:
    assert max(int(b["segment_ids"].max()) for b in reference) >= 2, "rows should hold several examples"
  parts = []
  for p in range(processes):
    per = BATCH // processes
    batches = run(cfg, tok, "train", 8, restore_at=3, process_index=p, process_count=processes)
    assert all(b["tokens"].shape[0] == per for b in batches)
    parts.append((range(p * per, (p + 1) * per), batches))
  assert_rows_make_the_global_batches(parts, reference)
  # Restoring the 1-process iterator mid-stream gives the same batches too.
  assert_rows_make_the_global_batches([(range(BATCH), run(cfg, tok, "train", 8, restore_at=5, process_index=0,
                                                          process_count=1))], reference)


def test_eval_split_is_finite_and_flushed_the_same_way(corpus, tok):
  cfg = config(corpus)
  reference = run(cfg, tok, "validation", process_index=0, process_count=1)
  ids = [i for b in reference for i in b["example_id"].tolist() if i >= 0]
  assert sorted(ids) == list(range(38))  # every example once
  assert any((b["example_id"] < 0).any() for b in reference), "partial buckets are flushed as padded batches"
  for processes in (2, 4):
    per = BATCH // processes
    parts = [(range(p * per, (p + 1) * per), run(cfg, tok, "validation", restore_at=2, process_index=p,
                                                  process_count=processes)) for p in range(processes)]
    assert_rows_make_the_global_batches(parts, reference)


def test_non_contiguous_rows(corpus, tok):
  cfg = config(corpus)
  reference = run(cfg, tok, "train", 6, process_index=0, process_count=1)
  parts = [(rows, run(cfg, tok, "train", 6, restore_at=4, process_index=p, process_count=2, rows=rows))
           for p, rows in enumerate(([0, 1, 4, 5], [2, 3, 6, 7]))]
  assert_rows_make_the_global_batches(parts, reference)
  # Rows in any order, any number per process: the local batch holds them in the order given.
  odd = run(cfg, tok, "train", 6, process_index=0, process_count=1, rows=[7, 0, 3])
  assert_rows_make_the_global_batches([([7, 0, 3], odd)], reference)
  for rows in ([8], [1, 1], []):
    with pytest.raises(ValueError, match="rows must be distinct global batch rows"):
      make_dataset(cfg, SPEC, tok, split="train", process_index=0, process_count=2, rows=rows)


def test_decoding_workers_load_the_same_rows(corpus, tok):
  cfg = config(corpus)
  reference = run(cfg, tok, "train", 5, process_index=0, process_count=1)
  with_workers = run(config(corpus, workers=2), tok, "train", 5, restore_at=3, process_index=1, process_count=2)
  assert_rows_make_the_global_batches([(range(4, 8), with_workers)], reference)
