"""Multiple-choice benchmark readers: MMAU, MMAU-Pro, AF3 eval JSON and our manifests into `EvalItem`s.

Readers take the files as published and our manifests alike, item by item:
  * MMAU (test-mini / test JSON): `id`, `audio_id`, `question`, `choices`,
    `answer`, `task` (sound/music/speech → our `category`), `category`
    (Reasoning / Information Extraction, a string or one-item list → `meta.skill`),
    `sub-category`, `difficulty`, `dataset`, `split`.
  * MMAU-Pro (JSON or the Hub's Parquet): `audio_path` (a string or a list for
    multi-audio), `question`, `choices`, `answer`, `category` (as it comes;
    `open` items are free-form, `instruction following` items are rule-checked),
    `task_identifier`, `kwargs`.
  * AF3 eval JSON: `sound` (string or list), `conversations` [{from: human,
    value: "<sound>\\nQ (A) x (B) y"}, {from: gpt, value: A}]; choices are parsed
    from the question text.
  * Manifests (JSON Lines, e.g. the synthetic corpus): `id`, `audio` (list or
    string), `question` or `conversation(s)` (role/content or from/value turns),
    `choices`, `answer`, `category`, optional `sub_category`, `difficulty`,
    `duration`. A conversation's user text is the prompt, as trained. Lines whose
    `task` is `transcribe` or `caption` are training pairs, left out with a note.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

from alm_jax.errors import DataError
from alm_jax.eval import items as items_lib
from alm_jax.eval.items import EvalItem, Skipped
from alm_jax.eval.mc_prompts import DEFAULT_TEMPLATE, THINK_SUFFIX, build_prompt, parse_choices
from alm_jax.eval.mc_scoring import answer_index, normalize, strip_labels

# Manifest lines of these `task`s are training pairs, not questions (see `load_mc`).
NOT_QUESTIONS = ("transcribe", "caption")
# MMAU-Pro's closed-item categories are everything except these two.
PRO_OPEN = "open"
PRO_INSTRUCTION = "instruction following"
_AUDIO_TAGS = re.compile(r"<sound>|<audio>|<\|AUDIO\|>", re.IGNORECASE)


def _turns(value: Any) -> list[tuple[str, str]]:
  """A conversation as (role, text) pairs; roles normalised to user/assistant."""
  turns = []
  for turn in items_lib.as_list(value) or []:
    if not isinstance(turn, dict):
      continue
    role = str(turn.get("role", turn.get("from", ""))).lower()
    text = turn.get("content", turn.get("value"))
    if isinstance(text, list):  # OpenAI-style content parts
      text = " ".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    role = {"human": "user", "gpt": "assistant", "model": "assistant"}.get(role, role)
    if text is not None:
      turns.append((role, str(text)))
  return turns


@dataclasses.dataclass
class _Fields:
  """Benchmark-independent view of one record before validation."""

  id: str
  audio: list[str] | None
  question: str | None
  choices: list[Any] | None
  answer: str | None
  category: str
  sub_category: str | None = None
  difficulty: str | None = None
  duration: float | None = None
  verbatim_prompt: str | None = None  # a conversation's user text, used as is
  kind: str | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _audio_list(value: Any) -> list[str] | None:
  listed = items_lib.as_list(value)
  if listed is not None:
    paths = [items_lib.as_text(p) for p in listed]
    return [p for p in paths if p] or None
  text = items_lib.as_text(value)
  return [text] if text else None


def _duration(value: Any) -> float | None:
  try:
    duration = float(value)
  except (TypeError, ValueError):
    return None
  return duration if duration == duration and duration >= 0 else None


def record_fields(record: Mapping[str, Any], position: int) -> _Fields:
  """Reads one record of any supported layout into `_Fields` (no validation yet)."""
  rid = items_lib.as_text(record.get("id")) or items_lib.as_text(record.get("key")) or f"item{position}"
  common = dict(
      sub_category=items_lib.as_text(record.get("sub-category", record.get("sub_category"))),
      difficulty=items_lib.as_text(record.get("difficulty")),
      duration=_duration(record.get("duration")),
  )
  if "audio_id" in record:  # MMAU
    meta = {k: record[k] for k in ("dataset", "split") if k in record}
    skill = items_lib.first_item(record.get("category"))
    if skill:
      meta["skill"] = skill
    return _Fields(
        id=rid, audio=_audio_list(record.get("audio_id")), question=items_lib.as_text(record.get("question")),
        choices=items_lib.as_list(record.get("choices")), answer=items_lib.as_text(record.get("answer")),
        category=items_lib.as_text(record.get("task")) or "unknown", kind="mcq", meta=meta, **common)
  if "audio_path" in record:  # MMAU-Pro
    category = items_lib.first_item(record.get("category")) or "unknown"
    kind = "open" if category == PRO_OPEN else "instruction" if category == PRO_INSTRUCTION else "mcq"
    meta = {k: record[k] for k in ("task_identifier", "kwargs") if record.get(k) is not None}
    return _Fields(
        id=rid, audio=_audio_list(record.get("audio_path")), question=items_lib.as_text(record.get("question")),
        choices=items_lib.as_list(record.get("choices")), answer=items_lib.as_text(record.get("answer")),
        category=category, kind=kind, meta=meta, **common)
  turns = _turns(record.get("conversations", record.get("conversation")))
  user = next((t for r, t in turns if r == "user"), None)
  reply = next((t for r, t in turns if r == "assistant"), None)
  if "sound" in record and "audio" not in record:  # AF3 eval JSON
    text = _AUDIO_TAGS.sub("", user or "").strip()
    question, choices = parse_choices(text)  # the prompt keeps the `<sound>` marker: it places the clip
    if items_lib.as_list(record.get("choices")):
      choices = items_lib.as_list(record.get("choices"))
    category = items_lib.as_text(record.get("category")) or items_lib.as_text(record.get("task")) or "all"
    return _Fields(
        id=rid, audio=_audio_list(record.get("sound")), question=question or text, choices=choices or None,
        answer=items_lib.as_text(record.get("answer")) or (reply.strip() if reply else None),
        category=category, verbatim_prompt=(user or "").strip() or None, **common)
  audio = record.get("audio", record.get("audio_filepath", record.get("path")))
  meta = {k: record[k] for k in ("task_identifier", "kwargs", "skill") if record.get(k) is not None}
  return _Fields(
      id=rid, audio=_audio_list(audio), question=items_lib.as_text(record.get("question")),
      choices=items_lib.as_list(record.get("choices")),
      answer=items_lib.as_text(record.get("answer")) or (reply.strip() if reply else None),
      category=items_lib.first_item(record.get("category")) or "all", verbatim_prompt=user,
      kind=items_lib.as_text(record.get("kind")), meta=meta, **common)


def make_item(
    fields: _Fields,
    position: int,
    *,
    data_path: str,
    audio_root: str | None,
    think: bool = False,
    template: str = DEFAULT_TEMPLATE,
    check_audio: bool = True,
) -> EvalItem | Skipped:
  """Validates one record and builds its `EvalItem`, or says why it is skipped."""
  skip = lambda reason: Skipped(fields.id, reason, position)  # noqa: E731
  if not fields.audio:
    return skip("no audio path")
  paths = [items_lib.resolve_audio(p, audio_root, data_path) for p in fields.audio]
  if check_audio:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      return skip(f"missing audio file: {missing[0]}")
  question = fields.question or fields.verbatim_prompt
  if not question:
    return skip("no question")
  kind = fields.kind if fields.kind in ("mcq", "open", "instruction") else None
  choices = None
  if fields.choices is not None:
    choices = [items_lib.as_text(c) for c in fields.choices]
    if any(c is None or c == "" for c in choices):
      return skip("a choice is empty or not text")
  if kind is None:
    kind = "mcq" if choices or fields.choices is not None else "open"
  if kind == "mcq":
    if not choices or len(choices) < 2:
      return skip("missing choices" if not choices else "fewer than 2 choices")
    if not fields.answer:
      return skip("no answer")
    if answer_index(fields.answer, choices) is None:
      return skip(f"answer {fields.answer!r} is not one of the choices")
  elif kind == "open" and not fields.answer:
    return skip("no answer")
  verbatim = fields.verbatim_prompt
  if verbatim and (kind != "mcq" or all(normalize(c) in normalize(verbatim) for c in choices)):
    prompt = verbatim.strip() + (THINK_SUFFIX if think and kind == "mcq" else "")
  elif kind == "mcq":
    prompt = build_prompt(question, choices, think=think, template=template)
  else:
    prompt = question.strip()  # open and instruction items: the question as published
  meta = dict(fields.meta)
  meta["question"] = question
  answer = fields.answer or ""
  if kind == "mcq" and answer not in choices:  # e.g. AF3's "(B) Violin": score against the option's text
    meta["raw_answer"] = answer
    answer = strip_labels(choices)[answer_index(answer, choices)]
  return EvalItem(
      id=fields.id, prompt=prompt, audio=tuple(paths), kind=kind, answer=answer,
      choices=tuple(choices or ()), category=fields.category, sub_category=fields.sub_category,
      difficulty=fields.difficulty, duration=fields.duration, meta=meta)


@dataclasses.dataclass
class Loaded:
  """A benchmark file read into items, skipped items and notes for the report."""

  items: list[EvalItem]
  skipped: list[Skipped]
  notes: list[str]


def load_mc(
    data_path: str,
    audio_root: str | None = None,
    *,
    think: bool = False,
    template: str = DEFAULT_TEMPLATE,
    check_audio: bool = True,
    limit: int | None = None,
) -> Loaded:
  """Reads an MMAU / MMAU-Pro / AF3 / manifest file into items (any mix of layouts)."""
  records = items_lib.read_records(data_path)
  if limit is not None:
    records = records[:limit]
  good, skipped, notes = [], [], []
  pairs: dict[str, int] = {}
  for position, record in enumerate(records, start=1):
    task = items_lib.as_text(record.get("task"))
    if "audio_id" not in record and task in NOT_QUESTIONS and not record.get("choices"):
      pairs[task] = pairs.get(task, 0) + 1
      continue
    try:
      fields = record_fields(record, position)
    except (TypeError, ValueError, AttributeError) as e:
      rid = items_lib.as_text(record.get("id")) or f"item{position}"
      skipped.append(Skipped(rid, f"malformed entry: {e}", position))
      continue
    result = make_item(fields, position, data_path=data_path, audio_root=audio_root, think=think, template=template,
                       check_audio=check_audio)
    (skipped if isinstance(result, Skipped) else good).append(result)
  if not records:
    raise DataError(f"{data_path}: holds no items")
  if pairs:
    counts = ", ".join(f"{n} {task}" for task, n in sorted(pairs.items()))
    notes.append(f"{data_path}: {counts} line(s) are training pairs, not questions, and were left out "
                 "(score transcription lines with the asr benchmark).")
  good, renamed = items_lib.unique_ids(good)
  return Loaded(good, skipped, notes + renamed)
