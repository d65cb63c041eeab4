"""Answers from any source, scored like our own: read a predictions file and match it to a benchmark by id.

`alm-jax eval --predictions FILE` scores answers no checkpoint of ours produced
(another toolkit, an API model, a published results file) with the readers,
scorers and report of `alm-jax eval --ckpt`, and without loading JAX. FILE is
  * `{id, prediction}` records, as a JSON array or JSON Lines; or
  * the published MMAU layout: the benchmark's own records with the answer
    added as `model_prediction` or `model_output` (what the MMAU evaluation
    script reads). Such a file is a benchmark file too, so it may be scored
    against itself.
Ids are what the benchmark's reader calls its items (`id`, else `key`; a
repeated id's later occurrences are `id#2`, ...). An item without a prediction
(a published record without `model_prediction`, or a null one) is scored as an
empty answer — wrong, as the published MMAU scorer counts it — and listed in the
report under `missing_predictions`; prediction ids that match no item are listed
under `unmatched_predictions`, and a file none of whose ids match is refused.
Audio files are not needed (nor checked): nothing is generated.

Bad input is one `DataError` line naming the file and line: unparseable JSON, a
record without an id or a prediction, an id given two different predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from alm_jax.errors import DataError
from alm_jax.eval import items as items_lib
from alm_jax.eval import mc_readers, report as report_lib, runner

# Where a record keeps its answer, in order of preference; the last two are the published MMAU layout's.
FIELDS = ("prediction", "model_prediction", "model_output")
PUBLISHED_FIELDS = FIELDS[1:]


@dataclasses.dataclass
class Predictions:
  """A predictions file read into answers by id.

  Attributes:
    path: the file.
    answers: id → answer text; None for a record that has no answer (published
      layout without `model_prediction`, or a null one).
    lines: id → line of the record that gave it (for messages).
    published: the file is in the published MMAU layout (usable as benchmark file).
  """

  path: str
  answers: dict[str, str | None]
  lines: dict[str, int]
  published: bool


def _located_records(path: str) -> list[tuple[int, Any]]:
  """(line, record) pairs of a JSON array or a JSON Lines file; invalid JSON raises naming the line."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such predictions file")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  start = len(text) - len(text.lstrip())
  if start == len(text):
    raise DataError(f"{path}: file is empty")

  def line_of(pos: int) -> int:
    return text.count("\n", 0, pos) + 1

  if text[start] != "[":
    located = []
    for lineno, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        located.append((lineno, json.loads(line)))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    return located
  # A JSON array, decoded element by element so that every record knows its line.
  decoder = json.JSONDecoder()
  located, pos = [], start + 1
  try:
    while True:
      while pos < len(text) and text[pos].isspace():
        pos += 1
      if pos < len(text) and text[pos] == "]" and not located:
        break
      record, end = decoder.raw_decode(text, pos)
      located.append((line_of(pos), record))
      pos = end
      while pos < len(text) and text[pos].isspace():
        pos += 1
      if pos < len(text) and text[pos] == ",":
        pos += 1
        continue
      if pos < len(text) and text[pos] == "]":
        break
      raise DataError(f"{path}:{line_of(pos)}: invalid JSON: expected ',' or ']' after a record")
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
  if text[pos + 1 :].strip():
    raise DataError(f"{path}:{line_of(pos + 1)}: invalid JSON: text after the closing ']'")
  return located


def _answer(value: Any, where: str) -> str | None:
  """A prediction as text: strings as they are, numbers as text, null as no answer; anything else is refused."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  raise DataError(f"{where}: the prediction is a {type(value).__name__}, expected text")


def read_predictions(path: str) -> Predictions:
  """Reads `{id, prediction}` records or the published MMAU layout (see the module docstring)."""
  located = _located_records(path)
  for lineno, record in located:
    if not isinstance(record, dict):
      raise DataError(f"{path}:{lineno}: a {type(record).__name__}, expected a record (a JSON object)")
  published = any(field in record for _, record in located for field in PUBLISHED_FIELDS)
  if not any(field in record for _, record in located for field in FIELDS):
    raise DataError(f"{path}: no record has a `prediction` (or published `model_prediction` / `model_output`) "
                    "field; is this the benchmark file?")
  answers: dict[str, str | None] = {}
  lines: dict[str, int] = {}
  for lineno, record in located:
    where = f"{path}:{lineno}"
    rid = items_lib.as_text(record.get("id")) or items_lib.as_text(record.get("key"))
    if not rid:
      raise DataError(f"{where}: record without an `id`")
    field = next((f for f in FIELDS if f in record), None)
    if field is None and not published:
      raise DataError(f"{where}: record {rid!r} has no `prediction`")
    answer = _answer(record[field], where) if field is not None else None
    if rid in answers:
      if answers[rid] != answer:
        raise DataError(f"{where}: id {rid!r} again, with a different prediction (first on line {lines[rid]})")
      continue
    answers[rid] = answer
    lines[rid] = lineno
  return Predictions(path, answers, lines, published)


@dataclasses.dataclass
class Matched:
  """Predictions matched to a benchmark's items.

  Attributes:
    predictions: every item's id → its answer (None: no prediction, scored as an empty answer).
    missing: ids of the items without a prediction, in benchmark order.
    unmatched: prediction ids naming no item of the benchmark (skipped items excepted), in file order.
  """

  predictions: dict[str, str | None]
  missing: list[str]
  unmatched: list[str]


def match(predictions: Predictions, loaded: mc_readers.Loaded, data_path: str) -> Matched:
  """Pairs every benchmark item with its prediction by id; refuses a file whose ids name no item."""
  ids = [item.id for item in loaded.items]
  known = set(ids) | {s.id for s in loaded.skipped}
  hits = [i for i in ids if i in predictions.answers]
  if not hits:
    first = f"its first: {next(iter(predictions.answers))!r}" + (f", the benchmark's: {ids[0]!r}" if ids else "")
    raise DataError(f"{predictions.path}: none of its {len(predictions.answers)} ids names an item of {data_path}"
                    f" that can be scored ({first})")
  answers = {i: predictions.answers.get(i) for i in ids}
  return Matched(answers, [i for i in ids if answers[i] is None],
                 [i for i in predictions.answers if i not in known])


def _notes(benchmark: str, predictions: Predictions, matched: Matched, data_path: str) -> list[str]:
  layout = "published MMAU layout" if predictions.published else "{id, prediction} records"
  notes = [f"predictions from {predictions.path} ({layout}), scored without a checkpoint."]
  if matched.missing:
    scored_as = ("an empty transcript (every reference word a deletion)" if benchmark == "asr"
                 else "an empty answer (wrong), as the published MMAU scorer counts a record without one")
    notes.append(f"{len(matched.missing)} of {len(matched.predictions)} items have no prediction and are scored as "
                 f"{scored_as}; listed under `missing_predictions`.")
  if matched.unmatched:
    notes.append(f"{len(matched.unmatched)} prediction id(s) name no item of {data_path} and were ignored "
                 f"(first: {matched.unmatched[0]!r}); listed under `unmatched_predictions`.")
  return notes


def score_file(
    benchmark: str,
    predictions_path: str,
    data_path: str | None,
    audio_root: str | None,
    out_path: str,
    options: runner.EvalOptions,
) -> dict[str, Any]:
  """Scores a predictions file against a benchmark file and writes the report (json, md, png); returns it.

  `data_path` None means the predictions file is its own benchmark file (published layout only).
  `options.checkpoint` names the predictions in the report (default: the predictions file's path).
  """
  predictions = read_predictions(predictions_path)
  if data_path is None:
    if not predictions.published:
      raise DataError(f"{predictions_path}: {{id, prediction}} records need the benchmark file (--data); only the "
                      "published layout (records with `model_prediction` / `model_output`) is its own benchmark file")
    data_path = predictions_path
  options = dataclasses.replace(options, check_audio=False, checkpoint=options.checkpoint or predictions_path)
  loaded = runner.load_benchmark(benchmark, data_path, audio_root, options)
  matched = match(predictions, loaded, data_path)
  result = runner.score(benchmark, loaded, matched.predictions, options)
  result["notes"] = _notes(benchmark, predictions, matched, data_path) + list(result.get("notes", []))
  result["missing_predictions"] = matched.missing
  result["unmatched_predictions"] = matched.unmatched
  report_lib.write_report(result, out_path, chart=options.chart)
  return result

