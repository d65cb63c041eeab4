"""Host-side numpy checks that a collated batch fits the model's contract, run before the device step (data-side code, kept out of the jitted model files)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from alm_jax.errors import DataError
from alm_jax.models.audio_slots import AudioTokenSpec, num_audio_tokens


def check_audio_slots(batch: Mapping[str, np.ndarray], spec: AudioTokenSpec, placeholder_id: int) -> None:
  """Raises `DataError` unless every row's placeholder count equals what its clips give.

  Runs on the host on numpy arrays; `example_id`s name the offending rows.
  """
  clip = np.asarray(batch["audio_clip"])
  samples = np.asarray(batch["audio_samples"])
  found = (np.asarray(batch["tokens"]) == placeholder_id).sum(-1)
  ids = np.asarray(batch.get("example_id", np.full(len(found), -1)))
  for row in range(len(found)):
    expected = sum(num_audio_tokens(int(samples[row][clip[row] == c].sum()), spec)
                   for c in np.unique(clip[row][clip[row] >= 0]))
    if found[row] != expected:
      raise DataError(
          f"example {int(ids[row]) if row < len(ids) else -1} (batch row {row}): {int(found[row])} audio placeholder "
          f"tokens but its clips give {expected} (tokenizer and model disagree on audio_slots)")


def check_one_clip_per_example(batch: Mapping[str, np.ndarray], placeholder_id: int) -> None:
  """Host-side: raises `DataError` unless every row with audio holds exactly one clip (clip id 0 only)."""
  clip = np.asarray(batch["audio_clip"])
  rows = np.asarray(batch["tokens"] == placeholder_id).any(-1)
  clips = np.asarray([np.unique(c[c >= 0]).size for c in clip])
  bad = (clips != rows.astype(int)) | (clip.max(-1) > 0)
  if bad.any():
    ids = [int(i) for i, b in zip(np.asarray(batch.get("example_id", [])), bad) if b and i >= 0]
    raise DataError(
        f"batch of examples {ids[:8]}: {int(clips[bad].max())} clips in a row; the tagging objective "
        "needs exactly one clip per example (select single-clip tasks with data.tasks)")
