"""Sharded, resumable evaluation: predictions from any `Predictor`, then scores and a report.

`run_eval(predictor, benchmark, data_path, audio_root, out_path, options)` is
the whole `alm-jax eval` command minus model loading:

1. every process reads the benchmark (same items, same order; malformed items
   become `skipped` entries with a reason);
2. process p of P takes items p, p+P, p+2P, ... (or, for a predictor with a
   `group` — a model sharded so that several processes hold the same batch rows —
   group g of G takes items g, g+G, ..., and only its leader saves them) and skips
   those already in the predictions directory (`<out stem>.predictions/`, one JSONL per process and
   process count; all files are read, so a resumed run may use another process
   count);
3. it predicts its share in batches, appending each batch to its own JSONL and
   fsyncing it, so an interrupted eval resumes where it stopped and no item is
   predicted (or scored) twice; each record carries the item's prompt
   fingerprint and the checkpoint name, and a resume with a different prompt or
   checkpoint is refused rather than mixed;
4. with several processes (jax.distributed), `lockstep` makes every process
   call the predictor equally often with full batches (padding with a filler
   item whose output is dropped), as a model sharded across processes needs;
   then a barrier (`multihost_utils.sync_global_devices`);
5. process 0 gathers every process's predictions from the shared directory,
   scores them and writes report.json, report.md and report.png. It alone shows
   a progress bar and returns the report; other processes return None.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from alm_jax.config import ConfigError
from alm_jax.errors import DataError
from alm_jax.eval import aif, asr, longaudio, mc_prompts, mc_readers, mc_scoring, report as report_lib
from alm_jax.eval.items import EvalItem

BENCHMARKS = ("mmau", "mmau-pro", "asr", "longaudio")


@runtime_checkable
class Predictor(Protocol):
  """Anything that answers a batch of items (prompt text + audio paths) with one string each."""

  def predict(self, items: Sequence[EvalItem]) -> list[str]:
    """Returns one generated answer per item, in order."""


@runtime_checkable
class Judge(Protocol):
  """Scores free-form answers (open-ended items), e.g. an LLM judge; 1.0 = fully correct."""

  def judge(self, items: Sequence[EvalItem], predictions: Sequence[str | None]) -> list[float]:
    """Returns one score in [0, 1] per item."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How to run an evaluation (everything except the model and the paths).

  Attributes:
    checkpoint: name recorded in the report and in every saved prediction.
    batch_size: items per `predict` call (per process).
    think: chain-of-thought prompting; both scorers read only the final answer.
    limit: evaluate only the first `limit` entries of the file.
    check_audio: skip (and report) items whose audio files are missing.
    prompt_template: multiple-choice prompt with {question} and {options}.
    asr_prompt: instruction for transcription items without their own prompt.
    length_edges: long-audio bucket edges in seconds.
    lockstep: every process calls the predictor equally often with full
      batches; None means "when there is more than one process".
    progress: show a progress bar on process 0.
    chart: write the PNG chart beside the report.
    judge: scores open-ended items; without one they are listed, not scored.
    predictions_dir: where partial predictions live (default `<out stem>.predictions`).
  """

  checkpoint: str = ""
  batch_size: int = 8
  think: bool = False
  limit: int | None = None
  check_audio: bool = True
  prompt_template: str = mc_prompts.DEFAULT_TEMPLATE
  asr_prompt: str = asr.DEFAULT_PROMPT
  length_edges: tuple[float, ...] = longaudio.DEFAULT_EDGES
  lockstep: bool | None = None
  progress: bool = True
  chart: bool = True
  judge: Judge | None = None
  predictions_dir: str | None = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------- loading


def load_benchmark(benchmark: str, data_path: str, audio_root: str | None, options: EvalOptions) -> mc_readers.Loaded:
  """Reads a benchmark file into items, skipped items and notes."""
  if benchmark not in BENCHMARKS:
    raise ConfigError("--benchmark", f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})")
  common = dict(check_audio=options.check_audio, limit=options.limit)
  if benchmark == "asr":
    found, skipped, notes = asr.load_asr(data_path, audio_root, prompt=options.asr_prompt, **common)
    return mc_readers.Loaded(found, skipped, notes)
  if benchmark == "longaudio":
    return longaudio.load_longaudio(data_path, audio_root, think=options.think, template=options.prompt_template,
                                    **common)
  return mc_readers.load_mc(data_path, audio_root, think=options.think, template=options.prompt_template, **common)


# ----------------------------------------------------------------------------- predictions store


class PredictionStore:
  """Per-process JSONL files of {"id", "prediction", "fingerprint", "checkpoint"} records."""

  def __init__(self, directory: str):
    self.directory = directory

  def own_path(self, process_index: int, process_count: int) -> str:
    return os.path.join(self.directory, f"predictions-p{process_index:05d}-of-{process_count:05d}.jsonl")

  def read_all(self) -> dict[str, dict[str, Any]]:
    """Every saved record by id (first one wins); a torn last line (killed mid-write) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(self.directory, "predictions-*.jsonl"))):
      with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
      for lineno, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          if lineno == len(lines):  # the unterminated tail of an interrupted write
            continue
          raise DataError(f"{path}:{lineno}: corrupt prediction record") from None
        if not isinstance(record, dict) or "id" not in record:
          raise DataError(f"{path}:{lineno}: prediction record without an id")
        records.setdefault(str(record["id"]), {**record, "_file": path})
    return records

  def open_own(self, process_index: int, process_count: int):
    """Opens this process's file for appending, first cutting off a torn last line."""
    os.makedirs(self.directory, exist_ok=True)
    path = self.own_path(process_index, process_count)
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      if data and not data.endswith(b"\n"):
        with open(path, "wb") as f:
          f.write(data[: data.rfind(b"\n") + 1])
    return open(path, "a", encoding="utf-8")

  @staticmethod
  def append(handle, records: Sequence[Mapping[str, Any]]) -> None:
    """Appends records and forces them to disk, so a crash loses at most the batch in flight."""
    handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    handle.flush()
    os.fsync(handle.fileno())


def _check_saved(saved: Mapping[str, Mapping[str, Any]], items: Sequence[EvalItem], options: EvalOptions,
                 directory: str) -> None:
  """Refuses to mix predictions made for another prompt or checkpoint into this run."""
  for item in items:
    record = saved.get(item.id)
    if record is None:
      continue
    if record.get("fingerprint") != item.fingerprint or record.get("checkpoint", "") != options.checkpoint:
      what = "checkpoint" if record.get("checkpoint", "") != options.checkpoint else "prompt"
      raise DataError(
          f"{record['_file']}: the saved prediction for {item.id!r} was made with another {what}; "
          f"write to another --out or delete {directory}")


def predictions_dir(out_path: str, options: EvalOptions) -> str:
  """Where partial predictions are kept: `options.predictions_dir` or `<out stem>.predictions`."""
  if options.predictions_dir:
    return options.predictions_dir
  stem = os.path.splitext(out_path)[0] if out_path.endswith(".json") else out_path
  return stem + ".predictions"


# ----------------------------------------------------------------------------- prediction loop


def _process_info() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index(), jax.process_count()


def _max_over_processes(value: int) -> int:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return int(np.max(multihost_utils.process_allgather(np.asarray(value, dtype=np.int32))))


def _barrier(name: str) -> None:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  multihost_utils.sync_global_devices(name)


def predict_share(
    predictor: Predictor | Any,
    items: Sequence[EvalItem],
    store: PredictionStore,
    options: EvalOptions,
    process_index: int,
    process_count: int,
    group: Any = None,
) -> int:
  """Predicts this process's not-yet-saved share of `items`, saving batch by batch; returns how many it predicted.

  Items are handed out per process, or per `group` (a predictor's `placement.BatchGroup`: processes
  whose devices hold the same batch rows answer the same items together, and only the group's
  leader saves them).
  """
  predict = predictor.predict if hasattr(predictor, "predict") else predictor
  share_index, share_count = (group.index, group.count) if group is not None else (process_index, process_count)
  writes = group.leader if group is not None else True
  share = list(items[share_index::share_count])
  saved = store.read_all()
  _check_saved(saved, share, options, store.directory)
  todo = [item for item in share if item.id not in saved]
  lockstep = options.lockstep if options.lockstep is not None else process_count > 1
  n_batches = -(-len(todo) // options.batch_size)
  if lockstep and process_count > 1:
    n_batches = _max_over_processes(n_batches)
  bar = None
  if process_index == 0 and options.progress and n_batches:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    desc = "eval" if share_count == 1 else f"eval (process 0's share of {share_count})"
    bar = tqdm(total=len(share), initial=len(share) - len(todo), unit="item", desc=desc, dynamic_ncols=True)
  done = 0
  try:
    with store.open_own(process_index, process_count) as handle:
      for b in range(n_batches):
        batch = todo[b * options.batch_size : (b + 1) * options.batch_size]
        call = list(batch)
        if lockstep and items:
          call += [items[0]] * (options.batch_size - len(batch))  # filler; outputs dropped
        if not call:
          continue
        outputs = list(predict(call))
        if len(outputs) != len(call):
          raise ValueError(f"predictor returned {len(outputs)} answers for {len(call)} items")
        records = [{"id": item.id, "prediction": out if isinstance(out, str) or out is None else str(out),
                    "fingerprint": item.fingerprint, "checkpoint": options.checkpoint}
                   for item, out in zip(batch, outputs)]
        if records and writes:
          store.append(handle, records)
        done += len(records)
        if bar is not None:
          bar.update(len(records))
  finally:
    if bar is not None:
      bar.close()
  return done


# ----------------------------------------------------------------------------- scoring


def _notes(benchmark: str, options: EvalOptions, loaded: mc_readers.Loaded) -> list[str]:
  notes = list(loaded.notes)
  if benchmark == "asr":
    notes.append("wer: corpus word error rate (jiwer) after Whisper's English text normalisation "
                 "(whisper-normalizer EnglishTextNormalizer); a fraction, 0.05 = 5 %.")
    return notes
  notes.append("accuracy and random are fractions (0.5 = 50 %); random = mean of 1/len(choices).")
  notes.append("official: the published MMAU string-match rule (word sets: every answer word present, no word of a "
               "wrong choice present; a bare letter is wrong), on the answer after any `<think>` block.")
  notes.append("robust: the answer mapped to one option by option text, letter or closest option; an answer naming "
               "two options is wrong unless its final-answer line names one "
               "(rule: alm_jax/eval/mc_scoring.py robust_choice).")
  if benchmark == "mmau-pro":
    notes.append("MMAU-Pro closed items: the published scorer matches answers to choices by NV-Embed-v2 embedding "
                 "similarity, a model that cannot be downloaded here; `robust` choice matching stands in for it and "
                 "`official` applies the MMAU word-set rule.")
  if benchmark == "longaudio":
    notes.append(f"by_length: clip-length buckets with edges {list(options.length_edges)} s.")
  if options.think:
    notes.append("chain-of-thought prompting: both scorers read only the final answer.")
  if any(item.kind == "open" for item in loaded.items):
    notes.append("open-ended items: " + ("scored by the configured judge (`judge`)." if options.judge is not None
                                         else "listed under `unscored`; configure a judge to score them."))
  if any(item.kind == "instruction" for item in loaded.items):
    notes.append("instruction-following items: checked by MMAU-Pro's format rules (`instruction_following`).")
  return notes


def score(
    benchmark: str,
    loaded: mc_readers.Loaded,
    predictions: Mapping[str, str | None],
    options: EvalOptions,
) -> dict[str, Any]:
  """Scores every item that has a prediction and builds the report dict (see `report`)."""
  found = [item for item in loaded.items if item.id in predictions]
  preds = [predictions[item.id] for item in found]
  skipped = [{"id": s.id, "reason": s.reason, **({"line": s.line} if s.line else {})} for s in loaded.skipped]
  settings: dict[str, Any] = {"think": options.think}
  if benchmark == "asr":
    return report_lib.make_report(
        benchmark, options.checkpoint, len(found), {"wer": asr.score_asr(found, preds)},
        per_file=asr.per_file(found, preds), skipped=skipped, unscored=[], notes=_notes(benchmark, options, loaded),
        settings={"prompt": options.asr_prompt})
  lengths = longaudio.length_buckets(found, options.length_edges) if benchmark == "longaudio" else {}
  orders = {"length": longaudio.bucket_labels(options.length_edges) + [longaudio.UNKNOWN]}

  def base(item: EvalItem) -> dict[str, Any]:
    row = {"id": item.id, "category": item.category, "sub_category": item.sub_category,
           "difficulty": item.difficulty, "skill": item.meta.get("skill")}
    if lengths:
      row["length"] = lengths[item.id]
      row["duration"] = item.duration
    return row

  mc_rows, judged, instr_rows, unscored = [], [], [], []
  for item, pred in zip(found, preds):
    if item.kind == "mcq":
      mc_rows.append({**base(item), "n_choices": len(item.choices), "answer": item.answer, "prediction": pred,
                      **mc_scoring.score_mc(item, pred, think=options.think)})
    elif item.kind == "instruction":
      ok, reason = aif.check(pred, item.meta.get("task_identifier"), item.meta.get("kwargs"),
                             item.meta.get("question", ""))
      if reason is None:
        instr_rows.append({**base(item), "prediction": pred, "instruction_following": ok})
      else:
        unscored.append({"id": item.id, "category": item.category, "reason": reason, "prediction": pred})
    elif options.judge is not None:
      judged.append((item, pred))
    else:
      unscored.append({"id": item.id, "category": item.category, "reason": "open-ended: no judge configured",
                       "prediction": pred})
  scores: dict[str, Any] = {
      "official": report_lib.scorer_block(mc_rows, "official", orders=orders),
      "robust": report_lib.scorer_block(mc_rows, "robust", orders=orders),
  }
  judge_rows = []
  if judged:
    values = list(options.judge.judge([i for i, _ in judged], [p for _, p in judged]))
    if len(values) != len(judged):
      raise ValueError(f"judge returned {len(values)} scores for {len(judged)} items")
    judge_rows = [{**base(item), "prediction": pred, "judge": min(1.0, max(0.0, float(v)))}
                  for (item, pred), v in zip(judged, values)]
    scores["judge"] = report_lib.scorer_block(judge_rows, "judge", orders=orders)
  if instr_rows:
    scores["instruction_following"] = report_lib.scorer_block(instr_rows, "instruction_following", orders=orders)
  if benchmark == "mmau-pro" or options.think:
    settings["prompt_template"] = options.prompt_template
  if benchmark == "longaudio":
    settings["length_edges"] = list(options.length_edges)
  n = len(mc_rows) + len(judge_rows) + len(instr_rows)
  return report_lib.make_report(
      benchmark, options.checkpoint, n, scores, items=mc_rows + judge_rows + instr_rows, skipped=skipped,
      unscored=unscored, notes=_notes(benchmark, options, loaded), settings=settings)


# ----------------------------------------------------------------------------- entry point


def run_eval(
    predictor: Predictor | Any,
    benchmark: str,
    data_path: str,
    audio_root: str | None,
    out_path: str,
    options: EvalOptions | None = None,
) -> dict[str, Any] | None:
  """Evaluates `predictor` on a benchmark file and writes the report (see the module docstring).

  Every jax process must call this with the same arguments. Returns the report
  on process 0 and None on the others.
  """
  options = options or EvalOptions()
  loaded = load_benchmark(benchmark, data_path, audio_root, options)
  process_index, process_count = _process_info()
  store = PredictionStore(predictions_dir(out_path, options))
  predict_share(predictor, loaded.items, store, options, process_index, process_count,
                getattr(predictor, "group", None))
  if process_count > 1:
    _barrier("alm_jax.eval.runner:predictions")
  if process_index != 0:
    return None
  saved = store.read_all()
  _check_saved(saved, loaded.items, options, store.directory)
  missing = [item.id for item in loaded.items if item.id not in saved]
  if missing:
    raise DataError(f"{store.directory}: {len(missing)} of {len(loaded.items)} items have no saved prediction "
                    f"(first: {missing[0]!r}); is this directory shared by all processes?")
  result = score(benchmark, loaded, {k: v.get("prediction") for k, v in saved.items()}, options)
  report_lib.write_report(result, out_path, chart=options.chart)
  return result
