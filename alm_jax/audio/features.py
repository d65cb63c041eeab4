"""On-device audio front ends: Whisper log-Mel and Kaldi/BEATs fbank in pure JAX.

These run inside the jitted train/eval step on batches of float32 PCM at 16 kHz,
so the host only decodes and pads. Outputs are time-major `[batch, frames, bins]`.
Both match their references (HF `WhisperFeatureExtractor`, Kaldi fbank as
`kaldi-native-fbank` / torchaudio compute it for BEATs) to float32 rounding.

Speed: frames are cut with reshapes of 160-sample hops (no gather). The spectrum
is `method="matmul"` (a real DFT as two small matmul stages: the MXU path on
TPU) or `"fft"` (rfft: ~2-3x faster on CPU); `examples_per_step` walks the
batch a few examples at a time (faster on CPU) or all at once (0). Both are
config (`model.frontend`), never chosen by asking the backend, so a program
compiled ahead of time for a TPU is the program the TPU runs. Both methods
match the references.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
HOP = 160  # 10 ms, both front ends
WHISPER_N_FFT = 400  # 25 ms window, centred
FBANK_FRAME = 400  # 25 ms, snip-edges frames
FBANK_N_FFT = 512  # Kaldi rounds the frame up to a power of two
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582

Method = Literal["fft", "matmul"]
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- filter banks (numpy, cached)


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale (librosa `htk=False`): linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  linear = 3.0 * hz / 200.0
  log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
  return np.where(hz >= 1000.0, log, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
  """Inverse of `_hz_to_slaney_mel`."""
  mel = np.asarray(mel, np.float64)
  linear = 200.0 * mel / 3.0
  log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
  return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=None)
def whisper_mel_filters(n_mels: int = 80, n_fft: int = WHISPER_N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Whisper's mel filter bank, `[n_fft // 2 + 1, n_mels]` float32: Slaney scale, Slaney (area) norm, 0-8 kHz.

  Same values as librosa `filters.mel(htk=False, norm="slaney")` and HF `mel_filter_bank(..., "slaney", "slaney")`.
  """
  fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges_hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(sample_rate / 2), n_mels + 2))
  lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
  rising = (fft_hz[:, None] - lower) / (centre - lower)
  falling = (upper - fft_hz[:, None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights *= 2.0 / (upper - lower)  # Slaney norm: each triangle has unit area in Hz
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=None)
def kaldi_mel_banks(
    num_bins: int = 128,
    n_fft: int = FBANK_N_FFT,
    sample_rate: int = SAMPLE_RATE,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
  """Kaldi's mel banks, `[n_fft // 2 + 1, num_bins]` float32: triangles on mel = 1127 ln(1 + f/700), no norm.

  `high_freq <= 0` is an offset from Nyquist (Kaldi's convention). The Nyquist
  bin gets weight 0, as in Kaldi, which only bins `[0, n_fft / 2)`.
  """
  nyquist = sample_rate / 2
  high = high_freq if high_freq > 0 else nyquist + high_freq
  if not 0 <= low_freq < high <= nyquist:
    raise ValueError(f"kaldi mel banks need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high}")

  def mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)

  mel_low, mel_high = mel(low_freq), mel(high)
  delta = (mel_high - mel_low) / (num_bins + 1)
  left = mel_low + delta * np.arange(num_bins)
  centre, right = left + delta, left + 2 * delta
  fft_mel = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[:, None]
  rising = (fft_mel - left) / (centre - left)
  falling = (right - fft_mel) / (right - centre)
  inside = (fft_mel > left) & (fft_mel < right)
  weights = np.where(inside, np.where(fft_mel <= centre, rising, falling), 0.0)
  return np.concatenate([weights, np.zeros((1, num_bins))]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _periodic_hann(length: int) -> np.ndarray:
  """torch.hann_window(length) (periodic): 0.5 - 0.5 cos(2 pi n / length)."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _povey_window(length: int) -> np.ndarray:
  """Kaldi's Povey window: a symmetric Hann raised to 0.85."""
  return ((0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))) ** 0.85).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _two_stage_dft_matrices(n_fft: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
  """Matrices of a real n_fft-point DFT done as two small matmul stages (one Cooley-Tukey split n_fft = p * q).

  With n = q * n1 + n2 and k = k1 + p * k2: stage 1 is a p-point DFT over n1 for
  every n2, `[p, 2p]` (cos | -sin); stage 2 applies, per k1, the twiddled q-point
  DFT over n2, `[p, q, k2]` real and imaginary parts, keeping only the k2 that
  reach bins 0..n_fft/2. Each output sums p + 2q terms instead of n_fft, so it is
  as accurate as an FFT in float32 and ~4x cheaper than one dense DFT matmul.
  """
  p = int(math.isqrt(n_fft))
  while n_fft % p:
    p -= 1
  q = n_fft // p
  k2 = -(-(n_fft // 2 + 1) // p)
  angle1 = 2 * np.pi * np.outer(np.arange(p), np.arange(p)) / p
  stage1 = np.concatenate([np.cos(angle1), -np.sin(angle1)], axis=1)
  k = np.arange(p)[:, None, None] + p * np.arange(k2)[None, None, :]
  angle2 = -2 * np.pi * np.arange(q)[None, :, None] * k / n_fft
  return p, q, stage1.astype(np.float32), np.cos(angle2).astype(np.float32), np.sin(angle2).astype(np.float32)


def _matmul_power_spectrum(frames: jax.Array, n_fft: int) -> jax.Array:
  """|DFT|^2 of real frames by two matmul stages (MXU-friendly; no FFT op): `[..., L] -> [..., n_fft // 2 + 1]`."""
  p, q, stage1, re2, im2 = _two_stage_dft_matrices(n_fft)
  if frames.shape[-1] < n_fft:
    frames = jnp.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(0, n_fft - frames.shape[-1])])
  x = frames.reshape(*frames.shape[:-1], p, q)  # [..., n1, n2]
  a = jnp.einsum("...nq,nk->...kq", x, stage1, precision=_HIGHEST)  # [..., 2p (k1 re | im), n2]
  a_re, a_im = a[..., :p, :], a[..., p:, :]

  def stage2(part, matrix):
    return jnp.einsum("...kq,kqj->...jk", part, matrix, precision=_HIGHEST)  # [..., k2, k1]

  x_re = stage2(a_re, re2) - stage2(a_im, im2)
  x_im = stage2(a_re, im2) + stage2(a_im, re2)
  bins = n_fft // 2 + 1
  x_re = x_re.reshape(*x_re.shape[:-2], -1)[..., :bins]  # k = k1 + p * k2
  x_im = x_im.reshape(*x_im.shape[:-2], -1)[..., :bins]
  return x_re**2 + x_im**2


# ----------------------------------------------------------------------------- shared pieces


def _check(method: Method, examples_per_step: int) -> None:
  """Rejects an unknown spectrum method or a negative step size (both come from config)."""
  if method not in ("fft", "matmul"):
    raise ValueError(f"method must be 'fft' or 'matmul', got {method!r}")
  if examples_per_step < 0:
    raise ValueError(f"examples_per_step must be >= 0, got {examples_per_step}")


def _frames(signal: jax.Array, num_frames: int, frame_length: int, hop: int) -> jax.Array:
  """`[num_frames, frame_length]` frames `signal[t * hop : t * hop + frame_length]`, cut with reshapes, not a gather."""
  pieces = -(-frame_length // hop)  # hop-sized blocks a frame spans
  needed = hop * (num_frames + pieces - 1)
  if signal.shape[-1] < needed:  # the tail only feeds block slots past frame_length, cut off below
    signal = jnp.pad(signal, (0, needed - signal.shape[-1]))
  blocks = signal[:needed].reshape(num_frames + pieces - 1, hop)
  frames = jnp.concatenate([blocks[j : j + num_frames] for j in range(pieces)], axis=-1)
  return frames[:, :frame_length]


def _power_spectrum(frames: jax.Array, n_fft: int, transform: str) -> jax.Array:
  """|DFT|^2 of real frames zero-padded to n_fft: `[..., frame_length] -> [..., n_fft // 2 + 1]`."""
  if transform == "fft":
    spectrum = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    return spectrum.real**2 + spectrum.imag**2
  return _matmul_power_spectrum(frames, n_fft)


def _apply_per_example(fn, pcm: jax.Array, examples_per_step: int) -> jax.Array:
  """Applies `fn: [N] -> [T, bins]` over every leading index of `pcm: [..., N]`.

  `examples_per_step` > 0 walks the batch that many examples at a time (a
  `lax.map`; on CPU one at a time is ~2-3x faster, each example's frames stay
  in cache); 0 computes the whole batch at once. Neither asks which devices
  run it: in the model the front end runs per device shard (`per_shard`).
  """
  lead, n = pcm.shape[:-1], pcm.shape[-1]
  flat = pcm.reshape(-1, n).astype(jnp.float32)
  batch = flat.shape[0]
  if examples_per_step <= 0 or examples_per_step >= batch:
    out = jax.vmap(fn)(flat)
  else:
    group = math.gcd(batch, examples_per_step)
    out = jax.lax.map(jax.vmap(fn), flat.reshape(batch // group, group, n))
    out = out.reshape(batch, *out.shape[2:])
  return out.reshape(*lead, *out.shape[1:])


# ----------------------------------------------------------------------------- Whisper


def pad_or_trim(pcm: np.ndarray | jax.Array, length: int) -> np.ndarray | jax.Array:
  """Zero-pads or truncates the last axis to `length` samples (numpy in -> numpy out, else JAX)."""
  n = pcm.shape[-1]
  xp = np if isinstance(pcm, np.ndarray) else jnp
  if n >= length:
    return pcm[..., :length]
  widths = [(0, 0)] * (pcm.ndim - 1) + [(0, length - n)]
  return xp.pad(pcm, widths)


def whisper_num_frames(num_samples: int) -> int:
  """Log-Mel frames of a window of `num_samples` samples (3000 for 30 s): the centred STFT's last frame is dropped."""
  return num_samples // HOP


def whisper_log_mel(pcm: jax.Array, *, n_mels: int = 80, method: Method = "matmul",
                    examples_per_step: int = 0) -> jax.Array:
  """Whisper's log-Mel spectrogram: `[B, N]` float32 PCM -> `[B, N // 160, n_mels]`.

  Centred periodic-Hann STFT (n_fft 400, hop 160, reflect padding), power, Slaney
  mel, log10 floored at 1e-10, clamped to (per-example max - 8) over the whole
  window, then (x + 4) / 4. Pad the PCM to the model's window first
  (`pad_or_trim`): the clamp sees the padding, as in HF.
  """
  n = pcm.shape[-1]
  if n <= WHISPER_N_FFT // 2:
    raise ValueError(f"whisper_log_mel needs more than {WHISPER_N_FFT // 2} samples per example, got {n}")
  _check(method, examples_per_step)
  num_frames = whisper_num_frames(n)
  window = _periodic_hann(WHISPER_N_FFT)
  filters = whisper_mel_filters(n_mels)

  def one(x: jax.Array) -> jax.Array:
    padded = jnp.pad(x, (WHISPER_N_FFT // 2, WHISPER_N_FFT // 2), mode="reflect")
    frames = _frames(padded, num_frames, WHISPER_N_FFT, HOP) * window
    mel = jnp.matmul(_power_spectrum(frames, WHISPER_N_FFT, method), filters, precision=_HIGHEST)
    log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
    log_mel = jnp.maximum(log_mel, jnp.max(log_mel) - 8.0)
    return (log_mel + 4.0) / 4.0

  return _apply_per_example(one, pcm, examples_per_step)


def whisper_frame_mask(valid_samples: np.ndarray | jax.Array, num_frames: int) -> jax.Array:
  """`[B] int -> [B, num_frames] bool`: mel frames holding real audio, as HF's `return_attention_mask`.

  Frame t is valid iff t * 160 < valid_samples, i.e. the first ceil(valid / 160) frames.
  """
  valid = jnp.asarray(valid_samples, jnp.int32)
  return jnp.arange(num_frames, dtype=jnp.int32) * HOP < valid[..., None]


# ----------------------------------------------------------------------------- Kaldi fbank / BEATs


def fbank_num_frames(num_samples: int) -> int:
  """Kaldi snip-edges frames of `num_samples` samples: 1 + (N - 400) // 160, 0 below one frame (2998 for 30 s)."""
  return 1 + (num_samples - FBANK_FRAME) // HOP if num_samples >= FBANK_FRAME else 0


def fbank_frame_mask(valid_samples: np.ndarray | jax.Array, num_frames: int) -> jax.Array:
  """`[B] int -> [B, num_frames] bool`: fbank frames lying wholly inside the first `valid_samples` samples."""
  valid = jnp.asarray(valid_samples, jnp.int32)
  return jnp.arange(num_frames, dtype=jnp.int32) * HOP + FBANK_FRAME <= valid[..., None]


def kaldi_fbank(pcm: jax.Array, *, num_mel_bins: int = 128, method: Method = "matmul",
                examples_per_step: int = 0) -> jax.Array:
  """Kaldi log-mel fbank as BEATs computes it: `[B, N]` PCM in [-1, 1] -> `[B, fbank_num_frames(N), num_mel_bins]`.

  PCM is scaled by 2^15; 25 ms frames every 10 ms (snip edges), per-frame DC
  removal, pre-emphasis 0.97, Povey window, 512-point power spectrum, Kaldi mel
  banks 20 Hz-Nyquist, natural log floored at float32 epsilon; no dither, no energy.
  At 128 bins mel bin 3 covers no FFT bin and stays at log(eps), as torchaudio
  (BEATs) gives it; Kaldi itself refuses that setting.
  """
  n = pcm.shape[-1]
  num_frames = fbank_num_frames(n)
  if num_frames == 0:
    raise ValueError(f"kaldi_fbank needs at least {FBANK_FRAME} samples per example, got {n}")
  _check(method, examples_per_step)
  window = _povey_window(FBANK_FRAME)
  banks = kaldi_mel_banks(num_mel_bins)
  floor = float(np.finfo(np.float32).eps)

  def one(x: jax.Array) -> jax.Array:
    frames = _frames(x * 32768.0, num_frames, FBANK_FRAME, HOP)
    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
    previous = jnp.concatenate([frames[:, :1], frames[:, :-1]], axis=-1)  # Kaldi: x[0] -= 0.97 x[0]
    frames = (frames - 0.97 * previous) * window
    mel = jnp.matmul(_power_spectrum(frames, FBANK_N_FFT, method), banks, precision=_HIGHEST)
    return jnp.log(jnp.maximum(mel, floor))

  return _apply_per_example(one, pcm, examples_per_step)


def beats_fbank(pcm: jax.Array, *, method: Method = "matmul", examples_per_step: int = 0) -> jax.Array:
  """BEATs' input features: 128-bin `kaldi_fbank` normalised as (x - 15.41663) / (2 * 6.55582)."""
  fbank = kaldi_fbank(pcm, num_mel_bins=128, method=method, examples_per_step=examples_per_step)
  return (fbank - BEATS_FBANK_MEAN) / (2.0 * BEATS_FBANK_STD)


__all__ = [
    "SAMPLE_RATE",
    "HOP",
    "beats_fbank",
    "fbank_frame_mask",
    "fbank_num_frames",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "pad_or_trim",
    "whisper_frame_mask",
    "whisper_log_mel",
    "whisper_mel_filters",
    "whisper_num_frames",
]
