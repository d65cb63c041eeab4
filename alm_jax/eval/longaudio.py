"""Long-audio question answering (LongAudioBench-like): items, clip lengths, accuracy by length bucket.

A long-audio manifest is any file the multiple-choice reader takes (JSON array
or JSON Lines; `audio`/`sound` paths, `question` or `conversations`, `choices`,
`answer`, `category`) plus an optional `duration` in seconds per item. Items
without a duration get it from their files' headers. The model itself splits
clips longer than one encoder window into 30 s windows and joins them; the
evaluation only needs the length to report accuracy per bucket.
Items without choices (LongAudioBench's free-form questions) are open items:
listed in the report, scored only by a configured judge.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from alm_jax.eval import mc_prompts, mc_readers
from alm_jax.eval.items import EvalItem

# Bucket edges in seconds: [0, 30), [30, 60), [60, 120), [120, 300), [300, 600), [600, ∞).
DEFAULT_EDGES: tuple[float, ...] = (30.0, 60.0, 120.0, 300.0, 600.0)
UNKNOWN = "unknown length"


def _fmt(seconds: float) -> str:
  if seconds < 60 or seconds % 60:
    return f"{seconds:g}s"
  return f"{seconds / 60:g}min"


def bucket_labels(edges: Sequence[float] = DEFAULT_EDGES) -> list[str]:
  """Labels of the buckets, shortest first: "0-30s", "30s-1min", ..., "10min+"."""
  edges = sorted(edges)
  labels = [f"0-{_fmt(edges[0])}"] if edges else []
  labels += [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
  labels.append(f"{_fmt(edges[-1])}+" if edges else "all")
  return labels


def bucket_of(seconds: float | None, edges: Sequence[float] = DEFAULT_EDGES) -> str:
  """The label of the bucket [lo, hi) holding `seconds`; `UNKNOWN` for None."""
  if seconds is None:
    return UNKNOWN
  edges = sorted(edges)
  labels = bucket_labels(edges)
  for label, hi in zip(labels, edges):
    if seconds < hi:
      return label
  return labels[-1]


def clip_seconds(paths: Sequence[str]) -> float | None:
  """Total length of the clips from their headers (soundfile); None if any is unreadable."""
  import soundfile as sf  # pylint: disable=import-outside-toplevel

  total = 0.0
  for path in paths:
    try:
      info = sf.info(path)
    except (RuntimeError, OSError, sf.LibsndfileError):
      return None
    if not info.samplerate:
      return None
    total += info.frames / info.samplerate
  return total


def load_longaudio(
    data_path: str,
    audio_root: str | None = None,
    *,
    think: bool = False,
    template: str = mc_prompts.DEFAULT_TEMPLATE,
    check_audio: bool = True,
    limit: int | None = None,
) -> mc_readers.Loaded:
  """Reads a long-audio manifest; every item gets a `duration` (from the file or the audio headers)."""
  loaded = mc_readers.load_mc(data_path, audio_root, think=think, template=template, check_audio=check_audio,
                              limit=limit)
  filled = [
      item if item.duration is not None else dataclasses.replace(item, duration=clip_seconds(item.audio))
      for item in loaded.items
  ]
  return mc_readers.Loaded(filled, loaded.skipped, loaded.notes)


def length_buckets(items: Sequence[EvalItem], edges: Sequence[float] = DEFAULT_EDGES) -> dict[str, str]:
  """Item id → length-bucket label."""
  return {item.id: bucket_of(item.duration, edges) for item in items}
