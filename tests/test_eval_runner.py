"""The evaluation runner: exact per-category numbers, resume, 2 processes = 1 process, MMAU-Pro, long audio."""

import glob
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from alm_jax.errors import DataError
from alm_jax.eval import longaudio, mc_scoring
from alm_jax.eval.runner import EvalOptions, PredictionStore, run_eval

INSTRUMENTS = ["Violin", "Piano", "Drums", "Flute"]
VOICES = ["Man", "Woman", "Child", "Robot"]
SOUNDS = ["Siren", "Thunder", "Doorbell"]
# id, task (category), choices, answer, difficulty
ITEMS = [
    ("s1", "speech", VOICES, "Woman", "easy"),
    ("s2", "speech", VOICES, "Child", "hard"),
    ("s3", "speech", ["Yes", "No"], "No", "hard"),
    ("o1", "sound", VOICES, "Robot", "easy"),
    ("o2", "sound", SOUNDS, "Thunder", "hard"),
    ("m1", "music", INSTRUMENTS, "Piano", "easy"),
    ("m2", "music", INSTRUMENTS, "Drums", "hard"),
    ("m3", "music", INSTRUMENTS, "Flute", "hard"),
]


def write_mmau(root) -> str:
  """A small MMAU test-mini style file (published field names) with 8 good and 2 malformed items."""
  os.makedirs(os.path.join(root, "audios"), exist_ok=True)
  records = []
  for rid, task, choices, answer, difficulty in ITEMS:
    sf.write(os.path.join(root, "audios", rid + ".wav"), np.zeros(400, np.float32), 16000)
    records.append({"id": rid, "audio_id": f"./audios/{rid}.wav", "question": f"Question {rid}?",
                    "choices": choices, "answer": answer, "dataset": "synthetic", "task": task, "split": "test-mini",
                    "category": "Reasoning", "sub-category": "Identification", "difficulty": difficulty})
  records.append({"id": "no_audio", "audio_id": "./audios/absent.wav", "question": "Q?", "choices": VOICES,
                  "answer": "Man", "task": "sound", "difficulty": "easy"})
  records.append({"id": "no_choices", "audio_id": "./audios/s1.wav", "question": "Q?", "answer": "Man",
                  "task": "music", "difficulty": "easy"})
  path = os.path.join(root, "mmau-test-mini.json")
  with open(path, "w") as f:
    json.dump(records, f, indent=2)
  return path


class FakePredictor:
  """Deterministic answers: speech → the option text, sound → the bare letter, music → a mix."""

  def __init__(self, fail_after_calls=None):
    self.calls = []
    self.fail_after_calls = fail_after_calls

  def predict(self, items):
    if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
      raise RuntimeError("simulated preemption")
    self.calls.append([item.id for item in items])
    return [self.answer(item) for item in items]

  @staticmethod
  def answer(item):
    choices = list(item.choices)
    if item.category == "speech":
      return item.answer
    if item.category == "sound":
      return mc_scoring.LETTERS[choices.index(item.answer)]
    other = next(c for c in choices if c != item.answer)
    return {"m1": f"The answer is: {item.answer}.", "m2": f"{item.answer} or {other}", "m3": ""}[item.id]


def test_exact_per_category_numbers(tmp_path):
  data = write_mmau(tmp_path)
  out = tmp_path / "report.json"
  report = run_eval(FakePredictor(), "mmau", data, str(tmp_path), str(out), EvalOptions(checkpoint="fake",
                                                                                          progress=False))
  assert report["benchmark"] == "mmau" and report["checkpoint"] == "fake" and report["n"] == 8
  official, robust = report["scores"]["official"], report["scores"]["robust"]
  assert official["overall"] == {"accuracy": 0.5, "random": pytest.approx(7 / 24), "n": 8, "correct": 4}
  assert robust["overall"]["accuracy"] == 0.75 and robust["overall"]["n"] == 8
  assert list(official["by_category"]) == ["music", "sound", "speech"]
  want_official = {"speech": 1.0, "sound": 0.0, "music": 1 / 3}
  want_robust = {"speech": 1.0, "sound": 1.0, "music": 1 / 3}
  want_random = {"speech": 1 / 3, "sound": 7 / 24, "music": 1 / 4}
  want_n = {"speech": 3, "sound": 2, "music": 3}
  for name in want_n:
    assert official["by_category"][name]["accuracy"] == pytest.approx(want_official[name])
    assert robust["by_category"][name]["accuracy"] == pytest.approx(want_robust[name])
    assert official["by_category"][name]["random"] == pytest.approx(want_random[name])
    assert official["by_category"][name]["n"] == robust["by_category"][name]["n"] == want_n[name]
  assert official["by_difficulty"]["easy"]["accuracy"] == pytest.approx(2 / 3)
  assert official["by_difficulty"]["hard"]["accuracy"] == pytest.approx(2 / 5)
  assert robust["by_difficulty"]["easy"]["accuracy"] == 1.0
  assert robust["by_difficulty"]["hard"]["accuracy"] == pytest.approx(3 / 5)
  assert official["by_sub_category"]["Identification"]["n"] == 8
  assert official["by_skill"]["Reasoning"]["n"] == 8
  assert {s["id"]: s["reason"] for s in report["skipped"]} == {
      "no_audio": f"missing audio file: {tmp_path / 'audios' / 'absent.wav'}", "no_choices": "missing choices"}
  assert [row["id"] for row in report["items"]] == [rid for rid, *_ in ITEMS]
  # The files beside the report.
  assert json.loads(out.read_text()) == report
  markdown = (tmp_path / "report.md").read_text()
  assert "| overall |  | 8 | 50.0 | 75.0 | 29.2 |" in markdown
  assert "| category | sound | 2 | 0.0 | 100.0 | 29.2 |" in markdown
  assert "| no_audio | missing audio file:" in markdown and "| no_choices | missing choices |" in markdown
  assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _saved_ids(directory):
  ids = []
  for path in glob.glob(os.path.join(directory, "predictions-*.jsonl")):
    with open(path) as f:
      ids += [json.loads(line)["id"] for line in f if line.strip().endswith("}")]
  return ids


def test_resume_after_interruption_predicts_nothing_twice(tmp_path):
  data = write_mmau(tmp_path)
  options = EvalOptions(checkpoint="fake", batch_size=3, progress=False)
  full = run_eval(FakePredictor(), "mmau", data, str(tmp_path), str(tmp_path / "full" / "report.json"), options)

  out = tmp_path / "resumed" / "report.json"
  first = FakePredictor(fail_after_calls=2)
  with pytest.raises(RuntimeError, match="simulated preemption"):
    run_eval(first, "mmau", data, str(tmp_path), str(out), options)
  assert not out.exists()
  first_ids = [i for call in first.calls for i in call]
  assert len(first_ids) == 6
  directory = tmp_path / "resumed" / "report.predictions"
  assert sorted(_saved_ids(directory)) == sorted(first_ids)
  # A write torn by the interruption: the item is not counted as done, and the file is repaired.
  (own,) = glob.glob(str(directory / "predictions-*.jsonl"))
  with open(own, "a") as f:
    f.write('{"id": "m3", "predic')

  second = FakePredictor()
  report = run_eval(second, "mmau", data, str(tmp_path), str(out), options)
  second_ids = [i for call in second.calls for i in call]
  assert sorted(second_ids) == sorted({rid for rid, *_ in ITEMS} - set(first_ids))
  assert not set(first_ids) & set(second_ids)
  saved = _saved_ids(directory)
  assert sorted(saved) == sorted(rid for rid, *_ in ITEMS)  # each item saved exactly once
  assert report == full

  third = FakePredictor()
  assert run_eval(third, "mmau", data, str(tmp_path), str(out), options) == full
  assert third.calls == []  # everything was already predicted


def test_resume_refuses_another_checkpoint_or_prompt(tmp_path):
  data = write_mmau(tmp_path)
  out = str(tmp_path / "r.json")
  run_eval(FakePredictor(), "mmau", data, str(tmp_path), out, EvalOptions(checkpoint="a", progress=False))
  with pytest.raises(DataError, match="another checkpoint"):
    run_eval(FakePredictor(), "mmau", data, str(tmp_path), out, EvalOptions(checkpoint="b", progress=False))
  with pytest.raises(DataError, match="another prompt"):
    run_eval(FakePredictor(), "mmau", data, str(tmp_path), out, EvalOptions(checkpoint="a", think=True,
                                                                            progress=False))


def test_lockstep_calls_with_full_batches_and_drops_fillers(tmp_path):
  data = write_mmau(tmp_path)
  predictor = FakePredictor()
  out = str(tmp_path / "r.json")
  report = run_eval(predictor, "mmau", data, str(tmp_path), out,
                    EvalOptions(batch_size=3, lockstep=True, progress=False, chart=False))
  assert [len(call) for call in predictor.calls] == [3, 3, 3]
  assert predictor.calls[-1][2] == "s1"  # the filler
  assert sorted(_saved_ids(str(tmp_path / "r.predictions"))) == sorted(rid for rid, *_ in ITEMS)
  assert report["n"] == 8 and not os.path.exists(tmp_path / "r.png")


WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, data, root, out, tests = sys.argv[1:7]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    sys.path.insert(0, tests)
    from test_eval_runner import FakePredictor
    from alm_jax.eval.runner import EvalOptions, run_eval
    predictor = FakePredictor()
    report = run_eval(predictor, "mmau", data, root, out, EvalOptions(checkpoint="fake", batch_size=3))
    assert jax.process_count() == 2 and (report is None) == (jax.process_index() != 0)
    assert all(len(call) == 3 for call in predictor.calls), predictor.calls
    print("calls", len(predictor.calls))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_same_report_as_one(tmp_path):
  data = write_mmau(tmp_path)
  single = run_eval(FakePredictor(), "mmau", data, str(tmp_path), str(tmp_path / "one" / "report.json"),
                    EvalOptions(checkpoint="fake", batch_size=3, progress=False))
  worker = tmp_path / "worker.py"
  worker.write_text(WORKER)
  port = _free_port()
  out = tmp_path / "two" / "report.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port), data, str(tmp_path), str(out),
                             os.path.dirname(os.path.abspath(__file__))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=180)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  assert logs[0].strip().splitlines()[-1] == logs[1].strip().splitlines()[-1] == "calls 2"  # lockstep
  directory = tmp_path / "two" / "report.predictions"
  files = sorted(os.listdir(directory))
  assert files == ["predictions-p00000-of-00002.jsonl", "predictions-p00001-of-00002.jsonl"]
  shares = [[json.loads(line)["id"] for line in (directory / name).read_text().splitlines()] for name in files]
  assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == sorted(rid for rid, *_ in ITEMS)
  assert json.loads(out.read_text()) == single
  assert (tmp_path / "two" / "report.md").read_text() == (tmp_path / "one" / "report.md").read_text()


def write_mmau_pro(root) -> str:
  """MMAU-Pro style items: closed (single and multi-audio), open, instruction following, malformed."""
  for name in ("a.wav", "b.wav"):
    sf.write(os.path.join(root, name), np.zeros(400, np.float32), 16000)
  records = [
      {"id": "p1", "audio_path": "a.wav", "question": "Which?", "choices": SOUNDS, "answer": "Siren",
       "category": "sound"},
      {"id": "p2", "audio_path": "a.wav", "question": "Which?", "choices": INSTRUMENTS, "answer": "Flute",
       "category": "music"},
      {"id": "p3", "audio_path": ["a.wav", "b.wav"], "question": "Which clip has the siren?",
       "choices": ["Clip 1", "Clip 2"], "answer": "Clip 2", "category": "multi"},
      {"id": "p4", "audio_path": "b.wav", "question": "Where is the source?", "choices": ["Left", "Right"],
       "answer": "Left", "category": "spatial_audio"},
      {"id": "p5", "audio_path": "a.wav", "question": "What happens?", "choices": [], "answer": "A dog barks.",
       "category": "open"},
      {"id": "p6", "audio_path": "a.wav", "question": "Describe the clip without commas.", "choices": None,
       "answer": "", "category": "instruction following", "task_identifier": "No Commas", "kwargs": {}},
      {"id": "p7", "audio_path": "a.wav", "question": "Which?", "choices": None, "answer": "Siren",
       "category": "sound"},
  ]
  path = os.path.join(root, "mmau-pro.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def _pro_predict(items):
  answers = {"p1": "Siren", "p2": "B", "p3": "Clip 1", "p4": "(A) Left", "p5": "A dog is barking",
             "p6": "A dog barks twice"}
  return [answers[item.id] for item in items]


class DogJudge:
  """A stand-in judge: full marks when the answer mentions a dog."""

  def judge(self, items, predictions):
    return [1.0 if "dog" in (p or "").lower() else 0.0 for p in predictions]


def test_mmau_pro_categories_open_items_and_judge(tmp_path):
  data = write_mmau_pro(tmp_path)
  out = str(tmp_path / "pro.json")
  report = run_eval(_pro_predict, "mmau-pro", data, str(tmp_path), out, EvalOptions(progress=False, chart=False))
  robust, official = report["scores"]["robust"], report["scores"]["official"]
  assert list(robust["by_category"]) == ["multi", "music", "sound", "spatial_audio"]
  assert {k: v["accuracy"] for k, v in robust["by_category"].items()} == {
      "multi": 0.0, "music": 0.0, "sound": 1.0, "spatial_audio": 1.0}
  assert official["overall"]["accuracy"] == 0.5 and robust["overall"]["n"] == 4
  assert robust["overall"]["random"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2 + 1 / 2) / 4)
  assert report["scores"]["instruction_following"]["overall"]["accuracy"] == 1.0
  assert report["unscored"] == [{"id": "p5", "category": "open", "reason": "open-ended: no judge configured",
                                 "prediction": "A dog is barking"}]
  assert report["skipped"] == [{"id": "p7", "reason": "missing choices", "line": 7}]
  assert any("NV-Embed" in note for note in report["notes"])
  assert report["n"] == 5

  def must_not_run(items):
    raise AssertionError("predictions should be reused")

  judged = run_eval(must_not_run, "mmau-pro", data, str(tmp_path), out,
                    EvalOptions(progress=False, chart=False, judge=DogJudge()))
  assert judged["scores"]["judge"]["overall"] == {"accuracy": 1.0, "random": None, "n": 1, "correct": 1}
  assert judged["scores"]["judge"]["by_category"]["open"]["n"] == 1
  assert judged["unscored"] == [] and judged["n"] == 6
  assert "| category (judge) | open | 1 |" in (tmp_path / "pro.md").read_text()


def test_long_audio_accuracy_by_length_bucket(tmp_path):
  sf.write(tmp_path / "short.wav", np.zeros(32000, np.float32), 16000)  # 2 s, length read from the header
  sf.write(tmp_path / "long.wav", np.zeros(400, np.float32), 16000)  # stands in for long clips with `duration`
  rows = [("l1", "short.wav", None), ("l2", "long.wav", 20.0), ("l3", "long.wav", 45.0),
          ("l4", "long.wav", 200.0), ("l5", "long.wav", 700.0)]
  manifest = tmp_path / "long.jsonl"
  manifest.write_text("\n".join(json.dumps({
      "id": rid, "audio": [path], "question": "What happens?", "choices": SOUNDS, "answer": "Doorbell",
      "category": "sound", **({"duration": seconds} if seconds is not None else {})}) for rid, path, seconds in rows))
  loaded = longaudio.load_longaudio(str(manifest))
  assert loaded.items[0].duration == pytest.approx(2.0)

  def predict(items):
    return ["Siren" if item.id == "l4" else "Doorbell" for item in items]

  report = run_eval(predict, "longaudio", str(manifest), None, str(tmp_path / "long.json"),
                    EvalOptions(progress=False, chart=False))
  by_length = report["scores"]["robust"]["by_length"]
  assert list(by_length) == ["0-30s", "30s-1min", "2min-5min", "10min+"]
  assert {k: (v["n"], v["accuracy"]) for k, v in by_length.items()} == {
      "0-30s": (2, 1.0), "30s-1min": (1, 1.0), "2min-5min": (1, 0.0), "10min+": (1, 1.0)}
  assert longaudio.bucket_of(None) == longaudio.UNKNOWN and longaudio.bucket_of(600.0) == "10min+"
  assert longaudio.bucket_labels((30.0, 90.0)) == ["0-30s", "30s-90s", "90s+"]


def test_prediction_store_tolerates_a_torn_tail_only(tmp_path):
  store = PredictionStore(str(tmp_path))
  with store.open_own(0, 1) as handle:
    store.append(handle, [{"id": "a", "prediction": "x"}])
  path = store.own_path(0, 1)
  with open(path, "a") as f:
    f.write('{"id": "b", "pred')
  assert list(store.read_all()) == ["a"]
  with open(path, "a") as f:
    f.write('\n{"id": "c", "prediction": "y"}\n')
  with pytest.raises(DataError, match="corrupt prediction record"):
    store.read_all()
