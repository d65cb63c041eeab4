"""Grain input pipeline: examples → the same global batches on every process → this process's rows.

    source (manifest / ArrayRecord / TFDS) ─▶ grain.MapDataset: the global order
      ─▶ shuffle (train, per-epoch reshuffle) ─▶ repeat
      ─▶ measure (grain reader threads, every process, every example): parse, clip
         lengths from headers, crop/pad plan, placeholder counts, chat template +
         tokenise, loss mask; bad examples judged here (`examples.py`)
      ─▶ plan (`BatchPlanner`): count/skip bad examples, bucket by (L, K), emit
         global batches of `data.batch_size` rows
      ─▶ load this process's `rows` of each global batch: decode + resample, fit to
         the measured length, crop/pad, windows; collate to [len(rows), L, K, …]
      ─▶ mp_prefetch (data.workers processes: worker w of n plans every batch and
         loads batches w, w + n, …; grain interleaves them back in order)

The batch sequence is a function of the global example order alone: one
process or N processes (any `rows` split) give the same global batches, and
each process's batch is exactly its rows of them. Each decoding worker plans
the whole order itself (measuring is cheap next to decoding — a header read
and a tokenisation per example — but it is repeated in every worker of every
process).

Batch contract — one batch is a dict of numpy arrays; B is the number of global
rows this process loads (`len(rows)`, `data.batch_size / process_count` by
default), L a length bucket (`data.length_buckets`), K a window bucket
(`data.window_buckets`: audio windows per row) and S = `spec.window_samples`:

  tokens        int32   [B, L]     ids right-padded with the pad id. Clip k of an example
                                   is a span of n_k placeholder ids (n_k =
                                   `num_audio_tokens(samples_k, spec)`), inside the
                                   family's audio begin/end markers if it has them.
  token_mask    bool    [B, L]     True on real tokens.
  loss_mask     float32 [B, L]     1.0 on tokens to predict (assistant answers and their
                                   end-of-turn token), 0 on prompt, audio and padding.
  segment_ids   int32   [B, L]     which example of the row a token belongs to: 1, 2, …
                                   in row order, 0 on padding. Without packing every
                                   real token is 1. A packed row holds its examples back
                                   to back; the model restarts positions at each segment
                                   and attends only within it.
  audio         float32 [B, K, S]  16 kHz PCM windows of row b in slots 0..n_b-1: its
                                   clips in the order their placeholder spans appear in
                                   `tokens`, each clip cut into `num_windows(samples,
                                   spec)` windows in time order (beyond
                                   `spec.max_windows` truncated), zero-padded; slots
                                   past n_b are zero.
  audio_samples int32   [B, K]     real samples in each slot (0 for padding slots).
  audio_clip    int32   [B, K]     the slot's clip index within its row (0, 1, … in
                                   placeholder order, counted across a packed row's
                                   examples); -1 for padding slots (a padding row is
                                   all -1).
  example_id    int64   [B]        source index of each row's (first) example; -1 for
                                   padding rows.

Every batch has exactly B rows (missing rows are padding: token_mask False,
loss_mask 0, example_id -1) and one of a few (L, K) shapes, so the train step
compiles a handful of programs. K is the smallest window bucket holding the
most windows any row of the global batch needs; an example needing more
windows than the largest bucket is a bad example. With `data.packing` (training
only) rows are filled best fit up to the largest length bucket and the largest
window bucket, so a row never needs more windows than a bucket holds; a batch's
(L, K) is then the smallest bucket pair holding its fullest row. Otherwise, with
`data.group_by_length`
examples are grouped by (length bucket, window bucket), so rows with many
windows batch together and single-clip rows are not padded to many slots; a
global batch is emitted when its bucket holds `data.batch_size` examples, and a
finite split flushes partial buckets at the end in bucket order.

Bad examples (unreadable record or audio header, too many clips or windows,
too short, too long, no answer) are judged while measuring, identically on
every process; `data.skip_bad` skips and counts them (`data.max_skip_rate`).
A clip whose header reads but whose audio then fails to decode is found only
by the process loading that row: it raises `AudioError` naming the file and
the record, or with `data.skip_bad` its row becomes a padding row (the same
row in every process layout, since it depends only on the file), logged and
counted in `stats.decode_failed` of that process.

Iterator state (`get_state` / `set_state`, JSON-serialisable, saved by Orbax
with the train state) holds the planner's position in the global order, the
positions of the examples waiting in buckets (measured again on restore) and
the counts, so a restored iterator yields exactly the batches an uninterrupted
one would — with or without worker processes (restore with the same
`data.workers`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from alm_jax.config import ConfigError, from_dict, require
from alm_jax.data.examples import Prepare
from alm_jax.data.records import DEFAULT_PROMPTS
from alm_jax.data.sources import open_source
from alm_jax.data.templates import TEMPLATES
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import AudioError, DataError
from alm_jax.models.audio_slots import AudioTokenSpec

log = logging.getLogger("alm_jax.data")

BATCH_KEYS = ("tokens", "token_mask", "loss_mask", "segment_ids", "audio", "audio_samples", "audio_clip",
              "example_id")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` section of a run config.

  Attributes:
    path: training data: a manifest (.jsonl / .json), a folder written by
      `alm-jax data synth` or `data pack`, ArrayRecord files, or `tfds:NAME`.
    eval_path: data for the non-train splits (default: `path`, by split name).
    tokenizer: tokenizer.json (default: `path`/tokenizer.json for a folder).
    template: the model family's chat template (`alm_jax.data.templates.TEMPLATES`).
    batch_size: global batch size (split evenly across processes).
    length_buckets: allowed token lengths L; longer examples are bad examples.
    window_buckets: allowed audio windows per row K (default: 1, 2, 4, …
      doubling, capped at and including max_clips × spec.max_windows).
    max_clips: most clips one example may hold.
    group_by_length: batch examples of the same length bucket together
      (without packing).
    packing: pack several training examples into one row (train split only;
      eval splits keep one example per row): best fit into rows of the
      largest length bucket and the largest window bucket, over a pool of
      4 × batch_size open rows; a batch takes rows of similar window counts
      that fill its (L, K) buckets best, always with the oldest open row.
      Each example is a segment (`segment_ids`); positions restart and
      attention stays within it (see the batch contract).
    shuffle / seed / num_epochs: train order (reshuffled every epoch); None
      epochs repeats forever. Eval splits are read once, in order.
    workers: decoding processes (0: decode in this process); read_threads:
      threads measuring examples (grain reader threads) and decoding a
      batch's rows, in each process or worker; worker_buffer: examples each
      worker prepares ahead (rounded up to whole local batches).
    skip_bad: skip and count malformed examples instead of raising.
    max_skip_rate: stop with an error when skipped / seen exceeds this
      (checked after `skip_check_after` examples, and at the end of a split).
    max_clip_seconds: longer clips are cropped (random window in training,
      the start otherwise); None keeps up to spec.max_windows windows.
    min_clip_seconds: shorter clips are zero-padded (at a random offset in training).
    prompts: instruction per task for text-only pairs (`transcribe`, `caption`).
    tasks: keep only examples of these tasks (`transcribe`, `caption`, `mcq`,
      `chat`); empty keeps all.
    clip_rationale: multi-clip multiple-choice answers are learned as
      `<think>rationale</think>answer`: the line's `meta.rationale`, else its
      `meta.clip_labels` listed (`records.with_clip_rationale`); generation then
      needs room for the rationale.
    tfds_data_dir / audio_key / text_key: TFDS location and feature names
      (auto-detected when empty).
  """

  path: str = ""
  eval_path: str = ""
  tokenizer: str = ""
  template: str = "tiny"
  batch_size: int = 8
  length_buckets: tuple[int, ...] = (128, 256, 512)
  window_buckets: tuple[int, ...] = ()
  max_clips: int = 4
  group_by_length: bool = True
  packing: bool = True
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
  workers: int = 0
  read_threads: int = 2
  worker_buffer: int = 8
  skip_bad: bool = False
  max_skip_rate: float = 0.01
  skip_check_after: int = 100
  max_clip_seconds: float | None = None
  min_clip_seconds: float = 0.0
  prompts: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_PROMPTS))
  tasks: tuple[str, ...] = ()
  clip_rationale: bool = False
  tfds_data_dir: str = ""
  audio_key: str = ""
  text_key: str = ""

  def __post_init__(self):
    require(self.template in TEMPLATES, "data.template", f"unknown chat template {self.template!r} "
            f"(known: {', '.join(TEMPLATES)})")
    require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
    require(len(self.length_buckets) >= 1 and all(b > 0 for b in self.length_buckets), "data.length_buckets",
            "needs at least one positive length")
    require(list(self.length_buckets) == sorted(set(self.length_buckets)), "data.length_buckets",
            "must be strictly increasing")
    require(list(self.window_buckets) == sorted(set(self.window_buckets)) and all(w > 0 for w in self.window_buckets),
            "data.window_buckets", "must be positive and strictly increasing")
    require(self.max_clips >= 1, "data.max_clips", "must be >= 1")
    require(self.workers >= 0, "data.workers", "must be >= 0")
    require(self.read_threads >= 1, "data.read_threads", "must be >= 1")
    require(self.worker_buffer >= 1, "data.worker_buffer", "must be >= 1")
    require(0.0 <= self.max_skip_rate <= 1.0, "data.max_skip_rate", "must be in [0, 1]")
    require(self.skip_check_after >= 1, "data.skip_check_after", "must be >= 1")
    require(self.num_epochs is None or self.num_epochs >= 1, "data.num_epochs", "must be >= 1 or None")
    require(self.max_clip_seconds is None or self.max_clip_seconds > 0, "data.max_clip_seconds", "must be positive")
    require(self.min_clip_seconds >= 0, "data.min_clip_seconds", "must be >= 0")
    require(0 <= self.seed < 2**32, "data.seed", "must be in [0, 2**32)")
    for key, value in self.prompts.items():
      require(isinstance(value, str) and value.strip() != "", f"data.prompts.{key}", "must be a non-empty string")

  @classmethod
  def from_config(cls, values: Any, prefix: str = "config.data") -> "DataConfig":
    """Validated `DataConfig` from a dict/ConfigDict (unknown keys and wrong types raise `ConfigError`)."""
    cfg = from_dict(cls, values, prefix)
    return dataclasses.replace(cfg, prompts={**DEFAULT_PROMPTS, **cfg.prompts})

  def window_sizes(self, spec: AudioTokenSpec) -> tuple[int, ...]:
    """Window buckets K (audio windows per row): `window_buckets`, or 1, 2, 4, … up to the most one row can hold."""
    if self.window_buckets:
      return tuple(self.window_buckets)
    top = self.max_clips * spec.max_windows
    sizes, k = [], 1
    while k < top:
      sizes.append(k)
      k *= 2
    return tuple(sizes + [top])


def tokenizer_file(cfg: DataConfig) -> str:
  """`data.tokenizer`, or the tokenizer.json beside the data (what `alm-jax data synth` writes)."""
  if cfg.tokenizer:
    return cfg.tokenizer
  folder = cfg.path if os.path.isdir(cfg.path) else os.path.dirname(cfg.path)
  file = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(file):
    raise ConfigError("config.data.tokenizer", f"not set and {file} does not exist")
  return file


def batch_shapes(cfg: DataConfig, spec: AudioTokenSpec, process_count: int = 1) -> list[dict[str, tuple]]:
  """Every batch shape the pipeline can emit (for ahead-of-time compilation), smallest first."""
  b = cfg.batch_size // process_count
  out = []
  for length in cfg.length_buckets:
    for k in cfg.window_sizes(spec):
      out.append({"tokens": (b, length), "token_mask": (b, length), "loss_mask": (b, length),
                  "segment_ids": (b, length),
                  "audio": (b, k, spec.window_samples), "audio_samples": (b, k), "audio_clip": (b, k),
                  "example_id": (b,)})
  return out


# --- batching -------------------------------------------------------------------------------


def collate(examples: Sequence[dict | Sequence[dict] | None], batch: int, length: int, windows_per_row: int,
            spec: AudioTokenSpec, pad_id: int) -> dict[str, np.ndarray]:
  """Lays prepared examples into one fixed-shape batch of `batch` rows (see the module docstring).

  Each example dict holds `tokens`, `loss_mask`, `id`, and its windows back to
  back in `pcm` with `window_samples` / `window_clip` (clip rank in placeholder
  order) per window; row r's windows land in slots 0..n_r-1 of `audio[r]`. An
  element is one example, a sequence of examples packed into one row (segments
  1, 2, … back to back, clip ranks continuing across them), or `None`: a
  padding row, as is every row past the last element.
  """
  size = spec.window_samples
  out = {
      "tokens": np.full((batch, length), pad_id, np.int32),
      "token_mask": np.zeros((batch, length), bool),
      "loss_mask": np.zeros((batch, length), np.float32),
      "segment_ids": np.zeros((batch, length), np.int32),
      "audio": np.zeros((batch, windows_per_row, size), np.float32),
      "audio_samples": np.zeros((batch, windows_per_row), np.int32),
      "audio_clip": np.full((batch, windows_per_row), -1, np.int32),
      "example_id": np.full((batch,), -1, np.int64),
  }
  if len(examples) > batch:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch} rows")
  for row, element in enumerate(examples):
    segments = [] if element is None else [element] if isinstance(element, dict) else list(element)
    n = sum(ex["tokens"].size for ex in segments)
    if n > length:
      raise ValueError(f"example {segments[0]['id']} ({len(segments)} in its row) has {n} tokens in its row, more "
                       f"than the batch length {length}")
    k = sum(ex["window_samples"].size for ex in segments)
    if k > windows_per_row:
      raise ValueError(f"example {segments[0]['id']} ({len(segments)} in its row) has {k} audio windows in its row, "
                       f"more than the {windows_per_row} slots of a row")
    at = slot = clips = 0
    for segment, ex in enumerate(segments, start=1):
      end = at + ex["tokens"].size
      out["tokens"][row, at:end] = ex["tokens"]
      out["token_mask"][row, at:end] = True
      out["loss_mask"][row, at:end] = ex["loss_mask"]
      out["segment_ids"][row, at:end] = segment
      at = end
      start = 0
      for n_samples, clip in zip(ex["window_samples"].tolist(), ex["window_clip"].tolist()):
        out["audio"][row, slot, :n_samples] = ex["pcm"][start : start + n_samples]
        out["audio_samples"][row, slot] = n_samples
        out["audio_clip"][row, slot] = clips + clip
        start += n_samples
        slot += 1
      clips += int(ex["window_clip"].max()) + 1 if ex["window_clip"].size else 0
    if segments:
      out["example_id"][row] = segments[0]["id"]
  return out


def pad_batch(batch: dict[str, np.ndarray], *, length: int, windows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a batch to a larger (L, K) with padding tokens and padding window slots (rows are kept)."""
  b, l0 = batch["tokens"].shape
  k0 = batch["audio"].shape[1]
  if length < l0 or windows < k0:
    raise ValueError(f"cannot shrink a batch of L={l0}, K={k0} to L={length}, K={windows}")
  out = dict(batch)
  fills = {"tokens": pad_id, "token_mask": False, "loss_mask": 0.0, "segment_ids": 0}
  for key, fill in fills.items():
    if key not in batch:  # a batch built before segment ids existed
      continue
    out[key] = np.concatenate([batch[key], np.full((b, length - l0), fill, batch[key].dtype)], axis=1)
  size = batch["audio"].shape[2]
  out["audio"] = np.concatenate([batch["audio"], np.zeros((b, windows - k0, size), np.float32)], axis=1)
  out["audio_samples"] = np.concatenate([batch["audio_samples"], np.zeros((b, windows - k0), np.int32)], axis=1)
  out["audio_clip"] = np.concatenate([batch["audio_clip"], np.full((b, windows - k0), -1, np.int32)], axis=1)
  return out


@dataclasses.dataclass
class SkipStats:
  """Examples seen, skipped as bad and filtered out by `data.tasks` (the same on every process), plus
  `decode_failed`: rows this process left as padding because a clip failed to decode (`skip_bad` only)."""

  seen: int = 0
  skipped: int = 0
  filtered: int = 0
  reasons: list = dataclasses.field(default_factory=list)
  decode_failed: int = 0

  @property
  def rate(self) -> float:
    return self.skipped / self.seen if self.seen else 0.0


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One global batch of the plan: the measured examples of global rows 0..n-1 (n <= B; one example per
  row, or several when packing), and its (L, K)."""

  index: int
  rows: tuple[tuple[dict, ...], ...]
  length: int
  windows: int


class BatchPlanner:
  """The global batch sequence: measures the global order, buckets examples by (L, K) — or packs them into
  rows — and emits B-row batches.

  A function of the global order and the config alone, so every process (and
  every decoding worker) plans the same batches. Checkpointable: the state
  holds the next position to measure, the positions waiting in buckets or in
  open packed rows (re-measured on restore), the skip counts and the number of
  batches planned.
  """

  FIRST_REASONS = 5
  POOL_BATCHES = 4  # packing: open rows kept, in batches; a larger pool fills rows better but delays examples

  def __init__(self, measured: grain.MapDataset, cfg: DataConfig, spec: AudioTokenSpec,
               read_options: grain.ReadOptions, name: str, pack: bool = False):
    self._measured, self._cfg, self._read_options, self._name = measured, cfg, read_options, name
    self._size = cfg.batch_size
    self._lengths = tuple(cfg.length_buckets)
    self._windows = cfg.window_sizes(spec)
    self._pending: dict[tuple[int, int], list[dict]] = {}
    self._pack = pack
    self._open: list[list[dict]] = []  # packing: rows being filled, in the order they were opened
    self._sizes: list[tuple[int, int]] = []  # packing: each open row's (tokens, windows), kept beside it
    self._stats = SkipStats()
    self._next = 0  # global position of the next example to measure
    self._batches = 0  # batches planned so far
    self._exhausted = False
    self._stream = None  # measured[self._next:], iterated with grain's reader threads; made on first use

  @property
  def stats(self) -> SkipStats:
    return self._stats

  def _bucket(self, n: int, sizes: tuple[int, ...]) -> int:
    for size in sizes:
      if n <= size:
        return size
    raise AssertionError(n)

  def _key(self, ex: dict) -> tuple[int, int]:
    """The bucket an example waits in: its (L, K) when grouping by length, else one shared bucket."""
    if not self._cfg.group_by_length:
      return (self._lengths[-1], self._windows[-1])
    return (self._bucket(ex["tokens"].size, self._lengths), self._bucket(ex["windows"], self._windows))

  def _check_rate(self, final: bool = False) -> None:
    s, cfg = self._stats, self._cfg
    if s.skipped and (final or s.seen >= cfg.skip_check_after) and s.rate > cfg.max_skip_rate:
      raise DataError(
          f"{self._name}: skipped {s.skipped} of {s.seen} examples ({100 * s.rate:.1f}%), above "
          f"data.max_skip_rate={cfg.max_skip_rate}; first reasons: " + " | ".join(s.reasons))

  def _admit(self, ex: dict) -> dict | None:
    """Counts one measured example; returns it if it is usable."""
    if ex["status"] == "filtered":
      self._stats.filtered += 1
      return None
    self._stats.seen += 1
    if ex["status"] == "ok":
      return ex
    if not self._cfg.skip_bad:
      raise (AudioError if ex.get("error") == "AudioError" else DataError)(ex["reason"])
    self._stats.skipped += 1
    if len(self._stats.reasons) < self.FIRST_REASONS:
      self._stats.reasons.append(ex["reason"])
    self._check_rate()
    return None

  def _batch(self, rows: list[list[dict]]) -> PlannedBatch:
    length = self._bucket(max(sum(e["tokens"].size for e in row) for row in rows), self._lengths)
    windows = self._bucket(max(sum(e["windows"] for e in row) for row in rows), self._windows)
    self._batches += 1
    return PlannedBatch(self._batches - 1, tuple(tuple(row) for row in rows), length, windows)

  def _emit(self, key: tuple[int, int]) -> PlannedBatch:
    return self._batch([[e] for e in self._pending.pop(key)])  # L == key[0] when grouping

  def _set_open(self, rows: list[list[dict]]) -> None:
    self._open = rows
    self._sizes = [(sum(e["tokens"].size for e in row), sum(e["windows"] for e in row)) for row in rows]

  def _emit_packed(self) -> PlannedBatch:
    """Packing: B open rows as a batch, chosen so that few of its token and window slots are padding.

    The encoders run on every window slot of the batch (B × K) and the decoder on every
    token slot (B × L), so rows of similar window counts go together: among the runs of
    B rows in window-count order that hold the oldest open row (so no row waits for
    ever), the one whose (L, K) buckets it fills best. Rows keep their opening order.
    """
    if len(self._open) <= self._size:
      taken = list(range(len(self._open)))
    else:
      order = sorted(range(len(self._open)), key=lambda i: (self._sizes[i][1], i))
      at = order.index(0)
      best, taken = -1.0, []
      for first in range(max(0, at - self._size + 1), min(at, len(order) - self._size) + 1):
        run = order[first : first + self._size]
        sizes = [self._sizes[i] for i in run]
        length = self._bucket(max(t for t, _ in sizes), self._lengths)
        windows = self._bucket(max(w for _, w in sizes), self._windows)
        fill = sum(t for t, _ in sizes) / (self._size * length) + sum(w for _, w in sizes) / (self._size * windows)
        if fill > best:
          best, taken = fill, sorted(run)
    rows = [self._open[i] for i in taken]
    taken = set(taken)
    self._open, self._sizes = ([x for i, x in enumerate(kept) if i not in taken] for kept in (self._open, self._sizes))
    return self._batch(rows)

  def _place(self, ex: dict) -> PlannedBatch | None:
    """Packing: puts `ex` into the open row it fills best (least token room left; both its tokens and its
    windows must fit), else into a new row; when the pool of open rows is full, a batch leaves first."""
    tokens, windows = ex["tokens"].size, ex["windows"]
    best, room = None, None
    for i, (used_tokens, used_windows) in enumerate(self._sizes):
      left = self._lengths[-1] - used_tokens - tokens
      if left >= 0 and used_windows + windows <= self._windows[-1] and (room is None or left < room):
        best, room = i, left
    if best is not None:
      self._open[best].append(ex)
      self._sizes[best] = (self._sizes[best][0] + tokens, self._sizes[best][1] + windows)
      return None
    batch = self._emit_packed() if len(self._open) >= self.POOL_BATCHES * self._size else None
    self._open.append([ex])
    self._sizes.append((tokens, windows))
    return batch

  def next(self) -> PlannedBatch:
    """The next global batch; raises StopIteration after a finite order's last (flushed) batch."""
    while True:
      if self._exhausted:
        if self._pending:
          return self._emit(min(self._pending))  # partial buckets, in bucket order
        if self._open:
          return self._emit_packed()
        raise StopIteration
      if self._stream is None:
        self._stream = iter(self._measured[self._next :].to_iter_dataset(self._read_options))
      try:
        ex = next(self._stream)
      except StopIteration:
        self._exhausted = True
        self._check_rate(final=True)
        continue
      assert ex["pos"] == self._next, (ex["pos"], self._next)
      self._next += 1
      ex = self._admit(ex)
      if ex is None:
        continue
      if self._pack:
        batch = self._place(ex)
        if batch is not None:
          return batch
        continue
      key = self._key(ex)
      self._pending.setdefault(key, []).append(ex)
      if len(self._pending[key]) >= self._size:
        return self._emit(key)

  def get_state(self) -> dict[str, Any]:
    s = self._stats
    return {
        "next": self._next, "batches": self._batches, "exhausted": self._exhausted,
        "pending": {f"{l},{k}": [int(e["pos"]) for e in group] for (l, k), group in sorted(self._pending.items())},
        "open_rows": [[int(e["pos"]) for e in row] for row in self._open] if self._pack else None,
        "seen": s.seen, "skipped": s.skipped, "filtered": s.filtered, "reasons": list(s.reasons),
    }

  def _remeasured(self, pos: int) -> dict:
    ex = self._measured[int(pos)]  # measured again here, identical by construction
    if ex["status"] != "ok":
      raise DataError(f"{self._name}: example at position {pos} of the saved state no longer prepares "
                      f"({ex.get('reason', ex['status'])})")
    return ex

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    if (state.get("open_rows") is not None) != self._pack:
      raise DataError(f"{self._name}: the saved data-iterator state was written with data.packing="
                      f"{not self._pack}; resume with the same data.packing")
    self._set_open([[self._remeasured(pos) for pos in row] for row in state.get("open_rows") or []])
    pending: dict[tuple[int, int], list[dict]] = {}
    for key, positions in state["pending"].items():
      l, _, k = key.partition(",")
      if int(l) not in self._lengths or int(k) not in self._windows:
        raise DataError(f"{self._name}: saved iterator state uses bucket (L, K) = ({key}), not in "
                        "data.length_buckets × data.window_buckets")
      for pos in positions:
        pending.setdefault((int(l), int(k)), []).append(self._remeasured(pos))
    self._pending = pending
    self._next, self._batches = int(state["next"]), int(state["batches"])
    self._exhausted = bool(state["exhausted"])
    self._stats = SkipStats(state["seen"], state["skipped"], state["filtered"], list(state["reasons"]))

  def close(self) -> None:
    """Stops the reader threads of the measuring stream."""
    if self._stream is not None and hasattr(self._stream, "close"):
      self._stream.close()
    self._stream = None


class LoadBatchesDataset(grain.IterDataset):
  """Plans the global batches and loads this process's rows of them: one element per local batch.

  Under `mp_prefetch` grain hands each decoding worker w of n the slice
  (w, n) through `set_slice`: the worker plans every batch (the plan needs the
  whole order) but decodes and collates only batches b with b % n == w, and
  grain interleaves the workers' elements back in batch order. Elements are
  `{"rows", "length", "windows", "stats", "failed"}` — the loaded examples
  (None for padding rows), compact (real samples only, through shared memory
  between processes), collated into the padded batch by the consumer — then
  one `{"end", "stats"}` after a finite order.
  """

  def __init__(self, examples: grain.MapDataset, measured: grain.MapDataset, prepare: Prepare, cfg: DataConfig,
               spec: AudioTokenSpec, rows: tuple[int, ...], read_options: grain.ReadOptions, name: str,
               pack: bool = False):
    super().__init__()
    self.examples, self.measured, self.prepare, self.cfg, self.spec = examples, measured, prepare, cfg, spec
    self.rows, self.read_options, self.name, self.pack = rows, read_options, name, pack
    self.first, self.step = 0, 1  # this worker's batches: first, first + step, ...

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps the batches of one decoding worker (grain's `mp_prefetch` calls this in each worker)."""
    if sequential_slice or sl.stop is not None:
      raise ValueError(f"{self}: only strided slices (worker w of n) are supported, got {sl}")
    self.first += self.step * (sl.start or 0)
    self.step *= sl.step or 1

  def __iter__(self) -> "LoadBatchesIterator":
    return LoadBatchesIterator(self)

  def __str__(self) -> str:
    return f"LoadBatchesDataset({self.name}, rows={list(self.rows)}, batches {self.first}::{self.step})"


class LoadBatchesIterator(grain.DatasetIterator):
  """Iterator of `LoadBatchesDataset`; its state is the planner's (JSON-serialisable)."""

  def __init__(self, ds: LoadBatchesDataset):
    super().__init__()
    self._ds = ds
    self._planner = BatchPlanner(ds.measured, ds.cfg, ds.spec, ds.read_options, ds.name, pack=ds.pack)
    self._pool = None
    self._ended = False

  def _counts(self) -> dict[str, Any]:
    s = self._planner.stats
    return {"seen": s.seen, "skipped": s.skipped, "filtered": s.filtered, "reasons": list(s.reasons)}

  def _load_one(self, meta: dict) -> tuple[dict | None, str | None]:
    """One row decoded, or (None, reason) when a clip fails to decode and `skip_bad` is on."""
    try:
      return self._ds.prepare.load(meta, self._ds.examples[meta["pos"]]), None
    except AudioError as e:
      if not self._ds.cfg.skip_bad:
        raise
      return None, str(e)

  def _load(self, plan: PlannedBatch) -> tuple[list[list[dict] | None], list[str]]:
    """This process's rows of `plan`, in `rows` order; rows past the batch's rows are padding. An example
    whose audio fails to decode (`skip_bad`) leaves its row; a row left empty is padding."""
    metas = [plan.rows[r] if r < len(plan.rows) else () for r in self._ds.rows]
    todo = [m for row in metas for m in row]
    threads = min(self._ds.cfg.read_threads, len(todo))
    if threads > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._ds.cfg.read_threads, thread_name_prefix="alm-decode")
      loaded = iter(list(self._pool.map(self._load_one, todo)))
    else:
      loaded = iter([self._load_one(m) for m in todo])
    rows, failed = [], []
    for row in metas:
      kept = []
      for _ in row:
        example, reason = next(loaded)
        if reason is None:
          kept.append(example)
        else:
          failed.append(reason)
      rows.append(kept or None)
    return rows, failed

  def __next__(self) -> dict[str, Any]:
    if self._ended:
      raise StopIteration
    ds = self._ds
    while True:
      try:
        plan = self._planner.next()
      except StopIteration:
        self._ended = True
        return {"end": True, "stats": self._counts()}
      if plan.index >= ds.first and (plan.index - ds.first) % ds.step == 0:
        break
    rows, failed = self._load(plan)
    return {"rows": rows, "length": plan.length, "windows": plan.windows, "stats": self._counts(), "failed": failed}

  def get_state(self) -> dict[str, Any]:
    return {"planner": self._planner.get_state(), "ended": self._ended}

  def set_state(self, state: dict[str, Any]) -> None:
    self._planner.set_state(state["planner"])
    self._ended = bool(state["ended"])

  def close(self) -> None:
    self._planner.close()
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
    super().close()

  def __str__(self) -> str:
    return f"LoadBatchesIterator({self._ds})"


class BatchIterator(grain.DatasetIterator):
  """This process's batches, in the global batch order; checkpointable, with `.stats`.

  Skips are counted by the planner (the same on every process); only the
  process that `log_skips` (process 0) logs them.
  """

  def __init__(self, parent: grain.DatasetIterator, name: str, spec: AudioTokenSpec, pad_id: int,
               log_skips: bool):
    super().__init__(parent)
    self._name, self._spec, self._pad_id, self._log_skips = name, spec, pad_id, log_skips
    self._skips = SkipStats()
    self._exhausted = False

  @property
  def stats(self) -> SkipStats:
    """Seen / skipped / filtered counts and the first few skip reasons (see `SkipStats`)."""
    return self._skips

  def _count(self, counts: dict[str, Any], end: bool) -> None:
    """Takes the planner's counts; logs the skips new since the last batch."""
    old = self._skips
    new = SkipStats(**counts, decode_failed=old.decode_failed)
    self._skips = new
    if not self._log_skips or new.skipped == old.skipped and not end:
      return
    for k, reason in enumerate(new.reasons[len(old.reasons) :], start=len(old.reasons) + 1):
      log.warning("skipping bad example (%d so far): %s", k, reason)
    if new.skipped > len(new.reasons) and (new.skipped // 100 > old.skipped // 100):
      log.warning("%s: %d bad examples skipped of %d seen", self._name, new.skipped, new.seen)
    if end and new.skipped:
      log.warning("%s: %d bad examples skipped of %d seen; first reasons: %s", self._name, new.skipped, new.seen,
                  " | ".join(new.reasons))

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    element = next(self._parent)
    self._count(element["stats"], bool(element.get("end")))
    if element.get("end"):
      self._exhausted = True
      raise StopIteration
    for reason in element["failed"]:
      self._skips.decode_failed += 1
      log.warning("%s: a clip failed to decode; its row is padding (%d so far): %s", self._name,
                  self._skips.decode_failed, reason)
    rows = element["rows"]
    return collate(rows, len(rows), element["length"], element["windows"], self._spec, self._pad_id)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "exhausted": self._exhausted,
            "stats": dataclasses.asdict(self._skips)}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or not {"parent", "exhausted", "stats"} <= set(state):
      raise DataError(f"{self._name}: the saved data-iterator state is not one this pipeline wrote (keys: "
                      f"{sorted(state) if isinstance(state, dict) else type(state).__name__})")
    self._parent.set_state(state["parent"])
    self._exhausted = bool(state["exhausted"])
    self._skips = SkipStats(**state["stats"])

  def __str__(self) -> str:
    return f"BatchIterator({self._name})"


class AudioBatchDataset(grain.IterDataset):
  """The pipeline as a grain `IterDataset`: `iter()` gives a checkpointable `BatchIterator`."""

  def __init__(self, parent: grain.IterDataset, name: str, spec: AudioTokenSpec, pad_id: int, num_examples: int,
               rows: tuple[int, ...], log_skips: bool):
    super().__init__(parent)
    self._name, self._spec, self._pad_id, self._log_skips = name, spec, pad_id, log_skips
    self.num_examples = num_examples  # examples in one epoch of the split (all processes together)
    self.rows = rows  # the global batch rows this process loads, in order

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), self._name, self._spec, self._pad_id, self._log_skips)

  def __str__(self) -> str:
    return f"AudioBatchDataset({self._name}, rows={list(self.rows)})"


def _mark_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app nothing parsed them, so take defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def local_rows(batch_size: int, rows: Sequence[int] | None, process_index: int,
               process_count: int) -> tuple[int, ...]:
  """The global batch rows a process loads: `rows` checked, or by default its contiguous block of B / n rows."""
  if rows is None:
    if batch_size % process_count:
      raise ConfigError("config.data.batch_size", f"{batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    return tuple(range(process_index * per, (process_index + 1) * per))
  rows = tuple(int(r) for r in rows)
  if not rows or len(set(rows)) != len(rows) or not all(0 <= r < batch_size for r in rows):
    raise ValueError(f"rows must be distinct global batch rows in [0, {batch_size}) (data.batch_size), got "
                     f"{list(rows)}")
  return rows


def make_dataset(
    cfg: DataConfig | Any,
    spec: AudioTokenSpec,
    tokenizer: Tokenizer,
    *,
    split: str = "train",
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: Sequence[int] | None = None,
) -> AudioBatchDataset:
  """Builds the input pipeline for one split of `cfg.path` (`eval_path` for non-train splits).

  `split="train"` shuffles (reshuffled per epoch), repeats `num_epochs` times
  (forever by default) and randomly crops/pads; any other split is read once,
  in order, deterministically. Every process plans the same global batches of
  `data.batch_size` rows and loads `rows` of each (global row indices, in the
  order its local batch holds them, e.g. from
  `alm_jax.distributed.process_rows`; default: process i of n loads the
  contiguous block i·B/n … (i+1)·B/n - 1), so its batches have `len(rows)`
  rows and the same (L, K) on every process. `iter(dataset)` gives a grain
  iterator with `get_state` / `set_state` and `.stats`.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_config(cfg)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  rows = local_rows(cfg.batch_size, rows, process_index, process_count)
  seed = cfg.seed if seed is None else seed
  train = split == "train"
  path = cfg.eval_path if (not train and cfg.eval_path) else cfg.path
  if not path:
    raise ConfigError("config.data.path", "no data path given")
  source = open_source(path, split, tfds_data_dir=cfg.tfds_data_dir, audio_key=cfg.audio_key, text_key=cfg.text_key)
  if len(source) == 0:
    raise DataError(f"{path}: the {split} split holds no example")
  examples = grain.MapDataset.source(source)
  if train:
    if cfg.shuffle:
      examples = examples.shuffle(seed=seed)
    examples = examples.repeat(cfg.num_epochs)
  prepare = Prepare(cfg, spec, tokenizer, train=train, seed=seed)
  measured = examples.map_with_index(prepare.measure)
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(cfg.batch_size,
                                                                                  2 * cfg.read_threads))
  name = f"{path} [{split}]"
  it = LoadBatchesDataset(examples, measured, prepare, cfg, spec, rows, read, name, pack=train and cfg.packing)
  if cfg.workers > 0:
    # Small arrays (tokens) are pickled; audio travels through shared memory.
    it = grain.experimental.WithOptionsIterDataset(it, grain.experimental.DatasetOptions(min_shm_size=1 << 15))
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.workers, per_worker_buffer_size=max(1, -(-cfg.worker_buffer // len(rows)))))
  return AudioBatchDataset(it, name, spec, tokenizer.pad_id, len(source), rows, log_skips=process_index == 0)
