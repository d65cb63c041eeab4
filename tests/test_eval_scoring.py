"""MMAU scorers (official rule, robust matcher), answer extraction, readers and instruction checks."""

import json

import numpy as np
import pytest
import soundfile as sf

from alm_jax.errors import DataError
from alm_jax.eval import aif, mc_prompts, mc_readers, mc_scoring
from alm_jax.eval.items import EvalItem, Skipped

CHOICES = ["Cat meowing", "Dog barking", "Car horn", "Rain"]
ANSWER = "Dog barking"

# (model answer, official outcome, robust outcome) for answer "Dog barking" (option B).
REAL_ANSWERS = [
    ("Dog barking", True, True),
    ("dog barking.", True, True),
    ("B", False, True),  # a bare letter is wrong under the official rule
    ("b", False, True),
    ("(b)", False, True),
    ("B.", False, True),
    ("[B]", False, True),
    ("Answer: B", False, True),
    ("(b) dog barking", True, True),
    ("B. Dog barking", True, True),
    ("The answer is: Dog barking.", True, True),
    ("I can hear a dog barking in the background.", True, True),
    ("**Dog barking**", True, True),
    ("<think>Could be cat meowing, but it is lower.</think>Dog barking", False, True),
    ("It sounds like cat meowing. Final answer: dog barking", False, True),
    ("Dog barking or cat meowing", False, False),  # names two options: ambiguous
    ("Either a car horn or a dog barking.", False, False),
    ("(a) dog barking", True, False),  # label and text disagree: robust refuses
    ("Cat meowing", False, False),
    ("A", False, False),
    ("E", False, False),  # a letter beyond the options
    ("", False, False),
    ("   ", False, False),
    (None, False, False),
    (42, False, False),
    (["Dog barking"], False, False),
]


@pytest.mark.parametrize("prediction,official,robust", REAL_ANSWERS)
def test_scorers_on_real_world_answers(prediction, official, robust):
  assert mc_scoring.official_match(ANSWER, prediction, CHOICES) is official
  assert mc_scoring.robust_match(ANSWER, prediction, CHOICES) is robust


def test_official_rule_known_outcomes():
  # Words a wrong choice shares with the answer do not count against the prediction.
  choices = ["A child", "A woman", "An adult man", "A teenager"]
  assert mc_scoring.official_match("A child", "a child", choices)
  assert mc_scoring.official_match("A child", "The speaker is a child", choices)
  assert not mc_scoring.official_match("A child", "A", choices)  # bare letter
  assert not mc_scoring.official_match("A child", "a child, not an adult man", choices)
  assert not mc_scoring.official_match("Man", "man or woman", ["Man", "Woman", "Child"])
  assert mc_scoring.official_match("Man", "It is a man", ["Man", "Woman", "Child"])  # "a" is no choice's word
  # Odd input never raises.
  assert not mc_scoring.official_match("", "anything", choices)
  assert not mc_scoring.official_match(None, "a child", choices)
  assert mc_scoring.official_match("Man", "man", None)  # no choices: only "every answer word present"
  assert mc_scoring.official_match("Man", "man", "not a list")
  assert mc_scoring.official_match("3", 3, ["2", "3"]) and not mc_scoring.official_match("3", 2, ["2", "3"])
  assert not mc_scoring.official_match("Man", {"x": 1}, ["Man", "Woman"])


def test_robust_choice_rules_and_reasons():
  assert mc_scoring.robust_choice("B", CHOICES) == mc_scoring.Match(1, "letter")
  assert mc_scoring.robust_choice("Dog barkin", CHOICES).rule == "closest option"
  assert mc_scoring.robust_choice("Dog barkin", CHOICES).index == 1
  assert mc_scoring.robust_choice("C because of the honking", CHOICES).index == 2
  assert mc_scoring.robust_choice("A dog barking", CHOICES).index == 1  # an article, not the letter A
  assert mc_scoring.robust_choice("something else entirely", CHOICES).index is None
  assert mc_scoring.robust_choice("Dog barking or cat meowing", CHOICES).rule.startswith("ambiguous")
  assert mc_scoring.robust_choice("dog", ["dog", "dog barking"]).index == 0
  assert mc_scoring.robust_choice("dog barking", ["dog", "dog barking"]).index == 1  # "dog" inside "dog barking"
  assert mc_scoring.robust_choice("B", []).index is None
  assert mc_scoring.robust_choice("B", None).index is None
  # Options that are letters themselves (note names) read as text, not as positions.
  notes = ["C", "D", "E", "F"]
  assert mc_scoring.robust_choice("E", notes).index == 2 and mc_scoring.robust_choice("C", notes).index == 0
  assert mc_scoring.robust_match("E", "E", notes) and mc_scoring.official_match("E", "E", notes)
  # Choices that carry their own labels.
  assert mc_scoring.robust_choice("(C) Car horn", ["(A) Cat", "(B) Dog", "(C) Car horn"]).index == 2


def test_answer_index_and_labels():
  assert mc_scoring.answer_index("Dog barking", CHOICES) == 1
  assert mc_scoring.answer_index("dog barking.", CHOICES) == 1
  assert mc_scoring.answer_index("(B) Dog barking", CHOICES) == 1
  assert mc_scoring.answer_index("C", CHOICES) == 2
  assert mc_scoring.answer_index("Horse", CHOICES) is None
  assert mc_scoring.strip_labels(["A. x", "B. y"]) == ["x", "y"]
  assert mc_scoring.strip_labels(["A. x", "C. y"]) == ["A. x", "C. y"]  # not a run of labels


def test_final_answer_extraction():
  assert mc_scoring.extract_final_answer("Let me think.\nThe pitch rises.\nAnswer: Dog barking") == "Dog barking"
  assert mc_scoring.extract_final_answer("<think>cat? dog?</think> Dog barking") == "Dog barking"
  assert mc_scoring.extract_final_answer("reasoning <answer>Rain</answer>") == "Rain"
  assert mc_scoring.extract_final_answer("first line\nlast line") == "last line"
  assert mc_scoring.extract_final_answer(None) == ""
  assert mc_scoring.extract_final_answer("") == ""


def test_prompt_with_choices_and_think():
  prompt = mc_prompts.build_prompt("What is heard?", CHOICES)
  assert "What is heard?" in prompt and "(A) Cat meowing" in prompt and "(D) Rain" in prompt
  assert "step by step" not in prompt
  assert prompt + mc_prompts.THINK_SUFFIX == mc_prompts.build_prompt("What is heard?", CHOICES, think=True)
  assert (mc_prompts.build_prompt("Q?", CHOICES, template="{question} | {options}")
          == "Q? | " + mc_prompts.format_options(CHOICES))


def test_parse_choices_from_text():
  assert mc_prompts.parse_choices("Which? (A) cat, (B) dog or (C) car\nBe brief.") == ("Which?", ["cat", "dog", "car"])
  assert mc_prompts.parse_choices("Which?\nA. cat\nB. dog\nMore text") == ("Which?", ["cat", "dog"])
  assert mc_prompts.parse_choices("Describe the audio.") == ("Describe the audio.", [])


def _wav(path):
  sf.write(path, np.zeros(800, np.float32), 16000)
  return path


def test_readers_take_every_published_layout(tmp_path):
  (tmp_path / "a").mkdir()
  for name in ("1.wav", "2.wav", "3.wav", "4.wav"):
    _wav(tmp_path / "a" / name)
  mmau_rec = {"id": "m1", "audio_id": "./a/1.wav", "question": "Who speaks?", "choices": ["Man", "Woman"],
              "answer": "Man", "dataset": "AudioSet", "task": "sound", "split": "test-mini",
              "category": ["Reasoning"], "sub-category": "Acoustic Source Inference", "difficulty": "medium"}
  pro_multi = {"id": "p1", "audio_path": ["a/1.wav", "a/2.wav"], "question": "Which clip is louder?",
               "choices": ["first", "second"], "answer": "second", "category": "multi"}
  pro_open = {"id": "p2", "audio_path": "a/3.wav", "question": "Describe it.", "choices": None,
              "answer": "A dog barks twice.", "category": "open"}
  pro_instr = {"id": "p3", "audio_path": "a/3.wav", "question": "Describe it without commas.", "choices": [],
               "answer": "", "category": "instruction following", "task_identifier": "No Commas", "kwargs": {}}
  af3 = {"id": "f1", "sound": "a/4.wav", "duration": 7.5, "conversations": [
      {"from": "human", "value": "<sound>\nWhat is the instrument? (A) Piano (B) Violin (C) Drums"},
      {"from": "gpt", "value": "(B) Violin"}]}
  path = tmp_path / "mixed.json"
  path.write_text(json.dumps([mmau_rec, pro_multi, pro_open, pro_instr, af3]))
  loaded = mc_readers.load_mc(str(path), str(tmp_path))
  assert loaded.skipped == []
  by_id = {item.id: item for item in loaded.items}
  m1 = by_id["m1"]
  assert (m1.kind, m1.category, m1.sub_category, m1.difficulty) == ("mcq", "sound", "Acoustic Source Inference",
                                                                     "medium")
  assert m1.meta["skill"] == "Reasoning" and m1.audio == (str(tmp_path / "a" / "1.wav"),)
  assert "(A) Man" in m1.prompt and "(B) Woman" in m1.prompt
  assert by_id["p1"].audio == (str(tmp_path / "a" / "1.wav"), str(tmp_path / "a" / "2.wav"))
  assert by_id["p1"].category == "multi"
  assert by_id["p2"].kind == "open" and by_id["p3"].kind == "instruction"
  assert by_id["p3"].meta["task_identifier"] == "No Commas"
  f1 = by_id["f1"]
  assert f1.choices == ("Piano", "Violin", "Drums") and f1.duration == 7.5
  assert f1.answer == "Violin" and f1.meta["raw_answer"] == "(B) Violin"
  assert mc_scoring.score_mc(f1, "Violin")["official"] and mc_scoring.score_mc(f1, "B")["robust"]
  assert f1.prompt == "<sound>\nWhat is the instrument? (A) Piano (B) Violin (C) Drums"  # as published


def test_jsonl_manifest_with_conversation_and_parquet(tmp_path):
  _wav(tmp_path / "x.wav")
  _wav(tmp_path / "y.wav")
  user = "Which clip has the higher note?\n(A) the first\n(B) the second"
  rows = [
      {"id": "s1", "audio": ["x.wav", "y.wav"], "conversation": [{"role": "user", "content": user},
                                                               {"role": "assistant", "content": "the second"}],
       "choices": ["the first", "the second"], "answer": "the second", "category": "multi-audio"},
      {"id": "s2", "audio": "x.wav", "question": "Which word?", "choices": ["one", "two", "three"], "answer": "two",
       "category": "speech"},
  ]
  path = tmp_path / "test.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  loaded = mc_readers.load_mc(str(path))  # audio relative to the manifest
  s1, s2 = loaded.items
  assert s1.prompt == user and s1.audio == (str(tmp_path / "x.wav"), str(tmp_path / "y.wav"))
  assert s1.category == "multi-audio" and s2.category == "speech"
  assert "(B) two" in s2.prompt

  import pyarrow as pa  # MMAU-Pro is published as Parquet on the Hub
  import pyarrow.parquet as pq

  table = pa.Table.from_pylist([{"id": "q1", "audio_path": ["x.wav", "y.wav"], "question": "Same speaker?",
                                 "choices": ["yes", "no"], "answer": "no", "category": "multi"}])
  pq.write_table(table, tmp_path / "test.parquet")
  (item,) = mc_readers.load_mc(str(tmp_path / "test.parquet"), str(tmp_path)).items
  assert item.choices == ("yes", "no") and len(item.audio) == 2


def test_malformed_items_are_skipped_with_reasons(tmp_path):
  _wav(tmp_path / "ok.wav")
  base = {"question": "Q?", "choices": ["x", "y"], "answer": "x", "task": "sound"}
  records = [
      {"id": "good", "audio_id": "ok.wav", **base},
      {"id": "no_file", "audio_id": "gone.wav", **base},
      {"id": "no_choices", "audio_id": "ok.wav", "question": "Q?", "answer": "x", "task": "sound", "choices": []},
      {"id": "one_choice", "audio_id": "ok.wav", "question": "Q?", "answer": "x", "task": "sound", "choices": ["x"]},
      {"id": "bad_answer", "audio_id": "ok.wav", **{**base, "answer": "z"}},
      {"id": "no_answer", "audio_id": "ok.wav", **{k: v for k, v in base.items() if k != "answer"}},
      {"id": "no_audio", "audio_path": None, **base},
  ]
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(records))
  loaded = mc_readers.load_mc(str(path), str(tmp_path))
  assert [item.id for item in loaded.items] == ["good"]
  reasons = {s.id: s.reason for s in loaded.skipped}
  assert reasons["no_file"].startswith("missing audio file") and "gone.wav" in reasons["no_file"]
  assert reasons["no_choices"] == "missing choices"
  assert reasons["one_choice"] == "fewer than 2 choices"
  assert "not one of the choices" in reasons["bad_answer"]
  assert reasons["no_answer"] == "no answer"
  assert reasons["no_audio"] == "no audio path"
  assert all(isinstance(s, Skipped) and s.line for s in loaded.skipped)


def test_bad_files_raise_data_error(tmp_path):
  with pytest.raises(DataError, match="no such benchmark file"):
    mc_readers.load_mc(str(tmp_path / "none.json"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1}\n{broken\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
    mc_readers.load_mc(str(bad))


def test_score_mc_with_think_reads_final_answer_only():
  item = EvalItem("i", "p", (), "mcq", ANSWER, tuple(CHOICES), "sound")
  text = "Cat meowing would be higher pitched. Dog barking fits.\nAnswer: Dog barking"
  assert mc_scoring.score_mc(item, text, think=True)["official"]
  assert not mc_scoring.score_mc(item, text, think=False)["official"]  # the whole text names two options
  assert mc_scoring.score_mc(item, text, think=False)["robust"]  # robust reads the final-answer line itself


def test_instruction_following_checks():
  assert aif.check("no commas here", "No Commas", {}) == (True, None)
  assert aif.check("a, b", "No Commas", None) == (False, None)
  assert aif.check("one two three", "Number Words (at most)", '{"N": 3}') == (True, None)
  assert aif.check("one two three", "Number Words (at least)", {"N": 4, "unused": None}) == (False, None)
  assert aif.check("First. Second! Third?", "Number Sentences (range)", {"N1": 2, "N2": 3}) == (True, None)
  assert aif.check("<<Title>> body", "Title", {}) == (True, None)
  assert aif.check("a dog and a cat", "Include Keywords", {"keywords": "dog, cat"}) == (True, None)
  assert aif.check(None, "No Commas", {}) == (False, None)
  ok, reason = aif.check("x", "Unknown Rule", {})
  assert not ok and "unknown task_identifier" in reason


@pytest.mark.parametrize("odd", ["\x00", "((((", ")", "Answer:", "Answer: ", "<think>", "</think>", "<answer></answer>",
                                 "[", "B" * 5000, "ÄÖÜ ß 猫", "(B", "B)", ":", "\n\n\n", 3.5, b"B", True])
def test_scorers_never_raise_on_odd_input(odd):
  for choices in (CHOICES, [], None, ["", "x"], [1, 2], "text"):
    assert mc_scoring.official_match(ANSWER, odd, choices) in (True, False)
    assert mc_scoring.robust_match(ANSWER, odd, choices) in (True, False)
    assert mc_scoring.robust_choice(odd, choices).index in (None, 0, 1, 2, 3)
  assert isinstance(mc_scoring.extract_final_answer(odd), str)


def test_synthetic_corpus_split_mixes_questions_and_training_pairs(tmp_path):
  """A corpus split holds mcq lines and transcribe/caption pairs: each benchmark takes its own, and says so."""
  from alm_jax.eval import asr

  _wav(tmp_path / "c.wav")
  user = mc_prompts.build_prompt("Which word was said?", ["seven", "three"])
  lines = [
      {"id": "t-1", "audio": ["c.wav"], "conversation": [{"role": "user", "content": user},
                                                        {"role": "assistant", "content": "three"}],
       "question": "Which word was said?", "choices": ["seven", "three"], "answer": "three", "category": "speech",
       "sub_category": "word", "task": "mcq", "split": "test"},
      {"id": "t-2", "audio": ["c.wav"], "text": "hello world", "category": "speech", "sub_category": "transcribe",
       "task": "transcribe", "split": "test"},
      {"id": "t-3", "audio": ["c.wav"], "text": "a short beep", "category": "sound", "sub_category": "caption",
       "task": "caption", "split": "test"},
  ]
  path = tmp_path / "test.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  loaded = mc_readers.load_mc(str(path))
  assert [i.id for i in loaded.items] == ["t-1"] and loaded.items[0].prompt == user
  assert loaded.items[0].sub_category == "word" and not loaded.skipped
  assert any("1 caption, 1 transcribe" in note for note in loaded.notes)
  items, skipped, notes = asr.load_asr(str(path))
  assert [i.id for i in items] == ["t-2"] and items[0].answer == "hello world" and not skipped
  assert any("1 caption, 1 mcq" in note for note in notes)


def test_default_prompt_matches_the_corpus_format():
  from alm_jax.data import records  # pylint: disable=import-outside-toplevel  (always present: no reason to skip)
  assert mc_prompts.build_prompt(" Which chord? ", ["C major", "A minor"]) == records.format_mcq(" Which chord? ",
                                                                                               ["C major", "A minor"])
