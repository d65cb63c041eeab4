"""Multi-audio questions composed from a labelled single-clip dataset (`alm-jax data compose`).

Each input line (or CSV row) is one clip with a label: a class, a caption or a
transcript. Clips are split first — by the source's own split or fold when it
gives one, otherwise 80/10/10 by clip, spread over the labels — and questions
are then composed from the clips of one split only, so no audio file serves
two splits. Question types, each over 2–5 clips (`--clips`):

* `which`: which clip holds X? (options: the clips)
* `match`: which two clips hold the same kind of sound? (options: clip pairs; 3+ clips)
* `count`: how many of the clips hold X? (options: counts)
* `order`: in what order do X and Y occur across the clips? (options: "X, then Y",
  "Y, then X", "only X", "only Y", all from the label vocabulary)
* `same`: is clip N the same kind of sound as clip M? (yes / no)

Targets, answer values, clip counts and answer positions are dealt from
shuffled decks per (split, type[, number of options]), so each is balanced
within one and a text-only model stays at chance. Every example's `meta` names
each clip's source (`file:line`), id and label. Output is deterministic for
the seed. Readers: our JSONL / JSON manifests, and CSV layouts such as ESC-50
(`meta/esc50.csv`: filename, fold, category), Clotho (`file_name`,
`caption_1..5`) and AudioCaps (`audiocap_id`, `youtube_id`, `caption`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from alm_jax.data.records import TASK_MCQ, format_mcq
from alm_jax.data.synth import SPLIT_FRACTIONS, SPLITS, corpus_texts
from alm_jax.errors import DataError

TYPES = ("which", "match", "count", "order", "same")
MIN_CLIPS = {"which": 2, "match": 3, "count": 2, "order": 2, "same": 2}
MAX_OPTIONS = 4  # pairs and counts: the answer and up to three others
COUNT_WORDS = ("none", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_LABEL_KEYS = ("text", "answer", "meta.label", "label", "category", "caption", "caption_1")
SPLIT_NAMES = {"train": "train", "training": "train", "development": "train", "val": "validation",
               "valid": "validation", "validation": "validation", "dev": "validation", "test": "test",
               "eval": "test", "evaluation": "test"}
PATH_COLUMNS = ("filename", "file_name", "audio", "path", "audio_path")
AUDIO_EXTS = (".wav", ".flac")


@dataclasses.dataclass(frozen=True)
class LabelledClip:
  """One source clip: its audio entry (absolute path, optional span), label, source split and where it came from."""

  path: str
  label: str
  source: str  # "file:line"
  id: str
  split: str | None = None
  start: float | None = None
  end: float | None = None

  def audio_entry(self, out_dir: str):
    """The manifest `audio` entry for this clip, relative to `out_dir`."""
    rel = os.path.relpath(self.path, out_dir)
    if self.start is None and self.end is None:
      return rel
    return {"path": rel, **({"start": self.start} if self.start is not None else {}),
            **({"end": self.end} if self.end is not None else {})}


@dataclasses.dataclass(frozen=True)
class Question:
  """One composed question: its clips in order, text, options and answer."""

  type: str
  clips: tuple[LabelledClip, ...]
  question: str
  options: tuple[str, ...]
  answer: str
  rationale: str = ""  # the clips' labels and the one-step judgements the answer follows from (`meta.rationale`)


# --- reading labelled clips ------------------------------------------------------------------


def display_label(label: str) -> str:
  """A label as questions show it: underscores as spaces (ESC-50 `chirping_birds`), whitespace collapsed."""
  return " ".join(label.replace("_", " ").split())


def split_name(value: str, origin: str) -> str:
  """train / validation / test for a source's split name (Clotho `development`, AudioCaps `val`, ...)."""
  name = SPLIT_NAMES.get(value.strip().lower())
  if name is None:
    raise DataError(f"{origin}: unknown split {value!r} (known: {', '.join(sorted(SPLIT_NAMES))})")
  return name


def _lookup(item: Mapping, key: str):
  """`item[key]`, where `a.b` reads `item["a"]["b"]`; None when absent."""
  value = item
  for part in key.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return value


def _label(item: Mapping, label_key: str | None, origin: str) -> str:
  """The clip's label from `label_key`, or the first of DEFAULT_LABEL_KEYS present; DataError when none."""
  keys = (label_key,) if label_key else DEFAULT_LABEL_KEYS
  for key in keys:
    value = _lookup(item, key)
    if isinstance(value, (str, int)) and not isinstance(value, bool) and display_label(str(value)):
      return display_label(str(value))
  raise DataError(f"{origin}: unlabelled clip (no non-empty {' / '.join(keys)}; choose one with --label-key)")


def _selected(item: Mapping, select: Mapping[str, Sequence[str]]) -> bool:
  """Whether the line passes every `--select KEY=V1,V2` filter."""
  return all(str(_lookup(item, key)) in values for key, values in select.items())


def _split_from_name(path: str) -> str | None:
  """A split named by the file (`train.jsonl`, AudioCaps `val.csv`, Clotho `clotho_captions_evaluation.csv`)."""
  stem = os.path.splitext(os.path.basename(path))[0].lower()
  for word in (stem, stem.rsplit("_", 1)[-1]):
    if word in SPLIT_NAMES:
      return SPLIT_NAMES[word]
  return None


def _manifest_clips(path: str, label_key: str | None, select: Mapping[str, Sequence[str]]) -> list[LabelledClip]:
  """Labelled clips of one JSONL / JSON manifest (ours, MMAU-style); a multi-clip selected line is an error."""
  from alm_jax.data.sources import open_source, to_record  # pylint: disable=import-outside-toplevel

  source = open_source(path)
  file_split = _split_from_name(path)
  out = []
  for i in range(len(source)):
    raw = source[i]
    if raw.kind not in ("line", "object"):
      raise DataError(f"{raw.origin}: compose reads JSONL / JSON manifests and CSV files, not packed records")
    record = to_record(raw)  # validates the line; DataError names file:line
    item = json.loads(raw.payload) if raw.kind == "line" else raw.payload
    if not _selected(item, select):
      continue
    if len(record.clips) != 1:
      raise DataError(f"{raw.origin}: {len(record.clips)} clips; compose reads single-clip lines "
                      "(pick lines with --select KEY=VALUE)")
    clip = record.clips[0]
    split = split_name(record.split, raw.origin) if record.split else file_split
    out.append(LabelledClip(clip.path, _label(item, label_key, raw.origin), raw.origin, record.id, split,
                            clip.start, clip.end))
  return out


def _fold_splits(folds: Iterable[str]) -> dict[str, str]:
  """Folds → splits: the last fold is test, the one before validation, the rest train (ESC-50: 5, 4, 1–3)."""
  order = sorted(set(folds), key=lambda f: (len(f), f))
  out = {f: "train" for f in order}
  if len(order) >= 2:
    out[order[-1]] = "test"
  if len(order) >= 3:
    out[order[-2]] = "validation"
  return out


def _audio_candidates(row: Mapping[str, str], path: str, audio_root: str | None, split_dir: str) -> list[str]:
  """Where a CSV row's audio may lie: its file column under the root (and a split folder), or AudioCaps ids."""
  folder = os.path.dirname(os.path.abspath(path))
  roots = [audio_root] if audio_root else [os.path.join(folder, "audio"), os.path.join(os.path.dirname(folder),
                                                                                        "audio"), folder]
  names = [row[c] for c in PATH_COLUMNS if row.get(c)][:1]
  if not names:  # AudioCaps: audio files named by one of the ids
    ids = [row.get("audiocap_id"), row.get("youtube_id"), row.get("youtube_id") and
           f"{row['youtube_id']}_{row.get('start_time', '')}", row.get("youtube_id") and f"Y{row['youtube_id']}"]
    names = [f"{i}{ext}" for i in ids if i for ext in AUDIO_EXTS]
  out = []
  for root in roots:
    for name in names:
      out += [os.path.join(root, split_dir, name), os.path.join(root, name)]
  return [os.path.normpath(p) for p in out]


def _csv_clips(path: str, label_key: str | None, select: Mapping[str, Sequence[str]],
               audio_root: str | None) -> list[LabelledClip]:
  """Labelled clips of a CSV (ESC-50, Clotho, AudioCaps or any with a file and a label column)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      rows = [(reader.line_num, row) for row in reader]
      header = reader.fieldnames or []
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: cannot read CSV ({e})") from None
  if not any(c in header for c in PATH_COLUMNS + ("audiocap_id", "youtube_id")):
    raise DataError(f"{path}:1: no audio column (one of {', '.join(PATH_COLUMNS)}, or AudioCaps ids)")
  file_split = _split_from_name(path)
  split_dir = os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]  # Clotho: audio/<development>/
  folds = _fold_splits(r["fold"] for _, r in rows if r.get("fold")) if "fold" in header else {}
  out = []
  for line, row in rows:
    origin = f"{os.path.abspath(path)}:{line}"
    if not _selected(row, select):
      continue
    label = _label(row, label_key, origin)
    candidates = _audio_candidates(row, path, audio_root, split_dir)
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
      raise DataError(f"{origin}: missing audio file {candidates[0] if candidates else '(no name)'}"
                      + (f" (and {len(candidates) - 1} other places)" if len(candidates) > 1 else ""))
    split = (split_name(row["split"], origin) if row.get("split") else folds.get(row.get("fold") or "")
             or file_split)
    ident = next((row[c] for c in ("id", "audiocap_id") + PATH_COLUMNS if row.get(c)), str(line))
    out.append(LabelledClip(os.path.abspath(found), label, origin, ident, split))
  return out


def input_files(path: str) -> list[str]:
  """The files one `--in` names: a file, or a folder's split manifests, `meta/esc50.csv` or CSVs."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such manifest file or folder")
  manifests = [os.path.join(path, f"{s}{ext}") for s in SPLITS for ext in (".jsonl", ".json")]
  found = [p for p in manifests if os.path.isfile(p)]
  if not found and os.path.isfile(os.path.join(path, "meta", "esc50.csv")):
    found = [os.path.join(path, "meta", "esc50.csv")]
  if not found:
    found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".csv"))
  if not found:
    raise DataError(f"{path}: holds no train/validation/test manifest, meta/esc50.csv or CSV file")
  return found


def read_clips(inputs: Sequence[str], *, label_key: str | None = None,
               select: Mapping[str, Sequence[str]] | None = None, audio_root: str | None = None) -> list[LabelledClip]:
  """Every selected labelled clip of the inputs, in file order; each audio file must exist."""
  select = select or {}
  clips: list[LabelledClip] = []
  for given in inputs:
    for path in input_files(given):
      if path.lower().endswith(".csv"):
        clips += _csv_clips(path, label_key, select, audio_root)
      else:
        clips += _manifest_clips(path, label_key, select)
  for clip in clips:
    if not os.path.isfile(clip.path):
      raise DataError(f"{clip.source}: missing audio file {clip.path}")
  if not clips:
    raise DataError(f"{', '.join(inputs)}: no labelled clip selected")
  return clips


# --- splitting by clip -----------------------------------------------------------------------


def _unique(clips: Sequence[LabelledClip]) -> list[LabelledClip]:
  """Clips once each (same file and span): a clip listed twice must agree on its label; a given split is kept."""
  first: dict[tuple, int] = {}
  out: list[LabelledClip] = []
  for clip in clips:
    key = (clip.path, clip.start, clip.end)
    if key not in first:
      first[key] = len(out)
      out.append(clip)
      continue
    seen = out[first[key]]
    if seen.label != clip.label:
      raise DataError(f"{clip.source}: the same clip is at {seen.source} with label {seen.label!r}, here "
                      f"{clip.label!r}")
    if clip.split and not seen.split:
      out[first[key]] = dataclasses.replace(seen, split=clip.split)
  return out


def split_clips(clips: Sequence[LabelledClip], rng: np.random.Generator) -> dict[str, list[LabelledClip]]:
  """Clips per split, each audio file in one split only: the source's split where given, else 80/10/10.

  A file's spans stay together. Files without a source split are dealt label
  by label (labels in sorted order, files shuffled) through a cycle of 8 train,
  1 validation, 1 test, so every split sees most labels. A file given two
  splits is an error naming both lines.
  """
  files: dict[str, list[LabelledClip]] = collections.defaultdict(list)
  for clip in _unique(clips):
    files[clip.path].append(clip)
  out: dict[str, list[LabelledClip]] = {s: [] for s in SPLITS}
  loose = collections.defaultdict(list)
  for group in files.values():
    given = [c for c in group if c.split]
    other = next((c for c in given if c.split != given[0].split), None)
    if other is not None:
      raise DataError(f"{other.source}: {other.path} is in split {other.split!r} here and {given[0].split!r} at "
                      f"{given[0].source}")
    if given:
      out[given[0].split] += [dataclasses.replace(c, split=given[0].split) for c in group]
    else:
      loose[group[0].label].append(group)
  cycle = ["train"] * round(10 * (1 - sum(SPLIT_FRACTIONS.values())))
  cycle += ["validation"] * round(10 * SPLIT_FRACTIONS["validation"]) + ["test"] * round(10 * SPLIT_FRACTIONS["test"])
  cycle = [cycle[i] for i in rng.permutation(len(cycle))]
  k = 0
  for label in sorted(loose):
    for i in rng.permutation(len(loose[label])):
      split = cycle[k % len(cycle)]
      out[split] += [dataclasses.replace(c, split=split) for c in loose[label][i]]
      k += 1
  return out


# --- balanced draws --------------------------------------------------------------------------


class Decks:
  """Balanced draws: per key, a shuffled deck of `range(n)` dealt until empty, then reshuffled."""

  def __init__(self, rng: np.random.Generator):
    self.rng, self._decks = rng, {}

  def deal(self, key, n: int) -> int:
    """The next value in [0, n) for `key`; over any run each value comes up within one of the others."""
    deck = self._decks.get((key, n))
    if not deck:
      deck = self._decks[(key, n)] = self.rng.permutation(n).tolist()
    return deck.pop()


class Pool:
  """The clips of one split by label, with the draws the composers need."""

  def __init__(self, clips: Sequence[LabelledClip], rng: np.random.Generator, where: str, split: str):
    self.rng, self.where, self.split = rng, where, split
    by_label = collections.defaultdict(list)
    for clip in clips:
      by_label[clip.label].append(clip)
    self.by_label = dict(sorted(by_label.items()))
    self.labels = list(self.by_label)
    self.clips = [c for group in self.by_label.values() for c in group]
    self.total = len(self.clips)
    # Cached per count: caption sets have tens of thousands of labels.
    self._with: dict[int, list[str]] = {}
    self._fewest: dict[int, int | None] = {}

  def need(self, ok: bool, kind: str, what: str) -> None:
    """Raises a one-line DataError when the split cannot give `kind` questions."""
    if not ok:
      raise DataError(f"{self.where}: split {self.split!r} has {len(self.labels)} distinct labels over "
                      f"{self.total} clips; {kind!r} questions need {what}")

  def labels_with(self, count: int, exclude: Iterable[str] = ()) -> list[str]:
    """Labels holding at least `count` clips, not in `exclude`."""
    if count not in self._with:
      self._with[count] = [l for l in self.labels if len(self.by_label[l]) >= count]
    skip = set(exclude)
    return [l for l in self._with[count] if l not in skip] if skip else self._with[count]

  def fewest(self, count: int) -> int | None:
    """The fewest clips any label with at least `count` clips holds (None: no such label)."""
    if count not in self._fewest:
      self._fewest[count] = min((len(self.by_label[l]) for l in self.labels_with(count)), default=None)
    return self._fewest[count]

  def pick_label(self, count: int = 1, exclude: Iterable[str] = ()) -> str:
    """A random label with at least `count` clips, not in `exclude` (caller checked one exists)."""
    return self.draw(self.labels_with(count), 1, lambda l: l not in exclude)[0]

  def draw(self, items: Sequence, n: int, ok: Callable[[object], bool]) -> list:
    """`n` different random items passing `ok`: a few cheap draws first (large sets), else a filtered full pass."""
    picked: list[int] = []
    for i in self.rng.integers(len(items), size=8 * n + 8).tolist():
      if i not in picked and ok(items[i]):
        picked.append(i)
        if len(picked) == n:
          return [items[i] for i in picked]
    rest = [x for x in items if ok(x)]
    return [rest[i] for i in self.rng.choice(len(rest), n, replace=False)]

  def clips_of(self, label: str, n: int) -> list[LabelledClip]:
    """`n` different clips of `label`."""
    group = self.by_label[label]
    return [group[i] for i in self.rng.choice(len(group), n, replace=False)]

  def fillers(self, n: int, exclude: Iterable[str], distinct_labels: bool = False) -> list[LabelledClip]:
    """`n` different clips whose labels are not in `exclude` (and differ from each other if `distinct_labels`)."""
    skip = set(exclude)
    if distinct_labels:
      labels = self.draw(self.labels, n, lambda l: l not in skip)
      return [self.clips_of(l, 1)[0] for l in labels]
    return self.draw(self.clips, n, lambda c: c.label not in skip)

  def count_without(self, exclude: Iterable[str]) -> int:
    """Clips whose labels are not in `exclude`."""
    return self.total - sum(len(self.by_label.get(l, ())) for l in set(exclude))


def _place(answer: str, others: Sequence[str], position: int, rng: np.random.Generator) -> tuple[str, ...]:
  """Options with `answer` at `position` and `others` in random order around it."""
  rest = [others[i] for i in rng.permutation(len(others))]
  return tuple(rest[:position] + [answer] + rest[position:])


def _clip_name(k: int) -> str:
  return f"clip {k + 1}"


# Rationales (`meta.rationale`, learned with `data.clip_rationale`): each clip in turn with its label and, where
# the question needs one, the judgement that leads to the answer, so that no step compares more than two things.


def _yes_no(clips: Sequence[LabelledClip], label: str) -> str:
  """"clip 1: dog, no; clip 2: rain, yes": whether each clip holds `label`."""
  return "; ".join(f"{_clip_name(k)}: {c.label}, {'yes' if c.label == label else 'no'}" for k, c in enumerate(clips))


def _likeness(clips: Sequence[LabelledClip]) -> str:
  """"clip 1: dog; clip 2: rain; clip 3: dog, like clip 1": each clip's label and the first earlier clip it repeats."""
  labels = [c.label for c in clips]
  return "; ".join(f"{_clip_name(k)}: {label}" + (f", like {_clip_name(labels.index(label))}"
                                                    if labels.index(label) < k else "")
                   for k, label in enumerate(labels))


def _listing(clips: Sequence[LabelledClip], which: Iterable[int] | None = None) -> str:
  """"clip 1: dog; clip 2: rain": the labels of the clips `which` (default all)."""
  return "; ".join(f"{_clip_name(k)}: {clips[k].label}" for k in (range(len(clips)) if which is None else which))


# --- the five composers: (pool, n clips, decks, key) -> Question --------------------------------


def compose_which(pool: Pool, n: int, decks: Decks, key) -> Question:
  """Which clip holds X: one clip of X, the others of other labels; options are the clips in order."""
  pool.need(len(pool.labels) >= 2, "which", "at least 2 labels")
  target = pool.labels[decks.deal((key, "label"), len(pool.labels))]
  pool.need(pool.count_without([target]) >= n - 1, "which", f"{n - 1} clips besides those of {target!r}")
  at = decks.deal((key, "position", n), n)
  clips = pool.fillers(n - 1, [target])
  clips.insert(at, pool.clips_of(target, 1)[0])
  options = tuple(_clip_name(k) for k in range(n))
  return Question("which", tuple(clips), f'Which clip holds "{target}"?', options, options[at],
                  _yes_no(clips, target))


def compose_match(pool: Pool, n: int, decks: Decks, key) -> Question:
  """Which two clips match: one pair shares a label, every other clip has its own; options are clip pairs."""
  pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
  pool.need(bool(pool.labels_with(2)), "match", "a label with at least 2 clips")
  pool.need(len(pool.labels) >= n - 1, "match", f"at least {n - 1} labels for {n} clips")
  label = pool.pick_label(2)
  a, b = pairs[int(pool.rng.integers(len(pairs)))]
  rest = iter(pool.fillers(n - 2, [label], distinct_labels=True))
  pair = iter(pool.clips_of(label, 2))
  clips = [next(pair) if k in (a, b) else next(rest) for k in range(n)]
  name = lambda p: f"clips {p[0] + 1} and {p[1] + 1}"  # noqa: E731
  wrong = [name(p) for p in pairs if p != (a, b)]
  wrong = [wrong[i] for i in pool.rng.choice(len(wrong), min(MAX_OPTIONS - 1, len(wrong)), replace=False)]
  position = decks.deal((key, "position", len(wrong) + 1), len(wrong) + 1)
  options = _place(name((a, b)), wrong, position, pool.rng)
  return Question("match", tuple(clips), "Which two clips hold the same kind of sound?", options, name((a, b)),
                  _likeness(clips))


def compose_count(pool: Pool, n: int, decks: Decks, key) -> Question:
  """How many clips hold X: k of n (k balanced over what the split allows), the rest other labels."""
  pool.need(len(pool.labels) >= 2, "count", "at least 2 labels")
  values = [k for k in range(n + 1) if pool.fewest(max(k, 1)) is not None and pool.total - pool.fewest(max(k, 1))
            >= n - k]
  pool.need(bool(values), "count", f"enough clips for {n}-clip questions")
  k = values[decks.deal((key, "value", n), len(values))]
  label = pool.draw(pool.labels_with(max(k, 1)), 1, lambda l: pool.total - len(pool.by_label[l]) >= n - k)[0]
  clips = pool.clips_of(label, k) + pool.fillers(n - k, [label])
  clips = [clips[i] for i in pool.rng.permutation(n)]
  wrong = [COUNT_WORDS[c] for c in range(n + 1) if c != k]
  wrong = [wrong[i] for i in pool.rng.choice(len(wrong), min(MAX_OPTIONS - 1, len(wrong)), replace=False)]
  position = decks.deal((key, "position", len(wrong) + 1), len(wrong) + 1)
  options = _place(COUNT_WORDS[k], wrong, position, pool.rng)
  return Question("count", tuple(clips), f'How many of the clips hold "{label}"?', options, COUNT_WORDS[k],
                  _yes_no(clips, label))


def compose_order(pool: Pool, n: int, decks: Decks, key) -> Question:
  """In what order do X and Y occur: X before Y, Y before X, only X or only Y across the clips."""
  pool.need(len(pool.labels) >= 3, "order", "at least 3 labels (X, Y and another)")
  x = pool.pick_label()
  y = pool.pick_label(exclude=[x])
  pool.need(pool.count_without([x, y]) >= n - 1, "order", f"{n - 1} clips besides those of {x!r} and {y!r}")
  value = decks.deal((key, "value"), 4)  # 0: X then Y, 1: Y then X, 2: only X, 3: only Y
  outcomes = [f"{x}, then {y}", f"{y}, then {x}", f"only {x}", f"only {y}"]
  held = {0: [x, y], 1: [y, x], 2: [x], 3: [y]}[value]
  if len(held) == 2 and n == 2:
    clips = [pool.clips_of(held[0], 1)[0], pool.clips_of(held[1], 1)[0]]
  else:
    slots = sorted(pool.rng.choice(n, len(held), replace=False).tolist())
    fill = iter(pool.fillers(n - len(held), [x, y]))
    marked = dict(zip(slots, held))
    clips = [pool.clips_of(marked[k], 1)[0] if k in marked else next(fill) for k in range(n)]
  position = decks.deal((key, "position"), 4)
  options = _place(outcomes[value], outcomes[:value] + outcomes[value + 1 :], position, pool.rng)
  return Question("order", tuple(clips), f'In what order do "{x}" and "{y}" occur across the clips?', options,
                  outcomes[value], _listing(clips))


def compose_same(pool: Pool, n: int, decks: Decks, key) -> Question:
  """Is clip N the same kind of sound as clip M: yes / no balanced; the other clips any label."""
  pool.need(bool(pool.labels_with(2)) and len(pool.labels) >= 2, "same", "2 labels, one with at least 2 clips")
  same = decks.deal((key, "value"), 2) == 0
  a, b = sorted(pool.rng.choice(n, 2, replace=False).tolist())
  if same:
    pair = pool.clips_of(pool.pick_label(2), 2)
  else:
    first = pool.pick_label()
    pair = pool.clips_of(first, 1) + pool.clips_of(pool.pick_label(exclude=[first]), 1)
  used = {c.path for c in pair}
  pool.need(pool.total >= n, "same", f"at least {n} clips")
  fill = iter(pool.draw(pool.clips, n - 2, lambda c: c.path not in used))
  clips = [pair[0] if k == a else pair[1] if k == b else next(fill) for k in range(n)]
  answer = "yes" if same else "no"
  position = decks.deal((key, "position"), 2)
  options = _place(answer, ["no" if same else "yes"], position, pool.rng)
  return Question("same", tuple(clips), f"Is clip {a + 1} the same kind of sound as clip {b + 1}?", options, answer,
                  _listing(clips, (a, b)))


COMPOSERS: dict[str, Callable[[Pool, int, Decks, object], Question]] = {
    "which": compose_which, "match": compose_match, "count": compose_count, "order": compose_order,
    "same": compose_same,
}


# --- the manifest set ------------------------------------------------------------------------


def compose_split(pool: Pool, count: int, types: Sequence[str], clip_range: tuple[int, int],
                  decks: Decks) -> list[Question]:
  """`count` questions of each type from one split's pool, clip counts dealt evenly over the type's range."""
  out = []
  for kind in types:
    low = max(clip_range[0], MIN_CLIPS[kind])
    if low > clip_range[1]:
      raise DataError(f"{pool.where}: {kind!r} questions need at least {MIN_CLIPS[kind]} clips, --clips allows "
                      f"{clip_range[0]}-{clip_range[1]}")
    for _ in range(count):
      n = low + decks.deal((pool.split, kind, "clips"), clip_range[1] - low + 1)
      out.append(COMPOSERS[kind](pool, n, decks, (pool.split, kind)))
  return [out[i] for i in pool.rng.permutation(len(out))]


def manifest_line(q: Question, split: str, number: int, out_dir: str) -> dict:
  """One output manifest line (the synthetic corpus's MCQ layout); `meta` names every clip's source."""
  return {
      "id": f"{split}-{number:06d}", "audio": [c.audio_entry(out_dir) for c in q.clips],
      "conversation": [{"role": "user", "content": format_mcq(q.question, q.options)},
                       {"role": "assistant", "content": q.answer}],
      "question": q.question, "choices": list(q.options), "answer": q.answer, "category": "multi-audio",
      "sub_category": f"compose_{q.type}", "task": TASK_MCQ, "split": split,
      "meta": {"clip_sources": [c.source for c in q.clips], "clip_ids": [c.id for c in q.clips],
               "clip_labels": [c.label for c in q.clips], "rationale": q.rationale},
  }


def parse_clip_range(text: str) -> tuple[int, int]:
  """`2-5` or `3` → (low, high), each within 2..9."""
  low, _, high = str(text).partition("-")
  try:
    pair = (int(low), int(high or low))
  except ValueError:
    raise DataError(f"--clips {text!r}: expected N or LOW-HIGH, e.g. 2-5") from None
  if not 2 <= pair[0] <= pair[1] <= len(COUNT_WORDS) - 1:
    raise DataError(f"--clips {text!r}: clip counts must lie within 2-{len(COUNT_WORDS) - 1}, low first")
  return pair


def parse_question_counts(text: str) -> dict[str, int]:
  """`N` (train N, validation and test N // 8, at least 1) or `TRAIN,VALIDATION,TEST` questions per type."""
  try:
    values = [int(v) for v in str(text).split(",")]
  except ValueError:
    raise DataError(f"--questions {text!r}: expected N or TRAIN,VALIDATION,TEST") from None
  if len(values) == 1:
    values = [values[0], max(1, values[0] // 8), max(1, values[0] // 8)]
  if len(values) != 3 or min(values) < 0:
    raise DataError(f"--questions {text!r}: expected N or TRAIN,VALIDATION,TEST, none negative")
  return dict(zip(SPLITS, values))


def parse_select(pairs: Sequence[str]) -> dict[str, list[str]]:
  """`KEY=V1,V2` filters (repeatable) → {key: [values]}."""
  out = {}
  for pair in pairs:
    key, eq, values = pair.partition("=")
    if not eq or not key:
      raise DataError(f"--select {pair!r}: expected KEY=VALUE[,VALUE...]")
    out[key] = values.split(",")
  return out


def write_composed(inputs: Sequence[str], out_dir: str, *, seed: int = 0, questions: Mapping[str, int] | None = None,
                   clip_range: tuple[int, int] = (2, 5), types: Sequence[str] = TYPES, label_key: str | None = None,
                   select: Mapping[str, Sequence[str]] | None = None, audio_root: str | None = None,
                   resplit: bool = False, vocab_size: int = 1024) -> dict:
  """Writes `out_dir/{train,validation,test}.jsonl`, `tokenizer.json` and `compose.json`; returns the summary.

  `questions` is the number per type in each split (default 200 / 25 / 25).
  `resplit` ignores the source's splits and folds (80/10/10 by clip instead).
  The output depends only on the inputs and the arguments.
  """
  from alm_jax.data.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel

  unknown = [t for t in types if t not in COMPOSERS]
  if unknown or not types:
    raise DataError(f"--types {','.join(types)}: choose from {', '.join(TYPES)}")
  questions = dict(questions or {"train": 200, "validation": 25, "test": 25})
  where = ", ".join(inputs)
  rng = np.random.default_rng(seed)
  clips = read_clips(inputs, label_key=label_key, select=select, audio_root=audio_root)
  if resplit:
    clips = [dataclasses.replace(c, split=None) for c in clips]
  splits = split_clips(clips, rng)
  decks = Decks(rng)
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  lines: dict[str, list[dict]] = {}
  for split in SPLITS:
    if questions[split] and not splits[split]:
      held = ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
      raise DataError(f"{where}: no clip in split {split!r} (clips per split: {held}); set its --questions "
                      "count to 0 (TRAIN,VALIDATION,TEST) or drop the source splits with --resplit")
    pool = Pool(splits[split], rng, where, split)
    composed = compose_split(pool, questions[split], types, clip_range, decks) if questions[split] else []
    lines[split] = [manifest_line(q, split, i, out_dir) for i, q in enumerate(composed)]
  for split in SPLITS:
    tmp = os.path.join(out_dir, f"{split}.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines[split])
    os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
  every = [line for split in SPLITS for line in lines[split]]
  train_bpe(corpus_texts(every), vocab_size=vocab_size).save(os.path.join(out_dir, "tokenizer.json"))
  summary = {
      "inputs": list(inputs), "seed": seed, "types": list(types), "clips_per_question": list(clip_range),
      "splits": {s: len(lines[s]) for s in SPLITS},
      "source_clips": {s: len(splits[s]) for s in SPLITS},
      "labels": {s: len({c.label for c in splits[s]}) for s in SPLITS},
      "question_types": dict(collections.Counter(f"{l['split']}/{l['sub_category']}" for l in every)),
  }
  with open(os.path.join(out_dir, "compose.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  return summary
