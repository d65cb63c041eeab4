"""Grain pipeline: the batch contract, bucketing, exact resume (with workers), sharding, bad input."""

import collections
import json
import logging

import numpy as np
import pytest
import soundfile as sf

from alm_jax.audio import io as audio_io
from alm_jax.audio.io import load_audio, write_wav
from alm_jax.config import ConfigError
from alm_jax.data import synth as corpus
from alm_jax.data.examples import Prepare
from alm_jax.data.pipeline import BATCH_KEYS, DataConfig, batch_shapes, make_dataset, pad_batch, tokenizer_file
from alm_jax.data.sources import open_source
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import AudioError, DataError
from alm_jax.models.audio_slots import AudioTokenSpec, num_audio_tokens, num_windows

# 1 s windows so the corpus's 1.5–3 s clips span 2–3 windows; Qwen2-Audio-style counts.
SPEC = AudioTokenSpec(window_seconds=1.0, max_windows=3, pool=True)
BUCKETS = (96, 160, 256)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  corpus.write_corpus(str(out), 40, seed=11, workers=1)
  return out


@pytest.fixture(scope="module")
def tok(data_dir):
  return Tokenizer.load(str(data_dir), "tiny")


def cfg(path, **kw):
  # One example per row (bucketing by (L, K)); packing has its own tests (test_packing.py).
  base = {"path": str(path), "batch_size": 4, "length_buckets": BUCKETS, "packing": False}
  base.update(kw)
  return DataConfig.from_config(base)


def batches(ds, limit=None):
  it = iter(ds)
  out = []
  try:
    for b in it:
      out.append(b)
      if limit and len(out) >= limit:
        break
  finally:
    it.close()
  return out


def manifest_lines(path):
  return [json.loads(l) for l in open(path) if l.strip()]


def test_batches_follow_the_contract(data_dir, tok):
  lines = manifest_lines(data_dir / "train.jsonl")
  ds = make_dataset(cfg(data_dir, eval_path=str(data_dir / "train.jsonl")), SPEC, tok, split="validation",
                    process_index=0, process_count=1)
  seen = []
  windows = set(DataConfig().window_sizes(SPEC))
  for b in batches(ds):
    assert set(b) == set(BATCH_KEYS)
    dtypes = {k: str(v.dtype) for k, v in b.items()}
    assert dtypes == {"tokens": "int32", "token_mask": "bool", "loss_mask": "float32", "segment_ids": "int32",
                      "audio": "float32", "audio_samples": "int32", "audio_clip": "int32", "example_id": "int64"}
    assert (b["segment_ids"] == b["token_mask"]).all()  # eval splits: one example per row
    B, L = b["tokens"].shape
    B2, K, S = b["audio"].shape
    assert B == B2 == 4 and L in BUCKETS and K in windows and S == SPEC.window_samples
    assert b["audio_samples"].shape == b["audio_clip"].shape == (B, K)
    assert max(int((b["audio_clip"][r] >= 0).sum()) for r in range(B)) > ([0] + [k for k in windows if k < K])[-1]
    for row in range(B):
      ex = b["example_id"][row]
      mask = b["token_mask"][row]
      n = int(mask.sum())
      assert mask[:n].all() and not mask[n:].any()
      assert (b["tokens"][row, n:] == tok.pad_id).all() and not b["loss_mask"][row, n:].any()
      clip, audio, samples = b["audio_clip"][row], b["audio"][row], b["audio_samples"][row]
      real = clip >= 0
      assert not real[real.sum():].any()  # slots 0..n-1 hold the row's windows, the rest are padding
      assert (samples[~real] == 0).all() and not audio[~real].any()
      if ex < 0:
        assert n == 0 and not real.any()
        continue
      seen.append(int(ex))
      line = lines[ex]
      tokens = b["tokens"][row, :n]
      # Placeholder spans: one per clip, sized by num_audio_tokens of the decoded clip.
      pcms = [load_audio(str(data_dir / rel)) for rel in line["audio"]]
      assert (tokens == tok.audio_id).sum() == sum(num_audio_tokens(p.size, SPEC) for p in pcms)
      assert (tokens == tok.audio_bos_id).sum() == len(pcms)
      assert not b["loss_mask"][row, :n][tokens == tok.audio_id].any()
      targets = tokens[b["loss_mask"][row, :n] > 0]
      answer = line.get("answer", line.get("text"))
      assert tok.decode(targets, skip_special_tokens=False) == answer + "<|im_end|>"
      # Windows: each clip cut in time order, placed in placeholder order, clip ids local to the row.
      assert (np.diff(clip[real]) >= 0).all() and clip[real].max() == len(pcms) - 1
      for k, pcm in enumerate(pcms):
        slots = np.nonzero(clip == k)[0]
        assert len(slots) == num_windows(pcm.size, SPEC)
        got = np.concatenate([audio[s, : samples[s]] for s in slots])
        np.testing.assert_array_equal(got, pcm[: SPEC.max_windows * SPEC.window_samples])
        assert not audio[slots[-1], samples[slots[-1]] :].any()
  assert sorted(seen) == list(range(len(lines)))


def test_long_clips_are_windowed_and_truncated_and_markers_order_windows(tmp_path, tok):
  rng = np.random.default_rng(0)
  long_clip = rng.uniform(-0.5, 0.5, 16000 * 4 + 500).astype(np.float32)  # 4.03 s: 3 windows kept
  short_clip = rng.uniform(-0.5, 0.5, 8000).astype(np.float32)
  write_wav(tmp_path / "long.wav", long_clip)
  write_wav(tmp_path / "short.wav", short_clip)
  line = {"id": "x", "audio": ["long.wav", {"path": "short.wav", "start": 0.1, "end": 0.4}],
          "conversation": [{"role": "user", "content": "Is <audio 2> part of <audio 1>?"},
                           {"role": "assistant", "content": "no"}]}
  (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
  (b,) = batches(make_dataset(cfg(tmp_path / "m.jsonl"), SPEC, tok, split="test", process_index=0,
                              process_count=1))
  # The short clip's span comes first in the text, so its window comes first.
  assert b["audio"].shape[:2] == (4, 4)  # the smallest window bucket holding the row's 4 windows
  assert b["audio_clip"][0].tolist() == [0, 1, 1, 1] and (b["audio_clip"][1:] == -1).all()
  assert b["audio_samples"][0].tolist() == [4800, 16000, 16000, 16000]
  decoded_long = load_audio(str(tmp_path / "long.wav"))
  np.testing.assert_array_equal(b["audio"][0, 1:4].reshape(-1), decoded_long[:48000])
  np.testing.assert_array_equal(b["audio"][0, 0, :4800], load_audio(str(tmp_path / "short.wav"), start=0.1, end=0.4))
  ids = b["tokens"][0][b["token_mask"][0]]
  starts = np.nonzero(ids == tok.audio_bos_id)[0]
  assert [(ids[s + 1 :] == tok.audio_id).argmin() for s in starts] == [num_audio_tokens(4800, SPEC), 75]


def test_length_and_window_bucketing_groups_examples_and_pads_rows(data_dir, tok):
  ds = make_dataset(cfg(data_dir, eval_path=str(data_dir / "train.jsonl")), SPEC, tok, split="validation",
                    process_index=0, process_count=1)
  shapes = collections.Counter()
  for b in batches(ds):
    n = b["token_mask"].sum(1)
    real = n[b["example_id"] >= 0]
    L = b["tokens"].shape[1]
    smaller = [l for l in BUCKETS if l < L]
    assert (real <= L).all() and (not smaller or (real > smaller[-1]).all())  # all rows in the same bucket
    K = b["audio"].shape[1]
    windows = (b["audio_clip"] >= 0).sum(1)[b["example_id"] >= 0]
    fewer = [k for k in DataConfig().window_sizes(SPEC) if k < K]
    assert (windows <= K).all() and (not fewer or (windows > fewer[-1]).all())  # and the same window bucket
    shapes[(L, K)] += 1
  allowed = {(s["tokens"][1], s["audio"][1]) for s in batch_shapes(cfg(data_dir), SPEC)}
  assert set(shapes) <= allowed and len({l for l, _ in shapes}) >= 2 and len({k for _, k in shapes}) >= 2
  padded = pad_batch(b, length=512, windows=K + 4, pad_id=tok.pad_id)
  assert padded["tokens"].shape == (4, 512) and padded["audio"].shape == (4, K + 4, SPEC.window_samples)
  assert (padded["audio_clip"][:, -4:] == -1).all() and not padded["audio_samples"][:, -4:].any()
  np.testing.assert_array_equal(padded["audio"][:, :K], b["audio"])
  assert (padded["tokens"][:, L:] == tok.pad_id).all() and not padded["token_mask"][:, L:].any()


def _ids(ds, n, state=None, save_at=None):
  """Example ids of `n` batches (optionally from a restored state); also the state after `save_at` batches."""
  it = iter(ds)
  saved = None
  try:
    if state is not None:
      it.set_state(json.loads(json.dumps(state)))  # what Orbax stores
    out = []
    for step in range(n):
      if step == save_at:
        saved = it.get_state()
      out.append(next(it)["example_id"].tolist())
    return out, saved
  finally:
    it.close()


def _pending(state):
  """Positions waiting in buckets anywhere in a (possibly per-worker) iterator state."""
  if isinstance(state, dict):
    if "pending" in state:
      return [p for group in state["pending"].values() for p in group]
    return [p for v in state.values() for p in _pending(v)]
  if isinstance(state, list):
    return [p for v in state for p in _pending(v)]
  return []


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_examples(data_dir, tok, workers):
  c = cfg(data_dir, workers=workers, seed=5)
  full, state = _ids(make_dataset(c, SPEC, tok, split="train", process_index=0, process_count=1), 12, save_at=5)
  assert any(_pending(state)), "the checkpoint should hold examples waiting in buckets"
  rest, _ = _ids(make_dataset(c, SPEC, tok, split="train", process_index=0, process_count=1), 7, state)
  assert full[5:] == rest
  # Epochs reshuffle and repeat: ids keep coming past the 32 training examples.
  assert len({i for b in full for i in b if i >= 0}) == 32


def test_train_order_depends_on_seed_and_covers_each_epoch(data_dir, tok):
  c = cfg(data_dir, num_epochs=2, group_by_length=False, batch_size=8)
  ids = [i for b in batches(make_dataset(c, SPEC, tok, split="train", process_index=0, process_count=1))
         for i in b["example_id"].tolist() if i >= 0]
  assert sorted(ids) == sorted(list(range(32)) * 2)
  assert ids[:32] != ids[32:] and sorted(ids[:32]) == list(range(32))
  other = batches(make_dataset(cfg(data_dir, num_epochs=2, group_by_length=False, batch_size=8, seed=1), SPEC, tok,
                               split="train", process_index=0, process_count=1))
  assert [i for b in other for i in b["example_id"].tolist() if i >= 0] != ids


def test_each_process_loads_its_rows_of_the_global_batches(data_dir, tok):
  c = cfg(data_dir, eval_path=str(data_dir / "train.jsonl"), batch_size=8)
  per_process = []
  for p in range(2):
    bs = batches(make_dataset(c, SPEC, tok, split="validation", process_index=p, process_count=2))
    assert all(b["tokens"].shape[0] == 4 for b in bs)
    per_process.append({i for b in bs for i in b["example_id"].tolist() if i >= 0})
  assert not per_process[0] & per_process[1] and per_process[0] | per_process[1] == set(range(32))
  with pytest.raises(ConfigError, match="batch_size"):
    make_dataset(cfg(data_dir, batch_size=6), SPEC, tok, split="train", process_index=0, process_count=4)


def test_task_filter_and_prompts(data_dir, tok):
  lines = manifest_lines(data_dir / "train.jsonl")
  c = cfg(data_dir, eval_path=str(data_dir / "train.jsonl"), tasks=("transcribe",),
          prompts={"transcribe": "Write down the words."})
  bs = batches(make_dataset(c, SPEC, tok, split="validation", process_index=0, process_count=1))
  ids = sorted(i for b in bs for i in b["example_id"].tolist() if i >= 0)
  assert ids == [i for i, l in enumerate(lines) if l["task"] == "transcribe"] and ids
  row = bs[0]["tokens"][0][bs[0]["token_mask"][0]]
  assert "Write down the words." in tok.decode(row)


def test_random_crop_in_training_only(tmp_path, tok):
  pcm = np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)
  write_wav(tmp_path / "a.wav", pcm)
  (tmp_path / "m.jsonl").write_text(json.dumps({"audio": ["a.wav"], "text": "x"}) + "\n")
  decoded = load_audio(str(tmp_path / "a.wav"))
  kw = dict(max_clip_seconds=1.0, batch_size=1, shuffle=False)

  def first_window(split, seed):
    b = batches(make_dataset(cfg(tmp_path / "m.jsonl", seed=seed, **kw), SPEC, tok, split=split,
                             process_index=0, process_count=1), limit=1)[0]
    assert b["audio_samples"][0].tolist() == [16000]
    return b["audio"][0, 0]

  np.testing.assert_array_equal(first_window("test", 0), decoded[:16000])
  crops = [first_window("train", s) for s in (0, 1)]
  heads = np.lib.stride_tricks.sliding_window_view(decoded, 16000)[:, :8]
  starts = [int(np.nonzero(np.all(heads == c[:8], axis=1))[0][0]) for c in crops]
  assert starts[0] != starts[1] and all(0 <= s <= 32000 for s in starts)
  np.testing.assert_array_equal(first_window("train", 0), crops[0])


def test_clip_lengths_come_from_headers_and_decoded_audio_is_fitted_to_them(tmp_path, tok, monkeypatch):
  rng = np.random.default_rng(3)
  sf.write(tmp_path / "a.flac", rng.uniform(-0.5, 0.5, 44100 + 3).astype(np.float32), 44100)
  write_wav(tmp_path / "b.wav", rng.uniform(-0.5, 0.5, 2 * 22050 + 1).astype(np.float32), 22050)
  span = {"path": "b.wav", "start": 0.25, "end": 1.5}
  (tmp_path / "m.jsonl").write_text(json.dumps({"audio": ["a.flac", span], "text": "x"}) + "\n")
  c = cfg(tmp_path / "m.jsonl")
  decoded = [load_audio(str(tmp_path / "a.flac")), load_audio(str(tmp_path / "b.wav"), start=0.25, end=1.5)]

  def no_decoding(*args, **kwargs):
    raise AssertionError("measuring decoded audio")

  with monkeypatch.context() as m:  # measuring reads headers only
    m.setattr(audio_io, "load_audio", no_decoding)
    m.setattr(audio_io, "decode_audio_bytes", no_decoding)
    meta = Prepare(c, SPEC, tok, train=False, seed=0).measure(0, open_source(str(tmp_path / "m.jsonl"), "test")[0])
  assert meta["status"] == "ok" and [plan[0] for plan in meta["plans"]] == [d.size for d in decoded]

  def clip_windows(b):
    slots = b["audio_clip"][0]
    return [np.concatenate([b["audio"][0, s, : b["audio_samples"][0, s]] for s in np.nonzero(slots == k)[0]])
            for k in range(2)]

  def first_batch():
    return batches(make_dataset(c, SPEC, tok, split="test", process_index=0, process_count=1))[0]

  for got, want in zip(clip_windows(first_batch()), decoded):
    np.testing.assert_array_equal(got, want)
  # A decoder giving a sample more, or one fewer, than the header: the PCM is fitted to the measured length.
  for change in (1, -1):
    real = audio_io.load_audio
    monkeypatch.setattr(audio_io, "load_audio", lambda *a, change=change, real=real, **k: (
        np.append(real(*a, **k), np.float32(0.25)) if change > 0 else real(*a, **k)[:-1]))
    b = first_batch()
    monkeypatch.setattr(audio_io, "load_audio", real)
    for got, want in zip(clip_windows(b), decoded):
      np.testing.assert_array_equal(got, want if change > 0 else np.append(want[:-1], np.float32(0)))
    ids = b["tokens"][0][b["token_mask"][0]]
    assert (ids == tok.audio_id).sum() == sum(num_audio_tokens(d.size, SPEC) for d in decoded)


def test_a_clip_failing_to_decode_after_its_header_raises_or_leaves_a_padding_row(tmp_path, tok, caplog):
  sf.write(tmp_path / "whole.flac", np.random.default_rng(4).uniform(-0.5, 0.5, 12000).astype(np.float32), 16000)
  data = (tmp_path / "whole.flac").read_bytes()
  (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])  # the header still says 0.75 s, as good.wav
  good = json.dumps(_good(tmp_path))
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("\n".join([good] * 3 + [json.dumps({"audio": ["cut.flac"], "text": "fine"})] + [good] * 4)
                      + "\n")
  with pytest.raises(AudioError, match=f"cut.flac: cannot decode audio.*{manifest}:4"):
    batches(make_dataset(cfg(manifest), SPEC, tok, split="test", process_index=0, process_count=1))
  it = iter(make_dataset(cfg(manifest, skip_bad=True), SPEC, tok, split="test", process_index=0, process_count=1))
  with caplog.at_level(logging.WARNING, logger="alm_jax.data"):
    got = [b["example_id"].tolist() for b in it]
  assert got == [[0, 1, 2, -1], [4, 5, 6, 7]]  # the example keeps its place in the plan; its row is padding
  assert (it.stats.seen, it.stats.skipped, it.stats.decode_failed) == (8, 0, 1)
  assert any("failed to decode" in r.message and "cut.flac" in r.message for r in caplog.records)
  it.close()


# --- bad input, case by case -------------------------------------------------------------------


def _good(tmp_path, name="good.wav"):
  write_wav(tmp_path / name, np.random.default_rng(2).uniform(-0.3, 0.3, 12000).astype(np.float32))
  return {"audio": [name], "text": "fine"}


def _bad_cases(tmp_path):
  (tmp_path / "corrupt.wav").write_bytes(b"RIFF0000WAVEfmt garbage that is not audio" * 3)
  (tmp_path / "empty.wav").write_bytes(b"")
  return {
      "missing audio": ({"audio": ["nope.wav"], "text": "x"}, AudioError, "nope.wav: no such audio file"),
      "corrupt audio": ({"audio": ["corrupt.wav"], "text": "x"}, AudioError, "corrupt.wav: cannot decode"),
      "empty clip": ({"audio": ["empty.wav"], "text": "x"}, AudioError, "empty.wav: audio file is empty"),
      "invalid json": ("{not json", DataError, "invalid JSON"),
      "span past the end": ({"audio": [{"path": "good.wav", "start": 0.2, "end": 5.0}], "text": "x"}, AudioError,
                            "good.wav: span .* beyond the clip's end"),
      "unknown field": ({"audio": ["good.wav"], "txt": "x"}, DataError, "unknown fields \\['txt'\\]"),
      "too long": ({"audio": ["good.wav"], "text": "word " * 400}, DataError, "longer than the largest length bucket"),
  }


@pytest.mark.parametrize("case", ["missing audio", "corrupt audio", "empty clip", "invalid json",
                                  "span past the end", "unknown field", "too long"])
def test_bad_example_raises_naming_file_and_line_or_is_skipped_and_counted(tmp_path, tok, case, caplog):
  good = _good(tmp_path)
  bad, error, message = _bad_cases(tmp_path)[case]
  lines = [json.dumps(good)] * 3 + [bad if isinstance(bad, str) else json.dumps(bad)] + [json.dumps(good)] * 4
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("\n".join(lines) + "\n")
  strict = make_dataset(cfg(manifest), SPEC, tok, split="test", process_index=0, process_count=1)
  with pytest.raises(error, match=message) as info:
    batches(strict)
  assert f"{manifest}:4" in str(info.value)  # the manifest line
  lenient = make_dataset(cfg(manifest, skip_bad=True, max_skip_rate=0.2), SPEC, tok, split="test", process_index=0,
                         process_count=1)
  it = iter(lenient)
  with caplog.at_level(logging.WARNING, logger="alm_jax.data"):
    ids = sorted(i for b in it for i in b["example_id"].tolist() if i >= 0)
  assert ids == [0, 1, 2, 4, 5, 6, 7]
  assert (it.stats.seen, it.stats.skipped) == (8, 1) and f"{manifest}:4" in it.stats.reasons[0]
  assert any("skipping bad example" in r.message and f"{manifest}:4" in r.message for r in caplog.records)
  it.close()


def test_skip_rate_above_threshold_stops_the_run(tmp_path, tok):
  good = json.dumps(_good(tmp_path))
  bad = json.dumps({"audio": ["missing.wav"], "text": "x"})
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("\n".join([good, bad] * 10) + "\n")
  ds = make_dataset(cfg(manifest, skip_bad=True, max_skip_rate=0.3, skip_check_after=6, shuffle=False), SPEC, tok,
                    split="train", process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"skipped 3 of 6 examples \(50.0%\), above data.max_skip_rate=0.3.*missing.wav"):
    batches(ds, limit=5)
  # Below the threshold the same data trains on.
  ok = make_dataset(cfg(manifest, skip_bad=True, max_skip_rate=0.6, shuffle=False), SPEC, tok, split="train",
                    process_index=0, process_count=1)
  assert len(batches(ok, limit=3)) == 3


def test_config_validation(data_dir, tmp_path):
  assert tokenizer_file(cfg(data_dir)) == str(data_dir / "tokenizer.json")
  assert tokenizer_file(cfg(data_dir / "train.jsonl")) == str(data_dir / "tokenizer.json")
  with pytest.raises(ConfigError, match="config.data.tokenizer"):
    tokenizer_file(cfg(tmp_path))
  with pytest.raises(ConfigError, match="data.length_buckets: must be strictly increasing"):
    DataConfig.from_config({"length_buckets": (256, 128)})
  with pytest.raises(ConfigError, match="data.template: unknown chat template 'gpt'"):
    DataConfig.from_config({"template": "gpt"})
  with pytest.raises(ConfigError, match="config.data.bogus"):
    DataConfig.from_config({"bogus": 1})
  with pytest.raises(ConfigError, match="config.data.batch_size"):
    DataConfig.from_config({"batch_size": "8"})
  c = DataConfig.from_config({"prompts": {"caption": "What do you hear?"}})
  assert c.prompts == {"transcribe": "Transcribe the audio.", "caption": "What do you hear?"}
  assert DataConfig(batch_size=4).window_sizes(SPEC) == (1, 2, 4, 8, 12)  # per row: up to 4 clips × 3 windows
  assert DataConfig(max_clips=3).window_sizes(AudioTokenSpec(max_windows=2)) == (1, 2, 4, 6)
