"""One example's two passes: cheap metadata (`Prepare.measure`) and the decoded rows (`Prepare.load`).

The batch plan must be the same on every process, so every process measures
every example of the global order, and only the rows it loads are decoded.
`measure` reads what it can without decoding audio — the record, each clip's
length from its header (`alm_jax.audio.io.clip_length`: libsndfile's frame
count of the span, resampled arithmetically; inline PCM by its size) — and
from the lengths alone works out the crop/pad of each clip (randomness from
(seed, position) only), the placeholder counts, the tokens and the loss mask.
Every bad-example judgement (unreadable record or header, too many clips,
too short, too long, too many windows, no answer) is made here, so all
processes agree on it. `load` decodes the clips, fits each decoded clip to
exactly the measured length (a resampler can differ by a sample from the
header arithmetic, a compressed header can be an estimate), applies the same
crop/pad and cuts the windows (`cut_windows`, which generation uses too), so
the placeholder counts always match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from alm_jax.audio import io as audio_io
from alm_jax.data.records import Clip, with_clip_rationale
from alm_jax.data.sources import RawExample, to_record
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import AudioError, DataError
from alm_jax.models.audio_slots import AudioTokenSpec, num_audio_tokens, num_windows

if TYPE_CHECKING:
  from alm_jax.data.pipeline import DataConfig


def _inline_pcm(clip: Clip) -> np.ndarray:
  """A clip's inline PCM ([samples] or [samples, channels]) checked like `audio_io.to_float32`, not converted."""
  pcm = np.asarray(clip.pcm)
  if not (pcm.dtype in (np.int16, np.int32, np.uint8) or np.issubdtype(pcm.dtype, np.floating)):
    raise AudioError(f"{clip.name}: unsupported PCM dtype {pcm.dtype} (expected int16, int32, uint8 or float)")
  if pcm.ndim not in (1, 2):
    raise AudioError(f"{clip.name}: expected [samples] or [samples, channels] PCM, got shape {pcm.shape}")
  if pcm.shape[0] == 0:
    raise AudioError(f"{clip.name}: audio is empty (0 samples)")
  if np.issubdtype(pcm.dtype, np.floating) and not np.all(np.isfinite(pcm)):
    raise AudioError(f"{clip.name}: audio holds NaN or Inf samples")
  return pcm


def clip_length(clip: Clip, sample_rate: int) -> int:
  """Samples a clip holds at `sample_rate`, without decoding where the header tells (see the module docstring)."""
  if clip.pcm is not None:
    return audio_io.resampled_length(_inline_pcm(clip).shape[0], int(clip.sample_rate), sample_rate)
  if clip.data is not None:
    return audio_io.clip_length(clip.data, name=clip.name, sample_rate=sample_rate, start=clip.start, end=clip.end)
  return audio_io.clip_length(clip.path, sample_rate=sample_rate, start=clip.start, end=clip.end)


def load_clip(clip: Clip, sample_rate: int) -> np.ndarray:
  """A clip's float32 mono PCM at `sample_rate` (file, encoded bytes or inline PCM), decoded."""
  if clip.pcm is not None:
    pcm = audio_io.to_float32(_inline_pcm(clip), name=clip.name)
    if pcm.ndim == 2:
      pcm = pcm.mean(axis=1, dtype=np.float32)
    if clip.sample_rate != sample_rate:
      import soxr  # pylint: disable=import-outside-toplevel

      pcm = soxr.resample(pcm, clip.sample_rate, sample_rate, quality="HQ").astype(np.float32)
    return pcm
  if clip.data is not None:
    return audio_io.decode_audio_bytes(clip.data, name=clip.name, sample_rate=sample_rate, start=clip.start,
                                       end=clip.end)
  return audio_io.load_audio(clip.path, sample_rate=sample_rate, start=clip.start, end=clip.end)


def cut_windows(pcms: Sequence[np.ndarray], order: Sequence[int], spec: AudioTokenSpec) -> dict[str, np.ndarray]:
  """Cuts clips `pcms[k]` (k in `order`) into consecutive windows of `spec.window_samples` (`num_windows` per clip,
  the last one short), as `collate` takes them: `pcm` back to back, `window_samples`, `window_clip` (rank in `order`).
  """
  pieces, window_samples, window_clip = [], [], []
  size = spec.window_samples
  for rank, k in enumerate(order):
    pcm = pcms[k]
    for w in range(num_windows(pcm.size, spec)):
      piece = pcm[w * size : (w + 1) * size]
      pieces.append(piece)
      window_samples.append(piece.size)
      window_clip.append(rank)
  return {"pcm": np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0, np.float32),
          "window_samples": np.asarray(window_samples, np.int32), "window_clip": np.asarray(window_clip, np.int32)}


class Prepare:
  """Measures (every process, every example) and loads (only this process's rows) examples.

  `measure` never raises for bad input: `DataError` / `AudioError` become
  `{"status": "bad", "reason", "error"}` so the batch planner counts them in
  order. Randomness (crop/pad offsets) comes from (seed, position) only.
  """

  def __init__(self, cfg: "DataConfig", spec: AudioTokenSpec, tokenizer: Tokenizer, *, train: bool, seed: int):
    self.cfg, self.spec, self.tokenizer, self.train, self.seed = cfg, spec, tokenizer, train, seed
    self.max_length = max(cfg.length_buckets)
    self.max_windows = cfg.window_sizes(spec)[-1]

  def measure(self, position: int, raw: RawExample) -> dict:
    """Metadata of the example at global `position`: status, tokens, loss mask, windows, crop plan per clip."""
    try:
      return self._measure(position, raw)
    except (DataError, AudioError) as e:
      return {"status": "bad", "pos": int(position), "id": int(raw.index), "reason": str(e),
              "error": type(e).__name__}

  def _crop_plan(self, samples: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(start, kept, zeros before, final length) of a clip of `samples` samples: crop to the limit, pad to the least."""
    sr, spec, cfg = self.spec.sample_rate, self.spec, self.cfg
    limit = spec.max_windows * spec.window_samples
    if cfg.max_clip_seconds is not None:
      limit = min(limit, int(round(cfg.max_clip_seconds * sr)))
    start, kept = 0, samples
    if samples > limit:
      start = int(rng.integers(0, samples - limit + 1)) if self.train and cfg.max_clip_seconds is not None else 0
      kept = limit
    least = int(round(cfg.min_clip_seconds * sr))
    before, final = 0, kept
    if kept < least:
      before = int(rng.integers(0, least - kept + 1)) if self.train else 0
      final = least
    return start, kept, before, final

  def _measure(self, position: int, raw: RawExample) -> dict:
    record = to_record(raw, self.cfg.prompts)
    if self.cfg.clip_rationale:
      record = with_clip_rationale(record)
    base = {"pos": int(position), "id": int(raw.index)}
    if self.cfg.tasks and record.task not in self.cfg.tasks:
      return {"status": "filtered", **base}
    if len(record.clips) > self.cfg.max_clips:
      raise DataError(f"{record.origin}: {len(record.clips)} clips, more than data.max_clips={self.cfg.max_clips}")
    rng = np.random.default_rng([self.seed, int(position)])
    plans, counts = [], []
    for clip in record.clips:
      try:
        samples = clip_length(clip, self.spec.sample_rate)
      except AudioError as e:
        raise AudioError(f"{e} [{record.origin}]") from None
      plan = (samples,) + self._crop_plan(samples, rng)
      try:
        counts.append(num_audio_tokens(plan[-1], self.spec))
      except ValueError:
        raise AudioError(f"{clip.name}: clip of {plan[-1]} samples is too short to give an audio token "
                         f"[{record.origin}]") from None
      plans.append(plan)
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
    windows = sum(num_windows(plans[k][-1], self.spec) for k in order)
    if windows > self.max_windows:
      raise DataError(f"{record.origin}: needs {windows} audio windows, more than the largest window bucket "
                      f"{self.max_windows} (data.window_buckets)")
    return {"status": "ok", **base, "tokens": tokens, "loss_mask": loss_mask, "windows": windows,
            "plans": plans, "order": order}

  def load(self, meta: dict, raw: RawExample) -> dict:
    """The example dict `collate` takes, decoded from `raw` as `meta` (its `measure`) planned.

    Raises `AudioError` naming the clip and the record when a clip whose
    header was readable fails to decode.
    """
    record = to_record(raw, self.cfg.prompts)
    pcms = []
    for clip, (samples, start, kept, before, final) in zip(record.clips, meta["plans"]):
      try:
        pcm = audio_io.fit_length(load_clip(clip, self.spec.sample_rate), samples)
      except AudioError as e:
        raise AudioError(f"{e} [{record.origin}]") from None
      pcm = pcm[start : start + kept]
      if final > kept:
        pcm = np.pad(pcm, (before, final - kept - before))
      pcms.append(pcm)
    return {"id": meta["id"], "tokens": meta["tokens"], "loss_mask": meta["loss_mask"],
            **cut_windows(pcms, meta["order"], self.spec), "clips": len(meta["order"])}
