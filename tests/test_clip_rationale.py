"""Clip rationales (`data.clip_rationale`): a multi-clip multiple-choice answer is learned as
`<think>rationale</think>answer`, and the scorers read the answer after the `<think>` block.

Checked: the rewrite (a line's own `meta.rationale`, else its clip labels listed) and the records it
leaves alone; the synthetic corpus's rationales lead to its answers (the "yes" clip is the answer, the
"yes" count is the count, "like" names the matching pair); through `Prepare`, the learned tokens of every
multi-clip question are the rationale and the answer and nothing else changes; both scorers judge the
answer, not the reasoning.
"""

import dataclasses
import json

import numpy as np
import pytest

from alm_jax.data.records import parse_record, with_clip_rationale
from alm_jax.eval.items import EvalItem
from alm_jax.eval.mc_scoring import score_mc
from helpers import TINY, make_corpus

CHOICES = ["the first clip", "the second clip", "the third clip", "none of the clips"]


def line(clips=3, labels=("speech", "music", "a sound effect"), choices=CHOICES, answer="the first clip"):
  item = {"audio": [f"c{k}.wav" for k in range(clips)], "question": "Which clip contains speech?",
          "choices": list(choices), "answer": answer, "category": "multi-audio"}
  if labels is not None:
    item["meta"] = {"clip_labels": list(labels)}
  return parse_record(item, index=0, base_dir="/data", origin="m.jsonl:1")


def test_the_answer_names_each_clip_first():
  record = with_clip_rationale(line())
  assert record.messages[-1] == {
      "role": "assistant", "content": "<think>clip 1: speech; clip 2: music; clip 3: a sound effect</think>the first clip"}
  assert record.messages[:-1] == line().messages[:-1] and record.answer == "the first clip"
  own = with_clip_rationale(dataclasses.replace(line(), extra={"rationale": "first speech yes", "clip_labels": []}))
  assert own.messages[-1]["content"] == "<think>first speech yes</think>the first clip"


@pytest.mark.parametrize("record", [
    line(labels=None),  # no labels
    line(labels=("speech", "music")),  # not one per clip
    line(clips=1, labels=("speech",), choices=["speech", "music"], answer="speech"),  # one clip: nothing to compare
    parse_record({"audio": ["a.wav", "b.wav"], "text": "two clips", "meta": {"clip_labels": ["x", "y"]}},
                 index=0, base_dir="/d", origin="m:1"),  # not multiple choice
], ids=["no-labels", "label-count", "one-clip", "not-mcq"])
def test_records_it_cannot_explain_stay_as_they_are(record):
  assert with_clip_rationale(record) is record


def test_prepare_learns_the_rationale_of_every_multi_clip_question(tmp_path):
  from alm_jax.config import load_config
  from alm_jax.data.examples import Prepare
  from alm_jax.data.sources import open_source
  from alm_jax.data.tokenizer import Tokenizer
  from alm_jax.run_config import validate

  data = make_corpus(str(tmp_path / "corpus"), 24, seed=0)
  config = load_config(TINY + ":micro")
  config.data.length_buckets = (256,)  # a 24-example corpus trains a short BPE: rationales take ~50 tokens
  cfg = validate(config)
  spec, tokenizer = cfg.model.token_spec(), Tokenizer.load(data, "tiny")
  plain = Prepare(dataclasses.replace(cfg.data, clip_rationale=False), spec, tokenizer, train=True, seed=0)
  with_why = Prepare(dataclasses.replace(cfg.data, clip_rationale=True), spec, tokenizer,
                     train=True, seed=0)
  source = open_source(data, "train")
  explained = 0
  for i in range(len(source)):
    item = json.loads(source[i].payload)
    a, b = plain.measure(i, source[i]), with_why.measure(i, source[i])
    learned = lambda m: tokenizer.decode(m["tokens"][m["loss_mask"].astype(bool)].tolist())  # noqa: E731
    if item.get("category") != "multi-audio":
      assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["loss_mask"], b["loss_mask"])
      continue
    labels, why = item["meta"]["clip_labels"], item["meta"]["rationale"]
    assert len(labels) == len(item["audio"]) and learned(a).startswith(item["answer"])
    assert learned(b).startswith(f"<think>{why}</think>{item['answer']}")
    assert_rationale_leads_to_answer(item["sub_category"], why, item["answer"])
    # the prompt (everything not learned) is the same
    prompt = lambda m: m["tokens"][~m["loss_mask"].astype(bool)]  # noqa: E731
    assert np.array_equal(prompt(a), prompt(b))
    explained += 1
  assert explained >= 2


def assert_rationale_leads_to_answer(kind, why, answer):
  from alm_jax.data.synth import CLIP_ORDINALS, PAIRS, SPEECH_CLIP_COUNTS

  clips = why.split(", ")
  if kind == "multi_which":
    yes = [c.split()[0] for c in clips if c.endswith(" yes")]
    assert answer == (f"the {yes[0]} clip" if yes else "none of the clips"), (why, answer)
  elif kind == "multi_speech":
    assert answer == SPEECH_CLIP_COUNTS[sum(c.endswith(" yes") for c in clips)], (why, answer)
  else:
    like = [c for c in clips if " like " in c]
    pair = f"{PAIRS[0].split()[0]} {like[0].split(' like ')[1]} and {like[0].split()[0]}" if like else PAIRS[3]
    assert answer == pair and all(c.split()[0] in CLIP_ORDINALS for c in clips), (why, answer)


def test_the_scorers_judge_the_answer_after_the_reasoning():
  item = EvalItem(id="x", prompt="", audio=(), kind="mcq", answer="the first clip", choices=tuple(CHOICES))
  reasoned = "<think>not the second clip, not none of the clips</think>the first clip"
  scores = score_mc(item, reasoned)
  assert scores["official"] and scores["robust"]
  assert not score_mc(item, "not the second clip, not none of the clips: the first clip")["official"]
  assert not score_mc(item, "<think>1 speech</think>the second clip")["robust"]
