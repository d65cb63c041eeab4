"""`alm-jax eval --predictions` (answers from any source, no checkpoint) and `alm-jax eval --compare`."""

import json
import os
import subprocess
import sys

import pytest

from alm_jax import cli
from alm_jax.eval.runner import EvalOptions, load_benchmark, run_eval
from tests.helpers import REPO, cli_env
from tests.test_eval_runner import SOUNDS, FakePredictor, _pro_predict, write_mmau, write_mmau_pro

PNG = b"\x89PNG\r\n\x1a\n"


def _items(data):
  """The benchmark's items as `--predictions` sees them (audio not checked: nothing is generated)."""
  return load_benchmark("mmau", data, None, EvalOptions(check_audio=False)).items


def _jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def _eval(*args):
  """Runs `alm-jax eval ARGS` in this process; returns the exit code."""
  return cli.main(["eval", *args])


def _report(path):
  with open(path) as f:
    return json.load(f)


def _scored(report):
  """A report without what names its source (notes, checkpoint)."""
  return {k: v for k, v in report.items() if k not in ("notes", "checkpoint")}


def test_three_layouts_give_one_report(tmp_path):
  data = write_mmau(tmp_path)
  answers = {item.id: FakePredictor.answer(item) for item in _items(data)}
  jsonl = _jsonl(tmp_path / "preds.jsonl", [{"id": i, "prediction": p} for i, p in answers.items()])
  array = tmp_path / "preds.json"
  array.write_text(json.dumps([{"id": i, "prediction": p} for i, p in answers.items()], indent=2))
  with open(data) as f:
    records = json.load(f)
  # The published layout: the benchmark's own records with the answer added (one record in the other spelling);
  # the skipped record (no choices) carries an answer too, which is neither scored nor "unmatched".
  published = [{**r, ("model_output" if r["id"] == "s2" else "model_prediction"): answers.get(r["id"], "Man")}
               for r in records]
  (tmp_path / "published.json").write_text(json.dumps(published, indent=1))
  runs = {
      "jsonl": ["--predictions", jsonl, "--data", data],
      "array": ["--predictions", str(array), "--data", data],
      "published": ["--predictions", str(tmp_path / "published.json")],  # its own benchmark file
      "published+data": ["--predictions", str(tmp_path / "published.json"), "--data", data],
  }
  reports = {}
  for name, args in runs.items():
    out = tmp_path / name / "r.json"
    assert _eval(*args, "--benchmark", "mmau", "--out", str(out), "--name", "fake") == 0
    reports[name] = _report(out)
    assert reports[name]["checkpoint"] == "fake"
    assert (tmp_path / name / "r.md").read_text().startswith("# mmau — fake")
    assert (tmp_path / name / "r.png").read_bytes()[:8] == PNG
  first = _scored(reports["jsonl"])
  assert first["n"] == 9 and first["missing_predictions"] == [] and first["unmatched_predictions"] == []
  assert first["skipped"] == [{"id": "no_choices", "reason": "missing choices", "line": 10}]
  for name in runs:
    assert _scored(reports[name]) == first, name
  assert any("published MMAU layout" in note for note in reports["published"]["notes"])
  # Without --name the report names the predictions file.
  assert _eval("--predictions", jsonl, "--data", data, "--benchmark", "mmau", "--out", str(tmp_path / "x.json")) == 0
  assert _report(tmp_path / "x.json")["checkpoint"] == jsonl


@pytest.mark.parametrize("think", [False, True])
def test_scores_equal_the_checkpoint_path(tmp_path, think):
  """The same answers give the same report whether a predictor produced them or a file holds them."""
  data = write_mmau(tmp_path)

  def answer(item):
    plain = FakePredictor.answer(item)
    if not think:
      return plain
    other = next(c for c in item.choices if c != item.answer)
    return f"<think>Could it be {other}?</think>\nIt is not {other}.\nFinal answer: {plain}"

  reference = run_eval(lambda items: [answer(i) for i in items], "mmau", data, None, str(tmp_path / "ref.json"),
                       EvalOptions(checkpoint="fake", think=think, check_audio=False, progress=False, chart=False))
  preds = _jsonl(tmp_path / "p.jsonl", [{"id": i.id, "prediction": answer(i)} for i in _items(data)])
  out = tmp_path / "r.json"
  args = ["--predictions", preds, "--data", data, "--benchmark", "mmau", "--out", str(out), "--name", "fake"]
  assert _eval(*args, *(["--think"] if think else [])) == 0
  report = _report(out)
  for key in ("benchmark", "checkpoint", "n", "scores", "items", "skipped", "unscored", "settings"):
    assert report[key] == reference[key], key
  assert report["scores"]["official"]["overall"]["accuracy"] == pytest.approx(4 / 9)
  if think:  # the reasoning names a wrong option: only the final answer may be scored
    assert _eval(*args) == 0
    assert _report(out)["scores"]["official"]["overall"]["accuracy"] == 0.0


def _longaudio(root):
  """A long-audio manifest whose clips are absent: lengths come from `duration` (else "unknown length")."""
  rows = [("l1", 20.0, "Doorbell"), ("l2", 45.0, "Siren"), ("l3", None, "Doorbell")]
  return _jsonl(root / "long.jsonl", [{"id": i, "audio": ["absent.wav"], "question": "What happens?", "choices": SOUNDS,
                                      "answer": "Doorbell", "category": "sound",
                                      **({"duration": d} if d is not None else {})} for i, d, _ in rows])


@pytest.mark.parametrize("benchmark", ["mmau-pro", "longaudio"])
def test_other_benchmarks_score_as_the_checkpoint_path_does(tmp_path, benchmark):
  if benchmark == "mmau-pro":  # closed, multi-audio, open and instruction-following items
    data, predict = write_mmau_pro(tmp_path), _pro_predict
  else:
    data = _longaudio(tmp_path)
    predict = lambda items: ["Siren" if item.id == "l2" else "Doorbell" for item in items]  # noqa: E731
  options = EvalOptions(checkpoint="x", check_audio=False, progress=False, chart=False)
  reference = run_eval(predict, benchmark, data, None, str(tmp_path / "ref.json"), options)
  items = load_benchmark(benchmark, data, None, options).items
  preds = _jsonl(tmp_path / "p.jsonl", [{"id": i.id, "prediction": p} for i, p in zip(items, predict(items))])
  out = tmp_path / "r.json"
  assert _eval("--predictions", preds, "--data", data, "--benchmark", benchmark, "--out", str(out), "--name", "x") == 0
  report = _report(out)
  for key in ("n", "scores", "items", "skipped", "unscored", "settings"):
    assert report[key] == reference[key], key
  if benchmark == "longaudio":
    assert {k: v["n"] for k, v in report["scores"]["robust"]["by_length"].items()} == {
        "0-30s": 1, "30s-1min": 1, "unknown length": 1}
  else:
    assert report["unscored"][0]["id"] == "p5" and "instruction_following" in report["scores"]


def test_missing_predictions_count_as_wrong_and_are_listed(tmp_path):
  data = write_mmau(tmp_path)
  items = _items(data)
  oracle = [{"id": i.id, "prediction": i.answer} for i in items]
  records = [r for r in oracle if r["id"] not in ("s2", "m1")]
  records[0]["prediction"] = None  # a null answer is no answer
  records.append({"id": "extra", "prediction": "Man"})
  records.append(dict(records[1]))  # the same answer twice is fine
  preds = _jsonl(tmp_path / "p.jsonl", records)
  out = tmp_path / "r.json"
  assert _eval("--predictions", preds, "--data", data, "--benchmark", "mmau", "--out", str(out)) == 0
  report = _report(out)
  assert report["n"] == 9
  assert report["missing_predictions"] == ["s1", "s2", "m1"] and report["unmatched_predictions"] == ["extra"]
  for scorer in ("official", "robust"):
    overall = report["scores"][scorer]["overall"]
    assert (overall["accuracy"], overall["n"], overall["correct"]) == (pytest.approx(6 / 9), 9, 6)
    assert report["scores"][scorer]["by_category"]["speech"]["accuracy"] == pytest.approx(1 / 3)
  rows = {row["id"]: row for row in report["items"]}
  assert rows["s2"]["prediction"] is None and rows["s2"]["official"] is False and rows["s2"]["robust"] is False
  assert any(note.startswith("3 of 9 items have no prediction") for note in report["notes"])
  markdown = (tmp_path / "r.md").read_text()
  assert "## Items without a prediction (scored as empty answers)\n\n`s1`, `s2`, `m1`" in markdown
  assert "## Prediction ids that name no item (ignored)\n\n`extra`" in markdown

  # The published layout: a record without `model_prediction` is a missing answer, as the published scorer counts it.
  with open(data) as f:
    published = [{**r, **({"model_prediction": r["answer"]} if r["id"] != "o2" else {})} for r in json.load(f)]
  (tmp_path / "pub.json").write_text(json.dumps(published))
  assert _eval("--predictions", str(tmp_path / "pub.json"), "--benchmark", "mmau", "--out", str(out)) == 0
  report = _report(out)
  assert report["missing_predictions"] == ["o2"] and report["scores"]["official"]["overall"]["correct"] == 8


def _bad(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _good(i, p="Man"):
  return json.dumps({"id": i, "prediction": p})


@pytest.mark.parametrize("name, text, where, message", [
    ("torn.jsonl", _good("s1") + "\n{\"id\": \"s2\", \"predic\n", ":2:", "invalid JSON"),
    ("array.json", "[\n  " + _good("s1") + ",\n  " + _good("s2") + "\n  " + _good("s3") + "\n]", ":4:",
     "invalid JSON"),
    ("noid.jsonl", _good("s1") + "\n\n" + json.dumps({"prediction": "Man"}) + "\n", ":3:", "without an `id`"),
    ("noid.json", "[\n" + _good("s1") + ",\n{\n  \"prediction\": \"Man\"\n}\n]", ":3:", "without an `id`"),
    ("nopred.jsonl", _good("s1") + "\n" + json.dumps({"id": "s2", "answer": "Man"}) + "\n", ":2:",
     "has no `prediction`"),
    ("dup.jsonl", "\n".join([_good("s1"), _good("s2"), _good("s1", "Woman")]), ":3:",
     "'s1' again, with a different prediction (first on line 1)"),
    ("list.jsonl", json.dumps({"id": "s1", "prediction": ["Man"]}), ":1:", "is a list, expected text"),
    ("scalar.jsonl", _good("s1") + "\n42\n", ":2:", "expected a record"),
    ("none.jsonl", _good("zz1") + "\n" + _good("zz2"), ":", "none of its 2 ids names an item"),
    ("bench.json", "[{\"id\": \"s1\", \"answer\": \"Man\"}]", ":", "no record has a `prediction`"),
])
def test_bad_predictions_are_one_line_naming_file_and_line(tmp_path, capsys, name, text, where, message):
  data = write_mmau(tmp_path)
  path = _bad(tmp_path, name, text)
  code = _eval("--predictions", path, "--data", data, "--benchmark", "mmau", "--out", str(tmp_path / "r.json"))
  err = capsys.readouterr().err
  assert code == 1, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith(f"alm-jax: {path}{where}") and message in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "r.json")


def test_asr_predictions_scored_by_wer(tmp_path):
  rows = [("u1", "the cat sat on the mat", "The cat sat on the mat."),  # 6 words, 0 errors (normalised)
          ("u2", "hello world", "hello word"),  # 2 words, 1 substitution
          ("u3", "it is quite late now", None),  # 5 words, no prediction: 5 deletions
          ("u4", "good morning", "good morning everyone")]  # 2 words, 1 insertion
  manifest = _jsonl(tmp_path / "asr.jsonl", [{"id": i, "audio": f"{i}.flac", "text": ref, "category": "clean"
                                             if i < "u3" else "other"} for i, ref, _ in rows])
  preds = _jsonl(tmp_path / "p.jsonl", [{"id": i, "prediction": hyp} for i, _, hyp in rows if hyp is not None])
  out = tmp_path / "asr_report.json"
  assert _eval("--predictions", preds, "--data", manifest, "--benchmark", "asr", "--out", str(out)) == 0
  report = _report(out)
  wer = report["scores"]["wer"]
  assert list(report["scores"]) == ["wer"] and report["n"] == 4
  assert wer["overall"]["wer"] == pytest.approx((0 + 1 + 5 + 1) / 15) and wer["overall"]["words"] == 15
  assert wer["by_category"]["clean"]["wer"] == pytest.approx(1 / 8)
  assert wer["by_category"]["other"]["wer"] == pytest.approx(6 / 7)
  assert report["missing_predictions"] == ["u3"]
  assert {r["id"]: r["deletions"] for r in report["per_file"]}["u3"] == 5
  assert any("empty transcript" in note for note in report["notes"])
  assert (tmp_path / "asr_report.png").read_bytes()[:8] == PNG


def _two_reports(tmp_path):
  """Reports of the MMAU file: FakePredictor's answers ("fake") and the reference answers ("oracle")."""
  data = write_mmau(tmp_path)
  items = _items(data)
  paths = []
  for name, answer in (("fake", FakePredictor.answer), ("oracle", lambda item: item.answer)):
    preds = _jsonl(tmp_path / f"{name}.jsonl", [{"id": i.id, "prediction": answer(i)} for i in items])
    out = str(tmp_path / f"{name}.json")
    assert _eval("--predictions", preds, "--data", data, "--benchmark", "mmau", "--out", out, "--name", name) == 0
    paths.append(out)
  return paths


def test_compare_two_reports(tmp_path):
  fake, oracle = _two_reports(tmp_path)
  assert _eval("--compare", fake, oracle, "--out", str(tmp_path / "cmp" / "c.json")) == 0
  combined = _report(tmp_path / "cmp" / "c.json")
  assert combined["benchmark"] == "mmau"
  assert [(r["label"], r["path"], r["n"]) for r in combined["reports"]] == [("fake", fake, 9), ("oracle", oracle, 9)]
  official = combined["scores"]["official"]
  assert official["overall"]["fake"] == {"accuracy": pytest.approx(4 / 9), "random": pytest.approx(31 / 108), "n": 9}
  assert official["overall"]["oracle"]["accuracy"] == 1.0
  sound = official["by_category"]["sound"]
  assert sound["fake"]["accuracy"] == 0.0 and sound["oracle"]["accuracy"] == 1.0 and sound["fake"]["n"] == 3
  assert combined["scores"]["robust"]["by_category"]["music"]["fake"]["accuracy"] == pytest.approx(1 / 3)
  assert set(official) == {"overall", "by_category", "by_sub_category", "by_difficulty", "by_skill"}
  markdown = (tmp_path / "cmp" / "c.md").read_text()
  assert "## official: accuracy (%)\n\n| group | name | fake | oracle | n | random |" in markdown
  assert "| overall |  | 44.4 | 100.0 | 9 | 28.7 |" in markdown
  assert "| category | music | 33.3 | 100.0 | 3 | 25.0 |" in markdown
  assert "| category | sound | 0.0 | 100.0 | 3 | 27.8 |" in markdown
  assert "| category | sound | 100.0 | 100.0 | 3 | 27.8 |" in markdown.split("## robust")[1]
  assert "| difficulty | hard | 40.0 | 100.0 | 5 | 31.7 |" in markdown
  assert (tmp_path / "cmp" / "c.png").read_bytes()[:8] == PNG
  # --out C.md writes the same three files; --labels names the columns.
  assert _eval("--compare", fake, oracle, "--labels", "ours", "theirs", "--out", str(tmp_path / "d.md")) == 0
  assert "| overall |  | 44.4 | 100.0 | 9 | 28.7 |" in (tmp_path / "d.md").read_text()
  assert list(_report(tmp_path / "d.json")["scores"]["official"]["overall"]) == ["ours", "theirs"]
  assert (tmp_path / "d.png").read_bytes()[:8] == PNG
  # The same report twice: columns fall back to the file stem, then a suffix.
  assert _eval("--compare", fake, fake, "--out", str(tmp_path / "e.json")) == 0
  assert [r["label"] for r in _report(tmp_path / "e.json")["reports"]] == ["fake#1", "fake#2"]


def test_compare_refuses_other_benchmarks_and_non_reports(tmp_path, capsys):
  fake, _ = _two_reports(tmp_path)
  asr = _report(fake)
  asr["benchmark"] = "asr"
  (tmp_path / "asr.json").write_text(json.dumps(asr))
  (tmp_path / "junk.json").write_text(json.dumps({"id": "s1", "prediction": "Man"}))
  for other, message in ((tmp_path / "asr.json", "a 'asr' report, but"), (tmp_path / "junk.json", "not an eval report"),
                         (tmp_path / "fake.jsonl", "not a report: invalid JSON")):
    capsys.readouterr()
    assert _eval("--compare", fake, str(other), "--out", str(tmp_path / "c.json")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"alm-jax: {other}") and message in err and "\n" not in err, err
  assert _eval("--compare", fake, fake, "--labels", "one", "--out", str(tmp_path / "c.json")) == 1
  assert "--labels" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "c.json")


def test_modes_and_their_flags(tmp_path, capsys):
  data = write_mmau(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    _eval("--ckpt", "run", "--predictions", "p.jsonl", "--benchmark", "mmau", "--out", "r.json")
  assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    _eval("--benchmark", "mmau", "--data", data, "--out", "r.json")
  assert exit_info.value.code == 2
  assert "one of the arguments --ckpt --predictions --compare is required" in capsys.readouterr().err
  for args, flag in ((["--predictions", "p.jsonl"], "--benchmark"),
                     (["--ckpt", "run", "--benchmark", "mmau"], "--data"),
                     (["--predictions", "p.jsonl", "--benchmark", "mmau", "--labels", "a"], "--labels"),
                     (["--compare", "a.json", "--name", "x"], "--name"),
                     (["--compare", "a.json", "--data", data], "--data")):
    assert _eval(*args, "--out", str(tmp_path / "r.json")) == 2
    assert flag in capsys.readouterr().err
  preds = _jsonl(tmp_path / "p.jsonl", [{"id": "s1", "prediction": "Woman"}])
  assert _eval("--predictions", preds, "--benchmark", "mmau", "--out", str(tmp_path / "r.json")) == 1
  assert "need the benchmark file (--data)" in capsys.readouterr().err


def test_predictions_path_loads_no_jax(tmp_path):
  data = write_mmau(tmp_path)
  preds = _jsonl(tmp_path / "p.jsonl", [{"id": "s1", "prediction": "Woman"}])
  code = ("import sys; from alm_jax import cli; code = cli.main(sys.argv[1:]); "
          "print('jax loaded' if 'jax' in sys.modules else 'no jax'); sys.exit(code)")
  proc = subprocess.run([sys.executable, "-c", code, "eval", "--predictions", preds, "--data", data, "--benchmark",
                         "mmau", "--out", str(tmp_path / "r.json")], env=cli_env(PYTHONPATH=REPO), cwd=str(tmp_path),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "no jax", proc.stdout
  assert "without a prediction 8" in proc.stdout
