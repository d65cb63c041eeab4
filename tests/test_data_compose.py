"""`alm-jax data compose`: multi-audio questions from labelled single-clip data (synthetic, ours, ESC-50 CSV)."""

import collections
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from alm_jax.audio.io import write_wav
from alm_jax.data import compose, synth
from alm_jax.data.pipeline import DataConfig, make_dataset
from alm_jax.data.sources import ArrayRecordSource, JsonlSource, pack_manifest, to_record
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import DataError
from alm_jax.models.audio_slots import AudioTokenSpec

SPEC = AudioTokenSpec(window_seconds=1.0, max_windows=2, pool=True)
ESC_LABELS = ("dog", "chirping_birds", "rain", "door_wood_knock", "siren")


def _tone(freq: float, seconds: float = 0.25) -> np.ndarray:
  t = np.arange(int(16000 * seconds)) / 16000
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def synth_source(tmp_path_factory):
  """A small synthetic corpus (alm_jax.data.synth): sound events and instruments per split, plus a 3-clip line."""
  root = tmp_path_factory.mktemp("synth")
  sizes = {"train": 30, "validation": 12, "test": 12}
  index = 0
  for split, size in sizes.items():
    lines = []
    for number in range(size):
      kind = ("sound_event", "music_instrument")[number % 2]
      job = synth.Job(index, split, number, kind, number // 2, number % 4, 7)
      lines.append(synth.build_example(job, str(root)))
      index += 1
    lines.append(synth.build_example(synth.Job(index, split, size, "multi_same", 0, 0, 7), str(root)))
    index += 1
    (root / f"{split}.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return root


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
  """An ESC-50-style folder: meta/esc50.csv (filename, fold, target, category, ...) and audio/*.wav; 5 folds."""
  root = tmp_path_factory.mktemp("esc50")
  rows = []
  for fold in range(1, 6):
    for target, label in enumerate(ESC_LABELS):
      for take in "AB":
        name = f"{fold}-{100 + target}-{take}-{target}.wav"
        write_wav(str(root / "audio" / name), _tone(200 + 150 * target + 10 * fold))
        rows.append({"filename": name, "fold": fold, "target": target, "category": label, "esc10": "False",
                     "src_file": 100 + target, "take": take})
  os.makedirs(root / "meta")
  with open(root / "meta" / "esc50.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return root


@pytest.fixture(scope="module")
def hand_source(tmp_path_factory):
  """Our manifest format, hand-made: 80 single-clip lines, labels in meta.label, no split given."""
  root = tmp_path_factory.mktemp("hand")
  lines = []
  for i in range(80):
    label = ("cat", "horn", "bell", "engine", "wind")[i % 5]
    write_wav(str(root / "clips" / f"c{i}.wav"), _tone(300 + 20 * i))
    lines.append({"id": f"c{i}", "audio": f"clips/c{i}.wav", "text": f"recording {i}", "meta": {"label": label}})
  (root / "clips.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return root


def _lines(out, split):
  with open(os.path.join(out, f"{split}.jsonl")) as f:
    return [json.loads(l) for l in f]


def _check_answer(line: dict) -> None:
  """The answer follows from the clips' labels in `meta` (so the question is answerable from the audio)."""
  labels, kind, q = line["meta"]["clip_labels"], line["sub_category"][len("compose_"):], line["question"]
  n = len(labels)
  assert 2 <= n <= 5 and len(line["audio"]) == n == len(line["meta"]["clip_sources"])
  assert line["answer"] in line["choices"] and len(set(line["choices"])) == len(line["choices"])
  # The rationale (`data.clip_rationale`) names the clips' labels and the judgements the answer follows from.
  why = line["meta"]["rationale"]
  quoted = q.split('"')[1] if '"' in q else None
  yes_no = "; ".join(f"clip {k + 1}: {l}, {'yes' if l == quoted else 'no'}" for k, l in enumerate(labels))
  listing = "; ".join(f"clip {k + 1}: {l}" for k, l in enumerate(labels))
  if kind == "which":
    target = q.split('"')[1]
    assert labels.count(target) == 1 and line["answer"] == f"clip {labels.index(target) + 1}"
    assert line["choices"] == [f"clip {k + 1}" for k in range(n)]
    assert why == yes_no and f"{line['answer']}: {target}, yes" in why
  elif kind == "match":
    a, b = (int(w) - 1 for w in line["answer"].split()[1::2])
    assert labels[a] == labels[b] and len(set(labels)) == n - 1
    assert why.count("like") == 1 and f"clip {b + 1}: {labels[b]}, like clip {a + 1}" in why
  elif kind == "count":
    assert line["answer"] == compose.COUNT_WORDS[labels.count(q.split('"')[1])]
    assert why == yes_no and line["answer"] == compose.COUNT_WORDS[why.count(", yes")]
  elif kind == "order":
    assert why == listing
    x, y = q.split('"')[1], q.split('"')[3]
    held = [l for l in labels if l in (x, y)]
    assert len(held) == len(set(held))
    assert line["answer"] == (f"only {held[0]}" if len(held) == 1 else f"{held[0]}, then {held[1]}")
    assert set(line["choices"]) == {f"{x}, then {y}", f"{y}, then {x}", f"only {x}", f"only {y}"}
  else:
    a, b = (int(w) - 1 for w in re.fullmatch(r"Is clip (\d) the same kind of sound as clip (\d)\?", q).groups())
    assert a < b
    assert line["answer"] == ("yes" if labels[a] == labels[b] else "no") and sorted(line["choices"]) == ["no", "yes"]
    assert why == f"clip {a + 1}: {labels[a]}; clip {b + 1}: {labels[b]}"


def _check_balance(lines: list[dict]) -> None:
  """Answer positions: per (type, number of options) each position within one of the others, all of them used."""
  positions = collections.defaultdict(collections.Counter)
  for line in lines:
    positions[(line["sub_category"], len(line["choices"]))][line["choices"].index(line["answer"])] += 1
  for key, counts in positions.items():
    if sum(counts.values()) >= key[1]:
      assert len(counts) == key[1] and max(counts.values()) - min(counts.values()) <= 1, (key, counts)


def _check_disjoint(out) -> dict[str, set]:
  files = {s: {os.path.normpath(os.path.join(out, a)) for l in _lines(out, s) for a in l["audio"]}
           for s in synth.SPLITS}
  assert not files["train"] & files["validation"] and not files["train"] & files["test"]
  assert not files["validation"] & files["test"]
  return files


def test_synthetic_corpus_compose_keeps_splits_types_and_balance(synth_source, tmp_path):
  out = tmp_path / "c"
  summary = compose.write_composed([str(synth_source)], str(out), seed=3,
                                   questions={"train": 24, "validation": 8, "test": 8},
                                   select={"sub_category": ["sound_event", "music_instrument"]})
  assert summary["splits"] == {"train": 120, "validation": 40, "test": 40}
  assert summary["source_clips"] == {"train": 30, "validation": 12, "test": 12}  # the 3-clip lines are not selected
  source = {}
  for split in synth.SPLITS:
    for number, line in enumerate(_lines(synth_source, split), start=1):
      source[f"{synth_source / split}.jsonl:{number}"] = line
  for split in synth.SPLITS:
    lines = _lines(out, split)
    vocabulary = {source[s]["answer"] for s in source if source[s]["split"] == split and "answer" in source[s]
                  and source[s]["sub_category"] in ("sound_event", "music_instrument")}
    for line in lines:  # named labels (targets, order options) come from this split's label vocabulary
      assert set(line["question"].split('"')[1::2]) <= vocabulary
    assert collections.Counter(l["sub_category"] for l in lines) == {f"compose_{t}": len(lines) // 5
                                                                       for t in compose.TYPES}
    for line in lines:
      _check_answer(line)
      assert line["split"] == split and line["category"] == "multi-audio" and line["task"] == "mcq"
      for src, ident, label in zip(*(line["meta"][k] for k in ("clip_sources", "clip_ids", "clip_labels"))):
        origin = source[src]  # every clip comes from a named line of the same split, with its label
        assert origin["split"] == split and origin["id"] == ident and origin["answer"] == label
    _check_balance(lines)
    assert {len(l["audio"]) for l in lines} == {2, 3, 4, 5}
  _check_disjoint(out)


def test_esc50_folds_labels_and_pipeline(esc50, tmp_path):
  out = tmp_path / "esc"
  summary = compose.write_composed([str(esc50)], str(out), seed=0, questions={"train": 30, "validation": 10,
                                                                              "test": 10})
  assert summary["labels"] == {"train": 5, "validation": 5, "test": 5}
  files = _check_disjoint(out)
  folds = {s: {os.path.basename(f).split("-")[0] for f in files[s]} for s in synth.SPLITS}
  assert folds == {"train": {"1", "2", "3"}, "validation": {"4"}, "test": {"5"}}  # the source's folds kept
  for split in synth.SPLITS:
    lines = _lines(out, split)
    for line in lines:
      _check_answer(line)
      assert set(line["meta"]["clip_labels"]) <= {l.replace("_", " ") for l in ESC_LABELS}
      assert all(s.startswith(f"{esc50 / 'meta' / 'esc50.csv'}:") for s in line["meta"]["clip_sources"])
    _check_balance(lines)
  # Our readers take the output as it is: the manifest parser, the Grain pipeline and `data pack`.
  tok = Tokenizer.load(str(out), "tiny")
  cfg = DataConfig.from_config({"path": str(out), "batch_size": 4, "length_buckets": (128, 256), "max_clips": 5,
                                "packing": False})
  ds = make_dataset(cfg, SPEC, tok, split="test", process_index=0, process_count=1)
  seen = collections.Counter()
  it = iter(ds)
  for batch in it:
    for r, ex in enumerate(batch["example_id"].tolist()):
      if ex >= 0:
        seen[ex] += 1
        assert batch["audio_clip"][r].max() + 1 == len(_lines(out, "test")[ex]["audio"])
  it.close()
  assert sorted(seen) == list(range(50)) and set(seen.values()) == {1}
  packed = pack_manifest(str(out / "validation.jsonl"), str(tmp_path / "packed"))
  records = ArrayRecordSource(packed["files"])
  assert len(records) == 50
  record = to_record(records[0])
  assert record.task == "mcq" and len(record.clips) == len(_lines(out, "validation")[0]["audio"])
  assert record.extra["clip_sources"] == _lines(out, "validation")[0]["meta"]["clip_sources"]


def test_hand_manifest_resplit_by_clip_and_determinism(hand_source, tmp_path):
  args = dict(questions={"train": 10, "validation": 5, "test": 5}, label_key="meta.label", clip_range=(2, 3))
  summary = compose.write_composed([str(hand_source / "clips.jsonl")], str(tmp_path / "a"), seed=5, **args)
  assert summary["source_clips"] == {"train": 64, "validation": 8, "test": 8}
  assert summary["labels"]["train"] == 5 and min(summary["labels"].values()) >= 3  # spread over the labels
  _check_disjoint(tmp_path / "a")
  source = JsonlSource(str(tmp_path / "a" / "train.jsonl"))
  assert len(source) == 50 and all(to_record(source[i]).answer for i in range(len(source)))
  for line in _lines(tmp_path / "a", "train"):
    _check_answer(line)
    assert {len(line["audio"])} <= {2, 3} and set(line["meta"]["clip_labels"]) <= {"cat", "horn", "bell", "engine",
                                                                                     "wind"}
  compose.write_composed([str(hand_source / "clips.jsonl")], str(tmp_path / "b"), seed=5, **args)
  compose.write_composed([str(hand_source / "clips.jsonl")], str(tmp_path / "c"), seed=6, **args)
  for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "compose.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_spans_of_one_file_stay_in_one_split():
  """Split by file: every span of a recording lands in one split; a file given two splits is an error."""
  clips = [compose.LabelledClip(f"/a/{f}.wav", ("x", "y", "z")[(f + s) % 3], f"m.jsonl:{3 * f + s + 1}", "i",
                                None, float(s), float(s + 1)) for f in range(30) for s in range(3)]
  splits = compose.split_clips(clips + clips[:5], np.random.default_rng(0))  # repeated lines count once
  where = {c.path: split for split, group in splits.items() for c in group}
  assert sum(map(len, splits.values())) == 90 and len(where) == 30
  assert all(len({s for s, g in splits.items() for c in g if c.path == p}) == 1 for p in where)
  assert {s: len(g) // 3 for s, g in splits.items()} == {"train": 24, "validation": 3, "test": 3}
  clash = [dataclasses.replace(clips[0], split="train"), dataclasses.replace(clips[1], split="test")]
  with pytest.raises(DataError, match=r"m.jsonl:2: /a/0.wav is in split 'test' here and 'train' at m.jsonl:1"):
    compose.split_clips(clash, np.random.default_rng(0))
  with pytest.raises(DataError, match=r"m.jsonl:9: the same clip is at m.jsonl:1 with label 'x', here 'q'"):
    compose.split_clips([clips[0], dataclasses.replace(clips[0], label="q", source="m.jsonl:9")],
                        np.random.default_rng(0))


def _one_line_error(match: str, *args, **kw) -> str:
  with pytest.raises(DataError, match=match) as e:
    compose.write_composed(*args, **kw)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_bad_input_is_one_line_naming_the_manifest_and_line(hand_source, esc50, tmp_path):
  lines = [json.dumps({**l, "audio": str(hand_source / l["audio"])})  # absolute: bad.jsonl lies elsewhere
           for l in map(json.loads, (hand_source / "clips.jsonl").read_text().splitlines())]
  bad = tmp_path / "bad.jsonl"
  unlabelled = json.loads(lines[2])
  del unlabelled["meta"]
  bad.write_text("\n".join(lines[:2] + [json.dumps(unlabelled)] + lines[3:]) + "\n")
  _one_line_error(f"{bad}:3: unlabelled clip", [str(bad)], str(tmp_path / "o"), label_key="meta.label")
  missing = json.loads(lines[1])
  missing["audio"] = str(hand_source / "clips" / "gone.wav")
  bad.write_text("\n".join([lines[0], json.dumps(missing)] + lines[2:]) + "\n")
  _one_line_error(f"{bad}:2: missing audio file .*gone.wav", [str(bad)], str(tmp_path / "o"), label_key="meta.label")
  two = json.loads(lines[0])
  two["audio"] = [two["audio"], json.loads(lines[1])["audio"]]
  bad.write_text("\n".join([json.dumps(two)] + lines[1:]) + "\n")
  _one_line_error(f"{bad}:1: 2 clips; compose reads single-clip lines", [str(bad)], str(tmp_path / "o"),
                  label_key="meta.label")
  # Two labels only: "order" needs X, Y and another label.
  two_labels = [l for l in lines if json.loads(l)["meta"]["label"] in ("cat", "horn")]
  bad.write_text("\n".join(two_labels) + "\n")
  _one_line_error(f"{bad}: split 'train' has 2 distinct labels .* 'order' questions need at least 3 labels",
                  [str(bad)], str(tmp_path / "o"), label_key="meta.label", types=["order"])
  # ESC-50: a row whose wav is gone names the CSV line.
  csv_path = esc50 / "meta" / "esc50.csv"
  rows = csv_path.read_text().splitlines()
  (tmp_path / "meta").mkdir()
  (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows[:4] + [rows[4].replace(".wav", "-x.wav")]) + "\n")
  _one_line_error(f"{tmp_path / 'meta' / 'esc50.csv'}:5: missing audio file", [str(tmp_path / "meta" / "esc50.csv")],
                  str(tmp_path / "o"), audio_root=str(esc50 / "audio"))


def test_cli_compose(esc50, tmp_path):
  from alm_jax.commands.data import _compose_types  # pylint: disable=import-outside-toplevel

  assert _compose_types() == compose.TYPES  # --help lists them without importing numpy
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "alm_jax", "data", "compose", "--in", str(esc50), "--out", str(tmp_path / "o"),
         "--questions", "10,5,5", "--clips", "2-4", "--types", "which,same", "--seed", "1"]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "composed 40 questions" in result.stdout
  assert {l["sub_category"] for l in _lines(tmp_path / "o", "train")} == {"compose_which", "compose_same"}
  result = subprocess.run(cmd[:-6] + ["--clips", "9-2"], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "--clips '9-2'" in result.stderr


def test_clotho_and_audiocaps_layouts(tmp_path):
  """Caption CSVs: Clotho (file_name, caption_1..5; audio in a folder per split) and AudioCaps (ids, caption)."""
  clotho = tmp_path / "clotho"
  for split, names in (("development", ["a.wav", "b.wav"]), ("evaluation", ["c.wav"])):
    rows = [{"file_name": n, **{f"caption_{k}": f"caption {k} of {n}" for k in range(1, 6)}} for n in names]
    for n in names:
      write_wav(str(clotho / split / n), _tone(440))
    with open(clotho / f"clotho_captions_{split}.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  clips = compose.read_clips([str(clotho)], label_key="caption_2")
  assert [(c.id, c.label, c.split) for c in clips] == [
      ("a.wav", "caption 2 of a.wav", "train"), ("b.wav", "caption 2 of b.wav", "train"),
      ("c.wav", "caption 2 of c.wav", "test")]
  assert clips[2].path == str(clotho / "evaluation" / "c.wav") and clips[2].source == f"{clotho}/" \
      "clotho_captions_evaluation.csv:2"
  caps = tmp_path / "audiocaps"
  write_wav(str(caps / "audio" / "val" / "yt1.wav"), _tone(440))
  write_wav(str(caps / "audio" / "val" / "91.wav"), _tone(440))
  (caps / "val.csv").write_text('audiocap_id,youtube_id,start_time,caption\n90,yt1,30,"A dog barks, twice"\n'
                                "91,yt2,0,Rain falls\n")
  clips = compose.read_clips([str(caps / "val.csv")])
  assert [(c.id, c.label, c.split, os.path.basename(c.path)) for c in clips] == [
      ("90", "A dog barks, twice", "validation", "yt1.wav"), ("91", "Rain falls", "validation", "91.wav")]
