"""Grain input pipeline: examples → fixed-shape, length-bucketed batches with per-row audio slots.

    source (manifest / ArrayRecord / TFDS) ─▶ grain.MapDataset
      ─▶ shuffle (train, per-epoch reshuffle) ─▶ repeat ─▶ this process's slice [i::n]
      ─▶ prepare (workers): parse, decode + resample, crop/pad, placeholder counts,
         chat template + tokenise, loss mask
      ─▶ mp_prefetch (data.workers processes)
      ─▶ bucket + batch (main process): count/skip bad examples, pad to fixed shapes

Batch contract — one batch is a dict of numpy arrays; B is the per-process batch
(`data.batch_size / process_count`), L a length bucket (`data.length_buckets`),
K a window bucket (`data.window_buckets`: audio windows per row) and
S = `spec.window_samples`:

  tokens        int32   [B, L]     ids right-padded with the pad id. Clip k of an example
                                   is a span of n_k placeholder ids (n_k =
                                   `num_audio_tokens(samples_k, spec)`), inside the
                                   family's audio begin/end markers if it has them.
  token_mask    bool    [B, L]     True on real tokens.
  loss_mask     float32 [B, L]     1.0 on tokens to predict (assistant answers and their
                                   end-of-turn token), 0 on prompt, audio and padding.
  audio         float32 [B, K, S]  16 kHz PCM windows of row b in slots 0..n_b-1: its
                                   clips in the order their placeholder spans appear in
                                   `tokens`, each clip cut into `num_windows(samples,
                                   spec)` windows in time order (beyond
                                   `spec.max_windows` truncated), zero-padded; slots
                                   past n_b are zero.
  audio_samples int32   [B, K]     real samples in each slot (0 for padding slots).
  audio_clip    int32   [B, K]     the slot's clip index within its row (0, 1, … in
                                   placeholder order); -1 for padding slots (a padding
                                   row is all -1).
  example_id    int64   [B]        source index of each example; -1 for padding rows.

Every batch has exactly B rows (missing rows are padding: token_mask False,
loss_mask 0, example_id -1) and one of a few (L, K) shapes, so the train step
compiles a handful of programs. K is the smallest window bucket holding the
most windows any row of the batch needs; an example needing more windows than
the largest bucket is a bad example. With `data.group_by_length` examples are
grouped by (length bucket, window bucket), so rows with many windows batch
together and single-clip rows are not padded to many slots; a batch is emitted
when its bucket holds B examples, and a finite split flushes partial buckets at
the end in bucket order.

Each process picks its buckets on its own: with several processes, call
`agree_batch_shape` (or `pad_batch`) before building global arrays.

Iterator state (`get_state` / `set_state`, JSON-serialisable, saved by Orbax
with the train state) holds grain's position plus the source positions of the
examples waiting in buckets, so a restored iterator yields exactly the batches
an uninterrupted one would — with or without worker processes (restore with the
same `data.workers`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from alm_jax.config import ConfigError, from_dict, require
from alm_jax.data.records import DEFAULT_PROMPTS, Clip
from alm_jax.data.sources import RawExample, open_source, to_record
from alm_jax.data.templates import TEMPLATES
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import AudioError, DataError
from alm_jax.models.audio_slots import AudioTokenSpec, num_audio_tokens, num_windows

log = logging.getLogger("alm_jax.data")

BATCH_KEYS = ("tokens", "token_mask", "loss_mask", "audio", "audio_samples", "audio_clip", "example_id")


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
    group_by_length: batch examples of the same length bucket together.
    shuffle / seed / num_epochs: train order (reshuffled every epoch); None
      epochs repeats forever. Eval splits are read once, in order.
    workers: decoding processes (0: decode in this process); read_threads:
      grain reader threads per process; worker_buffer: examples each worker
      prepares ahead.
    skip_bad: skip and count malformed examples instead of raising.
    max_skip_rate: stop with an error when skipped / seen exceeds this
      (checked after `skip_check_after` examples, and at the end of a split).
    max_clip_seconds: longer clips are cropped (random window in training,
      the start otherwise); None keeps up to spec.max_windows windows.
    min_clip_seconds: shorter clips are zero-padded (at a random offset in training).
    prompts: instruction per task for text-only pairs (`transcribe`, `caption`).
    tasks: keep only examples of these tasks (`transcribe`, `caption`, `mcq`,
      `chat`); empty keeps all.
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
                  "audio": (b, k, spec.window_samples), "audio_samples": (b, k), "audio_clip": (b, k),
                  "example_id": (b,)})
  return out


# --- per-example preparation (runs in grain workers) ------------------------------------------


def load_clip(clip: Clip, sample_rate: int) -> np.ndarray:
  """A clip's float32 mono PCM at `sample_rate` (file, encoded bytes or decoded PCM)."""
  from alm_jax.audio import io as audio_io  # pylint: disable=import-outside-toplevel

  if clip.pcm is not None:
    pcm = audio_io.to_float32(np.asarray(clip.pcm), name=clip.name)
    if pcm.ndim == 2:
      pcm = pcm.mean(axis=1, dtype=np.float32)
    if pcm.size == 0:
      raise AudioError(f"{clip.name}: audio is empty (0 samples)")
    if clip.sample_rate != sample_rate:
      import soxr  # pylint: disable=import-outside-toplevel

      pcm = soxr.resample(pcm, clip.sample_rate, sample_rate, quality="HQ").astype(np.float32)
    return pcm
  if clip.data is not None:
    return audio_io.decode_audio_bytes(clip.data, name=clip.name, sample_rate=sample_rate, start=clip.start,
                                       end=clip.end)
  return audio_io.load_audio(clip.path, sample_rate=sample_rate, start=clip.start, end=clip.end)


class Prepare:
  """Turns (position, RawExample) into a ready example dict, or a `bad` / `filtered` marker.

  Never raises for bad input: `DataError` / `AudioError` become
  `{"status": "bad", "reason"}` so the main process counts them in order.
  Randomness (crop/pad offsets) comes from (seed, position) only.
  """

  def __init__(self, cfg: DataConfig, spec: AudioTokenSpec, tokenizer: Tokenizer, *, train: bool, seed: int):
    self.cfg, self.spec, self.tokenizer, self.train, self.seed = cfg, spec, tokenizer, train, seed
    self.max_length = max(cfg.length_buckets)

  def __call__(self, position: int, raw: RawExample) -> dict:
    try:
      return self._prepare(position, raw)
    except (DataError, AudioError) as e:
      return {"status": "bad", "pos": int(position), "id": int(raw.index), "reason": str(e),
              "error": type(e).__name__}

  def _crop(self, pcm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sr, spec, cfg = self.spec.sample_rate, self.spec, self.cfg
    limit = spec.max_windows * spec.window_samples
    if cfg.max_clip_seconds is not None:
      limit = min(limit, int(round(cfg.max_clip_seconds * sr)))
    if pcm.size > limit:
      start = int(rng.integers(0, pcm.size - limit + 1)) if self.train and cfg.max_clip_seconds is not None else 0
      pcm = pcm[start : start + limit]
    least = int(round(cfg.min_clip_seconds * sr))
    if pcm.size < least:
      offset = int(rng.integers(0, least - pcm.size + 1)) if self.train else 0
      pcm = np.pad(pcm, (offset, least - pcm.size - offset))
    return pcm

  def _prepare(self, position: int, raw: RawExample) -> dict:
    record = to_record(raw, self.cfg.prompts)
    base = {"pos": int(position), "id": int(raw.index)}
    if self.cfg.tasks and record.task not in self.cfg.tasks:
      return {"status": "filtered", **base}
    if len(record.clips) > self.cfg.max_clips:
      raise DataError(f"{record.origin}: {len(record.clips)} clips, more than data.max_clips={self.cfg.max_clips}")
    rng = np.random.default_rng([self.seed, int(position)])
    pcms, counts = [], []
    for clip in record.clips:
      try:
        pcm = self._crop(load_clip(clip, self.spec.sample_rate), rng)
      except AudioError as e:
        raise AudioError(f"{e} [{record.origin}]") from None
      try:
        counts.append(num_audio_tokens(pcm.size, self.spec))
      except ValueError:
        raise AudioError(f"{clip.name}: clip of {pcm.size} samples is too short to give an audio token "
                         f"[{record.origin}]") from None
      pcms.append(pcm)
    try:
      segments = self.tokenizer.render(record.messages, counts)
    except DataError as e:
      raise DataError(f"{record.origin}: {e}") from None
    tokens, loss_mask, _ = self.tokenizer.encode_segments(segments)
    if tokens.size > self.max_length:
      raise DataError(f"{record.origin}: {tokens.size} tokens, longer than the largest length bucket "
                      f"{self.max_length} (data.length_buckets)")
    if self.train and not loss_mask.any():
      raise DataError(f"{record.origin}: no assistant answer to learn from")
    order = [s.clip for s in segments if s.kind == "audio"]  # clips in placeholder order
    pieces, window_samples, window_clip = [], [], []
    size = self.spec.window_samples
    for rank, k in enumerate(order):
      pcm = pcms[k]
      for w in range(num_windows(pcm.size, self.spec)):
        piece = pcm[w * size : (w + 1) * size]
        pieces.append(piece)
        window_samples.append(piece.size)
        window_clip.append(rank)
    # One PCM array per example (windows back to back): one shared-memory block between processes.
    return {"status": "ok", **base, "tokens": tokens, "loss_mask": loss_mask,
            "pcm": np.concatenate(pieces).astype(np.float32, copy=False),
            "window_samples": np.asarray(window_samples, np.int32), "window_clip": np.asarray(window_clip, np.int32),
            "clips": len(order)}


# --- batching (main process) ------------------------------------------------------------------


def collate(examples: Sequence[dict], batch: int, length: int, windows_per_row: int, spec: AudioTokenSpec,
            pad_id: int) -> dict[str, np.ndarray]:
  """Packs prepared examples into one fixed-shape batch of `batch` rows (see the module docstring).

  Each example dict holds `tokens`, `loss_mask`, `id`, and its windows back to
  back in `pcm` with `window_samples` / `window_clip` (clip rank in placeholder
  order) per window; row r's windows land in slots 0..n_r-1 of `audio[r]`.
  """
  size = spec.window_samples
  out = {
      "tokens": np.full((batch, length), pad_id, np.int32),
      "token_mask": np.zeros((batch, length), bool),
      "loss_mask": np.zeros((batch, length), np.float32),
      "audio": np.zeros((batch, windows_per_row, size), np.float32),
      "audio_samples": np.zeros((batch, windows_per_row), np.int32),
      "audio_clip": np.full((batch, windows_per_row), -1, np.int32),
      "example_id": np.full((batch,), -1, np.int64),
  }
  if len(examples) > batch:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch} rows")
  for row, ex in enumerate(examples):
    n = ex["tokens"].size
    if n > length:
      raise ValueError(f"example {ex['id']} has {n} tokens, more than the batch length {length}")
    counts = ex["window_samples"]
    if counts.size > windows_per_row:
      raise ValueError(f"example {ex['id']} has {counts.size} audio windows, more than the {windows_per_row} slots "
                       "of a row")
    out["tokens"][row, :n] = ex["tokens"]
    out["token_mask"][row, :n] = True
    out["loss_mask"][row, :n] = ex["loss_mask"]
    out["example_id"][row] = ex["id"]
    start = 0
    for slot, (n_samples, clip) in enumerate(zip(counts.tolist(), ex["window_clip"].tolist())):
      out["audio"][row, slot, :n_samples] = ex["pcm"][start : start + n_samples]
      out["audio_samples"][row, slot] = n_samples
      out["audio_clip"][row, slot] = clip
      start += n_samples
  return out


def pad_batch(batch: dict[str, np.ndarray], *, length: int, windows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads a batch to a larger (L, K) with padding tokens and padding window slots (rows are kept)."""
  b, l0 = batch["tokens"].shape
  k0 = batch["audio"].shape[1]
  if length < l0 or windows < k0:
    raise ValueError(f"cannot shrink a batch of L={l0}, K={k0} to L={length}, K={windows}")
  out = dict(batch)
  fills = {"tokens": pad_id, "token_mask": False, "loss_mask": 0.0}
  for key, fill in fills.items():
    out[key] = np.concatenate([batch[key], np.full((b, length - l0), fill, batch[key].dtype)], axis=1)
  size = batch["audio"].shape[2]
  out["audio"] = np.concatenate([batch["audio"], np.zeros((b, windows - k0, size), np.float32)], axis=1)
  out["audio_samples"] = np.concatenate([batch["audio_samples"], np.zeros((b, windows - k0), np.int32)], axis=1)
  out["audio_clip"] = np.concatenate([batch["audio_clip"], np.full((b, windows - k0), -1, np.int32)], axis=1)
  return out


def agree_batch_shape(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """With several JAX processes, pads every process's batch to the largest (L, K) among them."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return batch
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  shape = np.asarray([batch["tokens"].shape[1], batch["audio"].shape[1]], np.int32)
  top = np.asarray(multihost_utils.process_allgather(shape)).reshape(-1, 2).max(axis=0)
  return pad_batch(batch, length=int(top[0]), windows=int(top[1]), pad_id=pad_id)


@dataclasses.dataclass
class SkipStats:
  """Counts of examples seen, skipped as bad, and filtered out by `data.tasks`."""

  seen: int = 0
  skipped: int = 0
  filtered: int = 0
  reasons: list = dataclasses.field(default_factory=list)

  @property
  def rate(self) -> float:
    return self.skipped / self.seen if self.seen else 0.0


class BucketBatchIterator(grain.DatasetIterator):
  """Groups prepared examples by (length, window) bucket and emits fixed-shape batches; checkpointable."""

  FIRST_REASONS = 5

  def __init__(self, parent: grain.DatasetIterator, lookup: grain.MapDataset, cfg: DataConfig,
               spec: AudioTokenSpec, pad_id: int, local_batch: int, name: str):
    super().__init__(parent)
    self._lookup, self._cfg, self._spec, self._pad_id = lookup, cfg, spec, pad_id
    self._batch, self._name = local_batch, name
    self._lengths = tuple(cfg.length_buckets)
    self._windows = cfg.window_sizes(spec)
    self._pending: dict[tuple[int, int], list[dict]] = {}
    self._stats = SkipStats()
    self._exhausted = False

  @property
  def stats(self) -> SkipStats:
    """Seen / skipped / filtered counts and the first few skip reasons."""
    return self._stats

  def _bucket(self, n: int) -> int:
    for l in self._lengths:
      if n <= l:
        return l
    raise AssertionError(n)

  def _window_bucket(self, n: int) -> int:
    for k in self._windows:
      if n <= k:
        return k
    raise AssertionError(n)

  def _key(self, ex: dict) -> tuple[int, int]:
    """The bucket an example waits in: its (L, K) when grouping by length, else one shared bucket."""
    if not self._cfg.group_by_length:
      return (self._lengths[-1], self._windows[-1])
    return (self._bucket(ex["tokens"].size), self._window_bucket(ex["window_samples"].size))

  def _check_rate(self, final: bool = False) -> None:
    s, cfg = self._stats, self._cfg
    if s.skipped and (final or s.seen >= cfg.skip_check_after) and s.rate > cfg.max_skip_rate:
      raise DataError(
          f"{self._name}: skipped {s.skipped} of {s.seen} examples ({100 * s.rate:.1f}%), above "
          f"data.max_skip_rate={cfg.max_skip_rate}; first reasons: " + " | ".join(s.reasons))

  def _admit(self, ex: dict) -> dict | None:
    """Counts one prepared element; returns it if it is a usable example."""
    if ex["status"] == "filtered":
      self._stats.filtered += 1
      return None
    self._stats.seen += 1
    if ex["status"] == "ok" and ex["window_samples"].size > self._windows[-1]:
      ex = {"status": "bad", "error": "DataError", "reason": (
          f"{self._name}: example {ex['id']} needs {ex['window_samples'].size} audio windows, more than the largest "
          f"window bucket {self._windows[-1]} (data.window_buckets)")}
    if ex["status"] == "ok":
      return ex
    if not self._cfg.skip_bad:
      raise (AudioError if ex.get("error") == "AudioError" else DataError)(ex["reason"])
    self._stats.skipped += 1
    if len(self._stats.reasons) < self.FIRST_REASONS:
      self._stats.reasons.append(ex["reason"])
      log.warning("skipping bad example (%d so far): %s", self._stats.skipped, ex["reason"])
    elif self._stats.skipped % 100 == 0:
      log.warning("%s: %d bad examples skipped of %d seen", self._name, self._stats.skipped, self._stats.seen)
    self._check_rate()
    return None

  def _emit(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
    """One batch of up to B examples from bucket `key`, shaped by the longest row and the most windows."""
    taken = self._pending.pop(key)
    length = self._bucket(max(e["tokens"].size for e in taken))  # == key[0] when grouping by length
    windows = self._window_bucket(max(e["window_samples"].size for e in taken))
    return collate(taken, self._batch, length, windows, self._spec, self._pad_id)

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._exhausted:
        if self._pending:
          return self._emit(min(self._pending))  # partial buckets, in bucket order
        raise StopIteration
      try:
        ex = next(self._parent)
      except StopIteration:
        self._exhausted = True
        self._check_rate(final=True)
        if self._stats.skipped:
          log.warning("%s: %d bad examples skipped of %d seen; first reasons: %s", self._name, self._stats.skipped,
                      self._stats.seen, " | ".join(self._stats.reasons))
        continue
      ex = self._admit(ex)
      if ex is None:
        continue
      key = self._key(ex)
      self._pending.setdefault(key, []).append(ex)
      if len(self._pending[key]) >= self._batch:
        return self._emit(key)

  def get_state(self) -> dict[str, Any]:
    s = self._stats
    return {
        "parent": self._parent.get_state(),
        "pending": {f"{l},{k}": [int(e["pos"]) for e in group] for (l, k), group in sorted(self._pending.items())},
        "exhausted": self._exhausted,
        "seen": s.seen, "skipped": s.skipped, "filtered": s.filtered, "reasons": list(s.reasons),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    pending: dict[tuple[int, int], list[dict]] = {}
    for key, positions in state["pending"].items():
      l, _, k = key.partition(",")
      if int(l) not in self._lengths or int(k) not in self._windows:
        raise DataError(f"{self._name}: saved iterator state uses bucket (L, K) = ({key}), not in "
                        "data.length_buckets × data.window_buckets")
      for pos in positions:
        ex = self._lookup[int(pos)]  # re-prepared here, identical by construction
        if ex["status"] != "ok":
          raise DataError(f"{self._name}: example at position {pos} of the saved state no longer prepares "
                          f"({ex.get('reason', ex['status'])})")
        pending.setdefault((int(l), int(k)), []).append(ex)
    self._pending = pending
    self._exhausted = bool(state.get("exhausted", False))
    self._stats = SkipStats(state["seen"], state["skipped"], state["filtered"], list(state["reasons"]))

  def __str__(self) -> str:
    return f"BucketBatchIterator(B={self._batch}, L={self._lengths}, K={self._windows})"


class AudioBatchDataset(grain.IterDataset):
  """The pipeline as a grain `IterDataset`: `iter()` gives a checkpointable `BucketBatchIterator`."""

  def __init__(self, parent: grain.IterDataset, lookup: grain.MapDataset, cfg: DataConfig, spec: AudioTokenSpec,
               pad_id: int, local_batch: int, name: str, num_examples: int):
    super().__init__(parent)
    self._lookup, self._cfg, self._spec, self._pad_id = lookup, cfg, spec, pad_id
    self._local_batch, self._name = local_batch, name
    self.num_examples = num_examples  # examples in this process's slice of one epoch

  def __iter__(self) -> BucketBatchIterator:
    return BucketBatchIterator(self._parent.__iter__(), self._lookup, self._cfg, self._spec, self._pad_id,
                               self._local_batch, self._name)

  def __str__(self) -> str:
    return f"AudioBatchDataset({self._name})"


def _mark_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app nothing parsed them, so take defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(
    cfg: DataConfig | Any,
    spec: AudioTokenSpec,
    tokenizer: Tokenizer,
    *,
    split: str = "train",
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> AudioBatchDataset:
  """Builds the input pipeline for one split of `cfg.path` (`eval_path` for non-train splits).

  `split="train"` shuffles (reshuffled per epoch), repeats `num_epochs` times
  (forever by default) and randomly crops/pads; any other split is read once,
  in order, deterministically. Each process reads its own slice [i::n] and
  emits batches of `batch_size / process_count` rows. `iter(dataset)` gives a
  grain iterator with `get_state` / `set_state` and `.stats`.
  """
  if not isinstance(cfg, DataConfig):
    cfg = DataConfig.from_config(cfg)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if cfg.batch_size % process_count:
    raise ConfigError("config.data.batch_size", f"{cfg.batch_size} is not divisible by {process_count} processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  seed = cfg.seed if seed is None else seed
  train = split == "train"
  path = cfg.eval_path if (not train and cfg.eval_path) else cfg.path
  if not path:
    raise ConfigError("config.data.path", "no data path given")
  source = open_source(path, split, tfds_data_dir=cfg.tfds_data_dir, audio_key=cfg.audio_key, text_key=cfg.text_key)
  if len(source) == 0:
    raise DataError(f"{path}: the {split} split holds no example")
  ds = grain.MapDataset.source(source)
  if train:
    if cfg.shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(cfg.num_epochs)
  ds = ds[process_index::process_count]
  per_epoch = len(range(process_index, len(source), process_count))
  ds = ds.map_with_index(Prepare(cfg, spec, tokenizer, train=train, seed=seed))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(
      cfg.batch_size, 2 * cfg.read_threads)))
  if cfg.workers > 0:
    # Small arrays (tokens) are pickled; audio travels through shared memory.
    it = grain.experimental.WithOptionsIterDataset(it, grain.experimental.DatasetOptions(min_shm_size=1 << 15))
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer))
  name = f"{path} [{split}]"
  return AudioBatchDataset(it, ds, cfg, spec, tokenizer.pad_id, cfg.batch_size // process_count, name, per_epoch)
