"""Rotary time embedding on encoder outputs (MusicFlamingo), parameter-free.

MusicFlamingo rotates the first channels of each pooled Whisper frame, before
the projector, by angles that depend on where the frame lies in its clip: one
group of channel pairs on the window's index within the clip, the next group
on the frame's index within its window, both multiplied by the frame's
absolute time in seconds. Each rotated pair uses one inverse frequency
`theta ** (-2i / dim)` with `dim = int(width * fraction)`, so `4 * ceil(dim / 2)`
channels rotate and the rest pass through.

The reference computes the angles in float32 (and only the rotation itself
in float64); we follow its float32 operation order so the angles, which reach
thousands of radians on long clips, round the same way.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from alm_jax.config import require


@dataclasses.dataclass(frozen=True)
class RotaryTimeConfig:
  """The rotary time embedding's settings (HF `rope_parameters`, `audio_frame_step`).

  Attributes:
    theta: the inverse frequencies' base; also the length of the within-window
      position table (the reference sets `max_position_embeddings = rope_theta`).
    fraction: share of the encoder width whose inverse frequencies are used
      (`partial_rotary_factor`); each frequency rotates two channel pairs.
    mel_frame_seconds: seconds per mel frame; an encoder output frame spans 4
      (conv stride 2, then average pooling 2).
  """

  theta: float = 1200.0
  fraction: float = 0.2
  mel_frame_seconds: float = 0.01

  def __post_init__(self):
    require(self.theta >= 1, "model.rotary_time.theta", f"must be >= 1, got {self.theta}")
    require(0 < self.fraction <= 0.5, "model.rotary_time.fraction", f"must be in (0, 0.5], got {self.fraction}")
    require(self.mel_frame_seconds > 0, "model.rotary_time.mel_frame_seconds", "must be positive")

  @property
  def frame_seconds(self) -> float:
    return self.mel_frame_seconds * 4

  def inverse_frequencies(self, width: int) -> np.ndarray:
    """float32 [ceil(dim / 2)] for an encoder of `width` channels."""
    dim = int(width * self.fraction)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(self.theta), exponents)).astype(np.float32)

  def rotated_channels(self, width: int) -> int:
    return 4 * self.inverse_frequencies(width).size


def window_index(clip: jax.Array) -> jax.Array:
  """Each slot's window index within its clip: clip [B, K] → int32 [B·K] (a clip's windows are consecutive slots)."""
  slots = clip.shape[1]
  same = clip[:, :, None] == clip[:, None, :]
  first = jnp.argmax(same, axis=2)  # the clip's first slot
  return (jnp.arange(slots)[None, :] - first).reshape(-1).astype(jnp.int32)


def angles(cfg: RotaryTimeConfig, width: int, window: jax.Array, frames: int, windows: int) -> jax.Array:
  """float32 [W, frames, 2·F] rotation angles, one per channel pair, for windows at `window` [W] (< `windows`)
  within their clips.

  What depends on the window index alone is tabulated on the host in numpy float32 (XLA would turn the
  reference's division by theta into a multiplication and round differently) and gathered.
  """
  inv = cfg.inverse_frequencies(width)
  step = np.float32(cfg.frame_seconds)
  # Within-window positions: a table of `theta` positions spanning one turn, as the reference builds it.
  positions = np.arange(frames, dtype=np.float32) / np.float32(cfg.theta) * np.float32(2 * math.pi)
  time_freqs = jnp.asarray(positions[:, None] * inv[None, :])  # [T, F]
  offsets = jnp.asarray(np.arange(frames, dtype=np.float32) * step)  # [T] seconds into the window
  index = np.arange(windows)
  starts = jnp.asarray((index * frames).astype(np.float32) * step)[window]  # [W] seconds from the clip's start
  seconds = starts[:, None] + offsets[None, :]  # [W, T]
  window_freqs = jnp.asarray((index.astype(np.float32) / np.float32(cfg.theta))[:, None] * inv[None, :])[window]
  freqs = jnp.concatenate([jnp.broadcast_to(window_freqs[:, None, :], (*seconds.shape, inv.size)),
                           jnp.broadcast_to(time_freqs[None], (*seconds.shape, inv.size))], axis=-1)
  turn = (-seconds * np.float32(2)) * np.float32(math.pi)
  return freqs * turn[..., None]


def apply(cfg: RotaryTimeConfig, frames: jax.Array, clip: jax.Array) -> jax.Array:
  """Rotates frames [B·K, T, C] of the windows in each row's K slots (clips `clip` [B, K]); same shape and dtype.

  Channel pairs (2i, 2i+1) of the first `rotated_channels(C)` channels turn by
  angle i; the rest pass through. Computed in float32.
  """
  count, length, width = frames.shape
  theta = angles(cfg, width, window_index(clip), length, clip.shape[1])  # [W, T, P]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rotated = 2 * theta.shape[-1]
  x = frames[..., :rotated].astype(jnp.float32).reshape(count, length, -1, 2)
  even, odd = x[..., 0], x[..., 1]
  turned = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(count, length, rotated)
  return jnp.concatenate([turned.astype(frames.dtype), frames[..., rotated:]], axis=-1)
