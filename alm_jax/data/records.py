"""One example, whatever file it came from: clips + a conversation (+ MCQ fields).

Sources hand the pipeline raw items (a manifest line, a JSON object, a packed
record, a TFDS example); `parse_record` turns each into a `Record`, raising
`DataError` that names the file and line for anything malformed. Four input
schemas are recognised per item:

* the native manifest line (`alm_jax` format, see `docs` / README):
  `{"id", "audio": [path | {"path", "start", "end"}], "text" | "conversation", ...}`
* MMAU (`audio_id`, `question`, `choices`, `answer`, `task`, `category`, ...)
* MMAU-Pro (`audio_path` string or list, `question`, `choices`, `answer`, `category`)
* AF3 eval (`sound`, `conversations: [{"from": "human"|"gpt", "value"}]`)

User text may mark where clips go with `<audio>`, `<audio N>` (1-based) or
AF3's `<sound>`; clips without a marker go at the start of the first user turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

from alm_jax.errors import DataError

TASK_TRANSCRIBE = "transcribe"
TASK_CAPTION = "caption"
TASK_MCQ = "mcq"
TASK_CHAT = "chat"

DEFAULT_PROMPTS = {TASK_TRANSCRIBE: "Transcribe the audio.", TASK_CAPTION: "Describe the audio."}

# `<audio>`, `<audio 2>`, `<audio2>` and AF3's `<sound>` mark a clip's place in user text.
CLIP_MARKER = re.compile(r"<audio\s*(\d+)?>|<sound>")


@dataclasses.dataclass(frozen=True)
class Clip:
  """One audio clip: a file path or encoded bytes, with an optional [start, end) span in seconds."""

  name: str  # path (absolute) or, for bytes, the original name; shown in errors
  path: str | None = None
  data: bytes | None = None
  start: float | None = None
  end: float | None = None
  pcm: Any = None  # decoded float32 PCM already at `sample_rate` (TFDS)
  sample_rate: int | None = None  # rate of `pcm`


@dataclasses.dataclass(frozen=True)
class Record:
  """A parsed example: clips and a conversation, plus fields the evaluators read."""

  index: int  # position in its source (the pipeline's example_id)
  id: str
  origin: str  # "file:line" for error messages
  clips: tuple[Clip, ...]
  messages: tuple[dict, ...]  # {"role": "system"|"user"|"assistant", "content": str}
  task: str = TASK_CHAT
  choices: tuple[str, ...] = ()
  answer: str | None = None
  category: str | None = None
  sub_category: str | None = None
  split: str | None = None
  extra: dict = dataclasses.field(default_factory=dict)


def format_mcq(question: str, choices: Sequence[str]) -> str:
  """The user text of a multiple-choice question; the answer is the option's text.

  One format for the synthetic corpus, MMAU and MMAU-Pro, so a model trained on
  one is asked the same way on the others.
  """
  options = "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))
  return f"{question.strip()}\nChoose the correct option:\n{options}"


def with_clip_rationale(record: Record) -> Record:
  """The record with its multi-clip multiple-choice answer written as `<think>rationale</think>answer`.

  The rationale is the line's `meta.rationale` (the synthetic corpus writes one per multi-audio question:
  each clip's kind and the one-step judgement the answer follows from), else a list of each clip's label
  from `meta.clip_labels` ("clip 1: dog; clip 2: rain", as `data compose` writes). Trained on such targets a
  model first says what each clip holds, a single-clip skill it has, then answers from its own words
  (docs/multi_audio.md); the scorers read the answer after `</think>`. Records with one clip, without
  choices or an assistant answer, or with neither a rationale nor one label per clip are returned unchanged.
  """
  messages = record.messages
  if (len(record.clips) < 2 or not record.choices or record.answer is None or not messages
      or messages[-1]["role"] != "assistant"):
    return record
  why, labels = record.extra.get("rationale"), record.extra.get("clip_labels")
  if not isinstance(why, str) or not why:
    if not isinstance(labels, (list, tuple)) or len(labels) != len(record.clips):
      return record
    why = "; ".join(f"clip {k + 1}: {label}" for k, label in enumerate(labels))
  last = {**messages[-1], "content": f"<think>{why}</think>{messages[-1]['content']}"}
  return dataclasses.replace(record, messages=messages[:-1] + (last,))


def _err(origin: str, message: str) -> DataError:
  return DataError(f"{origin}: {message}")


def _str(item: Mapping, key: str, origin: str, required: bool = True) -> str | None:
  value = item.get(key)
  if value is None:
    if required:
      raise _err(origin, f"missing field {key!r}")
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise _err(origin, f"field {key!r} must be a string, got {type(value).__name__}")
  return value


def _resolve(path: str, base_dir: str) -> str:
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _time(value: Any, key: str, origin: str) -> float | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _err(origin, f"audio {key!r} must be a number of seconds, got {value!r}")
  if value < 0:
    raise _err(origin, f"audio {key!r} is negative ({value})")
  return float(value)


def parse_clip(entry: Any, base_dir: str, origin: str) -> Clip:
  """`"a.wav"` or `{"path": "a.wav", "start": 1.0, "end": 2.5}` → `Clip` (path made absolute)."""
  if isinstance(entry, str):
    if not entry:
      raise _err(origin, "empty audio path")
    path = _resolve(entry, base_dir)
    return Clip(name=path, path=path)
  if isinstance(entry, Mapping):
    unknown = set(entry) - {"path", "start", "end"}
    if unknown:
      raise _err(origin, f"unknown audio keys {sorted(unknown)} (known: path, start, end)")
    raw = entry.get("path")
    if not isinstance(raw, str) or not raw:
      raise _err(origin, "audio entry needs a non-empty 'path'")
    start, end = _time(entry.get("start"), "start", origin), _time(entry.get("end"), "end", origin)
    if start is not None and end is not None and end <= start:
      raise _err(origin, f"audio end {end} is not after start {start}")
    path = _resolve(raw, base_dir)
    return Clip(name=path, path=path, start=start, end=end)
  raise _err(origin, f"audio entries are paths or {{path, start, end}} objects, got {type(entry).__name__}")


def _clips(value: Any, base_dir: str, origin: str) -> tuple[Clip, ...]:
  if value is None:
    raise _err(origin, "missing field 'audio'")
  entries = value if isinstance(value, list) else [value]
  if not entries:
    raise _err(origin, "'audio' lists no clip")
  return tuple(parse_clip(e, base_dir, origin) for e in entries)


def _messages(value: Any, origin: str) -> tuple[dict, ...]:
  if not isinstance(value, list) or not value:
    raise _err(origin, "'conversation' must be a non-empty list of {role, content}")
  out = []
  for i, turn in enumerate(value):
    if not isinstance(turn, Mapping):
      raise _err(origin, f"conversation[{i}] is not an object")
    role, content = turn.get("role"), turn.get("content")
    if role not in ("system", "user", "assistant"):
      raise _err(origin, f"conversation[{i}].role must be system, user or assistant, got {role!r}")
    if not isinstance(content, str):
      raise _err(origin, f"conversation[{i}].content must be a string")
    out.append({"role": role, "content": content})
  if not any(m["role"] == "user" for m in out):
    raise _err(origin, "conversation has no user turn")
  return tuple(out)


def _choices(value: Any, origin: str) -> tuple[str, ...]:
  if value is None:
    return ()
  if not isinstance(value, list) or not all(isinstance(c, (str, int, float)) for c in value):
    raise _err(origin, "'choices' must be a list of strings")
  return tuple(str(c) for c in value)


def _first(value: Any) -> str | None:
  if isinstance(value, list):
    return str(value[0]) if value else None
  return None if value is None else str(value)


def _native(item: Mapping, index: int, base_dir: str, origin: str, prompts: Mapping[str, str]) -> Record:
  known = {"id", "audio", "text", "conversation", "choices", "answer", "category", "sub_category", "task",
           "split", "question", "meta"}
  unknown = set(item) - known
  if unknown:
    raise _err(origin, f"unknown fields {sorted(unknown)} (known: {', '.join(sorted(known))})")
  clips = _clips(item.get("audio"), base_dir, origin)
  choices = _choices(item.get("choices"), origin)
  answer = _str(item, "answer", origin, required=False)
  task = _str(item, "task", origin, required=False)
  if "conversation" in item:
    if "text" in item:
      raise _err(origin, "give either 'text' or 'conversation', not both")
    messages = _messages(item["conversation"], origin)
    task = task or (TASK_MCQ if choices else TASK_CHAT)
  elif "question" in item:  # a question with choices, rendered in the standard MCQ format
    question = _str(item, "question", origin)
    text = format_mcq(question, choices) if choices else question
    messages = ({"role": "user", "content": text},)
    if answer is not None:
      messages += ({"role": "assistant", "content": answer},)
    task = task or (TASK_MCQ if choices else TASK_CHAT)
  elif "text" in item:
    text = _str(item, "text", origin)
    task = task or TASK_TRANSCRIBE
    if task not in prompts:
      raise _err(origin, f"no prompt for task {task!r} of a text pair (configured: {', '.join(sorted(prompts))})")
    messages = ({"role": "user", "content": prompts[task]}, {"role": "assistant", "content": text})
  else:
    raise _err(origin, "needs 'text' (transcript/caption), 'conversation' or 'question'")
  if choices and answer is not None and answer not in choices:
    raise _err(origin, f"answer {answer!r} is not one of the choices")
  meta = item.get("meta") or {}
  if not isinstance(meta, Mapping):
    raise _err(origin, "'meta' must be an object")
  return Record(
      index=index, id=_str(item, "id", origin, required=False) or str(index), origin=origin, clips=clips,
      messages=messages, task=task, choices=choices, answer=answer,
      category=_str(item, "category", origin, required=False),
      sub_category=_str(item, "sub_category", origin, required=False),
      split=_str(item, "split", origin, required=False), extra=dict(meta),
  )


def _mcq_record(item, index, origin, clips, question, choices, answer, category, sub_category, split, extra):
  text = format_mcq(question, choices) if choices else question
  messages = ({"role": "user", "content": text},)
  if answer:
    messages += ({"role": "assistant", "content": answer},)
  return Record(
      index=index, id=str(item.get("id", index)), origin=origin, clips=clips, messages=messages,
      task=TASK_MCQ if choices else TASK_CHAT, choices=choices, answer=answer or None, category=category,
      sub_category=sub_category, split=split, extra=extra,
  )


def _mmau(item: Mapping, index: int, base_dir: str, origin: str) -> Record:
  clips = _clips(item.get("audio_id"), base_dir, origin)
  choices = _choices(item.get("choices"), origin)
  extra = {k: item[k] for k in ("dataset", "difficulty", "sub-category", "category") if k in item}
  return _mcq_record(
      item, index, origin, clips, _str(item, "question", origin), choices,
      _str(item, "answer", origin, required=False), _str(item, "task", origin, required=False),
      _first(item.get("category")), _str(item, "split", origin, required=False), extra,
  )


def _mmau_pro(item: Mapping, index: int, base_dir: str, origin: str) -> Record:
  clips = _clips(item.get("audio_path"), base_dir, origin)
  choices = _choices(item.get("choices"), origin)
  extra = {k: item[k] for k in ("task_identifier", "kwargs") if k in item}
  return _mcq_record(
      item, index, origin, clips, _str(item, "question", origin), choices,
      _str(item, "answer", origin, required=False), _first(item.get("category")), None, None, extra,
  )


def _af3(item: Mapping, index: int, base_dir: str, origin: str) -> Record:
  clips = _clips(item.get("sound"), base_dir, origin)
  turns = item.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise _err(origin, "'conversations' must be a non-empty list")
  roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
  messages = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or turn.get("from") not in roles or not isinstance(turn.get("value"), str):
      raise _err(origin, f"conversations[{i}] must be {{from: human|gpt, value: str}}")
    messages.append({"role": roles[turn["from"]], "content": turn["value"]})
  extra = {"duration": item["duration"]} if "duration" in item else {}
  answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
  return Record(index=index, id=str(item.get("id", index)), origin=origin, clips=clips, messages=tuple(messages),
                task=TASK_CHAT, answer=answer, extra=extra)


def parse_record(
    item: Any, *, index: int, base_dir: str, origin: str, prompts: Mapping[str, str] = DEFAULT_PROMPTS
) -> Record:
  """Turns one decoded JSON object of any supported schema into a `Record`.

  Relative audio paths are resolved against `base_dir` (the manifest's folder).
  Raises `DataError` naming `origin` for anything malformed.
  """
  if not isinstance(item, Mapping):
    raise _err(origin, f"expected a JSON object, got {type(item).__name__}")
  if "audio_id" in item:
    return _mmau(item, index, base_dir, origin)
  if "audio_path" in item:
    return _mmau_pro(item, index, base_dir, origin)
  if "sound" in item and "conversations" in item:
    return _af3(item, index, base_dir, origin)
  if "audio" in item:
    return _native(item, index, base_dir, origin, prompts)
  raise _err(origin, "not a manifest line: no 'audio' (or MMAU 'audio_id', MMAU-Pro 'audio_path', AF3 'sound')")


def parse_line(
    line: bytes | str, *, index: int, base_dir: str, origin: str, prompts: Mapping[str, str] = DEFAULT_PROMPTS
) -> Record:
  """Parses one JSONL line (invalid JSON raises `DataError` naming `origin`)."""
  try:
    item = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _err(origin, f"invalid JSON ({e})") from None
  return parse_record(item, index=index, base_dir=base_dir, origin=origin, prompts=prompts)


def split_clip_markers(text: str) -> list[str | int | None]:
  """Splits user text at clip markers: text pieces, and for each marker its 0-based clip or None (next)."""
  parts: list[str | int | None] = []
  pos = 0
  for m in CLIP_MARKER.finditer(text):
    parts.append(text[pos : m.start()])
    parts.append(int(m.group(1)) - 1 if m.group(1) else None)
    pos = m.end()
  parts.append(text[pos:])
  return parts
