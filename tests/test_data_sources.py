"""Sources: manifest schemas (native, MMAU, MMAU-Pro, AF3), packed ArrayRecord, TFDS — all give the same batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alm_jax.audio.io import write_wav
from alm_jax.data.pipeline import DataConfig, make_dataset
from alm_jax.data.records import format_mcq
from alm_jax.data.sources import ArrayRecordSource, JsonArraySource, JsonlSource, open_source, pack_manifest, to_record
from alm_jax.data.tokenizer import train_bpe
from alm_jax.errors import AudioError, DataError
from alm_jax.models.audio_slots import AudioTokenSpec

SPEC = AudioTokenSpec(window_seconds=1.0, max_windows=2, pool=True)
TEXTS = ["one two three", "a beep then a siren", "hello world", "the quick brown fox", "seven", "yes no"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """Six short wav files (different lengths) in `audio/` and a manifest of transcription pairs beside it."""
  root = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  for i in range(len(TEXTS)):
    n = 8000 + 2500 * i
    t = np.arange(n) / 16000
    write_wav(root / "audio" / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (300 + 90 * i) * t)
                                             + 0.01 * rng.normal(size=n)).astype(np.float32))
  lines = [{"id": f"ex{i}", "audio": [f"audio/c{i}.wav"], "text": text} for i, text in enumerate(TEXTS)]
  (root / "asr.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return root


@pytest.fixture(scope="module")
def tok():
  return train_bpe(TEXTS + ["Transcribe the audio. Describe the audio. Choose the correct option"] * 3,
                   vocab_size=300)


def rows_by_id(ds):
  """{example_id: (tokens, audio windows)} over a whole eval split."""
  out = {}
  it = iter(ds)
  for b in it:
    for r, ex in enumerate(b["example_id"].tolist()):
      if ex < 0:
        continue
      slots = b["audio_clip"][r] >= 0
      out[ex] = (b["tokens"][r][b["token_mask"][r]].tolist(), b["audio"][r][slots].copy(), b["audio_samples"][r][slots])
  it.close()
  return out


def dataset(path, tok, **kw):
  cfg = DataConfig.from_config({"path": str(path), "batch_size": 2, "length_buckets": (64, 128), **kw})
  return make_dataset(cfg, SPEC, tok, split="test", process_index=0, process_count=1)


def test_native_manifest_records(clips):
  manifest = clips / "m.jsonl"
  manifest.write_text("\n".join([
      json.dumps({"id": "a", "audio": ["audio/c0.wav", {"path": str(clips / "audio/c1.wav"), "start": 0.1,
                                                       "end": 0.5}], "text": "hi", "task": "caption"}),
      "",  # blank lines are not examples
      json.dumps({"id": "b", "audio": "audio/c2.wav", "question": "Which?", "choices": ["x", "y"], "answer": "y",
                  "category": "sound", "sub_category": "which", "split": "test", "meta": {"source": "t"}}),
      json.dumps({"audio": ["audio/c3.wav"], "conversation": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "<audio 1> Say?"},
                                                              {"role": "assistant", "content": "ok"}]}),
  ]) + "\n")
  source = open_source(str(manifest), "test")
  assert isinstance(source, JsonlSource) and len(source) == 3
  a, b, c = (to_record(source[i], {"caption": "Describe it.", "transcribe": "T."}) for i in range(3))
  assert a.clips[0].path == str(clips / "audio/c0.wav") and (a.clips[1].start, a.clips[1].end) == (0.1, 0.5)
  assert a.messages == ({"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "hi"})
  assert a.origin == f"{manifest}:1" and b.origin == f"{manifest}:3"
  assert b.task == "mcq" and b.messages[0]["content"] == format_mcq("Which?", ["x", "y"])
  assert (b.category, b.sub_category, b.split, b.extra) == ("sound", "which", "test", {"source": "t"})
  assert c.id == "2" and c.task == "chat" and c.messages[0]["role"] == "system"
  for item, match in [({"audio": ["a.wav"], "text": "x", "answer": "z", "choices": ["y"]}, "not one of the choices"),
                      ({"audio": [{"path": "a.wav", "start": 2, "end": 1}], "text": "x"}, "not after start"),
                      ({"audio": [{"file": "a.wav"}], "text": "x"}, "unknown audio keys"),
                      ({"audio": [], "text": "x"}, "lists no clip"),
                      ({"audio": ["a.wav"]}, "needs 'text'"),
                      ({"text": "x"}, "not a manifest line"),
                      ({"audio": ["a.wav"], "text": "x", "task": "translate"}, "no prompt for task 'translate'")]:
    (clips / "bad.jsonl").write_text(json.dumps(item) + "\n")
    with pytest.raises(DataError, match=match):
      to_record(JsonlSource(str(clips / "bad.jsonl"))[0])


def test_mmau_mmau_pro_and_af3_files(clips, tok):
  mmau = [{"id": "m1", "audio_id": "audio/c0.wav", "question": "What is heard?", "choices": ["tone", "speech"],
           "answer": "tone", "dataset": "x", "task": "sound", "split": "test-mini", "category": ["Counting"],
           "sub-category": "s", "difficulty": "easy"}]
  pro = [{"id": "p1", "audio_path": ["audio/c1.wav", "audio/c2.wav"], "question": "Same?",
          "choices": ["yes", "no", "maybe", "never"], "answer": "no", "category": "multi", "task_identifier": "t"},
         {"id": "p2", "audio_path": "audio/c3.wav", "question": "Describe.", "answer": "", "category": "open"}]
  af3 = [{"id": "f1", "sound": "audio/c4.wav", "duration": 1.8,
          "conversations": [{"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "a tone"}]}]
  for name, items in (("mmau.json", mmau), ("pro.json", pro), ("af3.json", af3)):
    (clips / name).write_text(json.dumps(items))
  m = to_record(open_source(str(clips / "mmau.json"))[0])
  assert isinstance(open_source(str(clips / "mmau.json")), JsonArraySource)
  assert (m.category, m.sub_category, m.answer, m.choices) == ("sound", "Counting", "tone", ("tone", "speech"))
  assert m.messages == ({"role": "user", "content": format_mcq("What is heard?", ["tone", "speech"])},
                        {"role": "assistant", "content": "tone"})
  assert m.extra["difficulty"] == "easy" and m.clips[0].path == str(clips / "audio/c0.wav")
  p1, p2 = (to_record(open_source(str(clips / "pro.json"))[i]) for i in range(2))
  assert [c.path for c in p1.clips] == [str(clips / "audio/c1.wav"), str(clips / "audio/c2.wav")]
  assert p1.category == "multi" and p1.answer == "no"
  assert p2.task == "chat" and p2.answer is None and len(p2.messages) == 1
  f = to_record(open_source(str(clips / "af3.json"))[0])
  assert f.messages[0] == {"role": "user", "content": "<sound>\nWhat is it?"} and f.answer == "a tone"
  # Through the pipeline: MMAU-Pro's two clips become two spans; the unanswered item has no loss.
  got = rows_by_id(dataset(clips / "pro.json", tok))
  assert sorted(got) == [0, 1]
  assert got[0][0].count(tok.audio_bos_id) == 2 and got[1][0].count(tok.audio_bos_id) == 1
  (clips / "broken.json").write_text('[{"id": 1,')
  with pytest.raises(DataError, match="broken.json: invalid JSON"):
    open_source(str(clips / "broken.json"))


def test_packed_array_records_give_the_same_batches(clips, tok, tmp_path):
  out = tmp_path / "packed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "alm_jax", "data", "pack", str(clips / "asr.jsonl"), str(out),
                           "--shards", "2"], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "packed 6 records into 2 shard(s)" in result.stdout
  files = sorted(os.listdir(out))
  assert files == ["asr-00000-of-00002.array_record", "asr-00001-of-00002.array_record"]
  source = open_source(str(out), "asr")
  assert isinstance(source, ArrayRecordSource) and len(source) == 6
  record = to_record(source[4])
  assert record.clips[0].path is None and record.clips[0].name == str(clips / "audio/c4.wav")
  assert source[4].origin.endswith("asr-00001-of-00002.array_record[record 1]")
  assert record.messages[-1]["content"] == TEXTS[4]
  from_manifest = rows_by_id(dataset(clips / "asr.jsonl", tok))
  from_packed = rows_by_id(dataset(str(out / "asr-*.array_record"), tok))
  assert sorted(from_manifest) == sorted(from_packed) == list(range(6))
  for i in range(6):
    assert from_manifest[i][0] == from_packed[i][0]
    np.testing.assert_array_equal(from_manifest[i][1], from_packed[i][1])


def test_pack_reports_bad_lines(clips, tmp_path):
  manifest = tmp_path / "m.jsonl"
  good = json.dumps({"audio": [str(clips / "audio/c0.wav")], "text": "ok"})
  manifest.write_text("\n".join([good, json.dumps({"audio": ["gone.wav"], "text": "x"}), "{oops", good]) + "\n")
  with pytest.raises(AudioError, match=r"gone.wav: cannot read audio .*m.jsonl:2"):
    pack_manifest(str(manifest), str(tmp_path / "out"))
  result = pack_manifest(str(manifest), str(tmp_path / "out2"), skip_bad=True)
  assert (result["records"], result["skipped"]) == (2, 2) and "m.jsonl:3: invalid JSON" in result["reasons"][1]
  assert len(ArrayRecordSource(result["files"])) == 2


def _build_tfds(data_dir, clips):
  """A tiny TFDS dataset (ArrayRecord) holding the clips as int16 Audio plus their transcripts."""
  import soundfile as sf
  import tensorflow_datasets as tfds

  class TinyAsr(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "speech": tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=16000),
          "text": tfds.features.Text(), "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(TEXTS):
        pcm, _ = sf.read(str(clips / "audio" / f"c{i}.wav"), dtype="int16")
        yield i, {"speech": pcm, "text": text, "id": f"ex{i}"}

  TinyAsr(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source_gives_the_same_batches(clips, tok, tmp_path):
  pytest.importorskip("tensorflow")
  from alm_jax.data.tfds_source import TfdsSource

  _build_tfds(tmp_path / "tfds", clips)
  with_tf = TfdsSource("tiny_asr", "test", data_dir=str(tmp_path / "tfds"), use_tensorflow=True)
  without_tf = TfdsSource("tiny_asr", "test", data_dir=str(tmp_path / "tfds"), use_tensorflow=False)
  assert (with_tf.audio_key, with_tf.text_key, with_tf.rate, len(with_tf)) == ("speech", "text", 16000, 6)
  for i in range(6):
    a, b = with_tf[i].payload, without_tf[i].payload
    np.testing.assert_array_equal(a["audio"], b["audio"])
    assert (a["text"], a["id"]) == (b["text"], b["id"])
  got = rows_by_id(dataset("tfds:tiny_asr", tok, tfds_data_dir=str(tmp_path / "tfds")))
  want = rows_by_id(dataset(clips / "asr.jsonl", tok))
  # TFDS shuffles at preparation: match examples by their id feature.
  order = {int(with_tf[i].payload["id"][2:]): i for i in range(6)}
  for j in range(6):
    assert got[order[j]][0] == want[j][0]
    np.testing.assert_array_equal(got[order[j]][1], want[j][1])
  with pytest.raises(DataError, match="no split 'train'"):
    TfdsSource("tiny_asr", "train", data_dir=str(tmp_path / "tfds"), use_tensorflow=False)
  with pytest.raises(DataError, match="not prepared"):
    TfdsSource("nothing_here", "test", data_dir=str(tmp_path / "tfds"), use_tensorflow=False)
