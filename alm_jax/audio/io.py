"""Host-side audio I/O: decode any common format to float32 mono PCM at the model rate.

Everything here is numpy and runs in the data pipeline (grain workers), never on
device. soundfile (libsndfile: wav, flac, ogg, mp3, ...) reads what it can and
seeks for `start`/`end` spans; audioread (librosa's fallback decoder) handles
the rest. Bad input raises `AudioError` with one line naming the file.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from alm_jax.errors import AudioError

PathLike = str | os.PathLike

# soxr "HQ" is librosa's default resampler (res_type="soxr_hq"): 20-bit quality, steep anti-aliasing.
_RESAMPLE_QUALITY = "HQ"


def _one_line(error: BaseException) -> str:
  """An exception's message flattened to one line (libsndfile messages carry newlines)."""
  text = " ".join(str(error).split())
  return text or type(error).__name__


def to_float32(pcm: np.ndarray, *, name: str = "<array>") -> np.ndarray:
  """Converts integer or float PCM to float32 in [-1, 1], keeping the shape.

  int16 is divided by 2^15, int32 by 2^31, uint8 is centred on 128 (as in WAV);
  float input is cast. Raises `AudioError` naming `name` for non-finite samples
  or a dtype that is not audio.
  """
  pcm = np.asarray(pcm)
  if pcm.dtype == np.int16:
    out = pcm.astype(np.float32) / np.float32(2**15)
  elif pcm.dtype == np.int32:
    out = (pcm.astype(np.float64) / 2**31).astype(np.float32)
  elif pcm.dtype == np.uint8:
    out = (pcm.astype(np.float32) - 128.0) / np.float32(128.0)
  elif np.issubdtype(pcm.dtype, np.floating):
    out = pcm.astype(np.float32)
    if not np.all(np.isfinite(out)):
      raise AudioError(f"{name}: audio holds NaN or Inf samples")
  else:
    raise AudioError(f"{name}: unsupported PCM dtype {pcm.dtype} (expected int16, int32, uint8 or float)")
  return out


def prepare_pcm(pcm: np.ndarray, rate: int, *, sample_rate: int = 16000, name: str = "<array>") -> np.ndarray:
  """In-memory PCM (`[samples]` or `[samples, channels]`, int or float, at `rate`) -> float32 mono at `sample_rate`.

  The same checks, mix-down, resampling and clipping as `load_audio`, for clips
  that arrive already decoded (TFDS, HF datasets).
  """
  pcm = to_float32(pcm, name=name)
  if pcm.ndim not in (1, 2):
    raise AudioError(f"{name}: expected [samples] or [samples, channels] PCM, got shape {pcm.shape}")
  return _finish(pcm, int(rate), sample_rate, name)


def _finish(pcm: np.ndarray, native_rate: int, sample_rate: int, name: str) -> np.ndarray:
  """Mixes [frames, channels] float PCM to mono, checks it and resamples to `sample_rate`."""
  if pcm.shape[0] == 0:
    raise AudioError(f"{name}: audio is empty (0 samples)")
  if not np.all(np.isfinite(pcm)):
    raise AudioError(f"{name}: audio holds NaN or Inf samples")
  mono = pcm.mean(axis=1, dtype=np.float32) if pcm.ndim == 2 else pcm.astype(np.float32)
  if native_rate != sample_rate:
    import soxr  # pylint: disable=import-outside-toplevel

    mono = soxr.resample(mono, native_rate, sample_rate, quality=_RESAMPLE_QUALITY)
  return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)


def _span_frames(start: float | None, end: float | None, rate: int, total: int, name: str) -> tuple[int, int]:
  """Turns a [start, end) span in seconds into frame indices, checking it lies inside the clip."""
  first = 0 if start is None else int(round(start * rate))
  last = total if end is None else int(round(end * rate))
  if start is not None and start < 0:
    raise AudioError(f"{name}: span start {start} s is negative")
  if end is not None and start is not None and end <= start:
    raise AudioError(f"{name}: span end {end} s is not after start {start} s")
  if first >= total or last > total:
    raise AudioError(
        f"{name}: span [{start or 0.0}, {end if end is not None else 'end'}] s is beyond the clip's end "
        f"({total / rate:.3f} s)"
    )
  if last <= first:
    raise AudioError(f"{name}: span [{start}, {end}] s holds no sample")
  return first, last


def _read_soundfile(source: PathLike | BinaryIO, start: float | None, end: float | None, name: str):
  """Reads [frames, channels] float32 PCM and its rate with libsndfile, seeking to the span."""
  with sf.SoundFile(source) as f:
    rate, total = f.samplerate, f.frames
    if total <= 0:
      raise AudioError(f"{name}: audio is empty (0 samples)")
    first, last = _span_frames(start, end, rate, total, name)
    if first and f.seekable():
      f.seek(first)
      pcm = f.read(last - first, dtype="float32", always_2d=True)
    else:
      pcm = f.read(last, dtype="float32", always_2d=True)[first:]
  if pcm.shape[0] < last - first:
    # Frame counts in some compressed headers are estimates; a short read is a truncated file.
    ends = (first + pcm.shape[0]) / rate
    raise AudioError(f"{name}: span ends at {last / rate:.3f} s but the audio ends at {ends:.3f} s")
  return pcm, rate


def _read_audioread(path: str, start: float | None, end: float | None, name: str):
  """Decodes with audioread (librosa's fallback: ffmpeg/gstreamer/...) and cuts the span."""
  import audioread  # pylint: disable=import-outside-toplevel

  with audioread.audio_open(path) as f:
    rate, channels = int(f.samplerate), int(f.channels)
    chunks = [np.frombuffer(buf, dtype="<i2") for buf in f]
  pcm = to_float32(np.concatenate(chunks) if chunks else np.zeros(0, np.int16), name=name)
  pcm = pcm[: pcm.size - pcm.size % channels].reshape(-1, channels)
  if pcm.shape[0] == 0:
    raise AudioError(f"{name}: audio is empty (0 samples)")
  first, last = _span_frames(start, end, rate, pcm.shape[0], name)
  return pcm[first:last], rate


def _decode(source: Any, path_for_fallback: str | None, start, end, name: str):
  """Tries soundfile, then audioread; wraps any decoder failure in a one-line `AudioError`."""
  try:
    return _read_soundfile(source, start, end, name)
  except AudioError:
    raise
  except Exception as sf_error:  # pylint: disable=broad-except
    sf_reason = _one_line(sf_error)
  if path_for_fallback is None:
    raise AudioError(f"{name}: cannot decode audio (soundfile: {sf_reason})")
  try:
    return _read_audioread(path_for_fallback, start, end, name)
  except AudioError:
    raise
  except Exception as ar_error:  # pylint: disable=broad-except
    raise AudioError(
        f"{name}: cannot decode audio (soundfile: {sf_reason}; audioread: {_one_line(ar_error)})"
    ) from None


def load_audio(
    path: PathLike, *, sample_rate: int = 16000, start: float | None = None, end: float | None = None
) -> np.ndarray:
  """Reads an audio file as float32 mono PCM in [-1, 1] at `sample_rate`: shape [samples].

  Channels are averaged, other rates resampled with soxr (HQ, librosa's default),
  and the result clipped to [-1, 1] (float files and resampling can overshoot).
  `start`/`end` (seconds) select a span, read by seeking where the format allows;
  a span reaching past the clip's end is an error.
  """
  name = os.fspath(path)
  if not os.path.exists(name):
    raise AudioError(f"{name}: no such audio file")
  if os.path.isdir(name):
    raise AudioError(f"{name}: is a directory, not an audio file")
  if os.path.getsize(name) == 0:
    raise AudioError(f"{name}: audio file is empty (0 bytes)")
  pcm, rate = _decode(name, name, start, end, name)
  return _finish(pcm, rate, sample_rate, name)


def decode_audio_bytes(
    data: bytes, *, name: str, sample_rate: int = 16000, start: float | None = None, end: float | None = None
) -> np.ndarray:
  """Decodes an encoded clip held in memory (e.g. an ArrayRecord record) like `load_audio`.

  `name` (the record's key or original path) is what error messages show; its
  extension helps the fallback decoder guess the format.
  """
  if not data:
    raise AudioError(f"{name}: audio record is empty (0 bytes)")
  try:
    pcm, rate = _read_soundfile(io.BytesIO(data), start, end, name)
  except AudioError:
    raise
  except Exception as sf_error:  # pylint: disable=broad-except
    # audioread only reads paths: spill the bytes to a temporary file for it.
    suffix = os.path.splitext(name)[1] or ".bin"
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
      tmp.write(data)
      tmp.flush()
      try:
        pcm, rate = _read_audioread(tmp.name, start, end, name)
      except AudioError:
        raise
      except Exception as ar_error:  # pylint: disable=broad-except
        raise AudioError(
            f"{name}: cannot decode audio (soundfile: {_one_line(sf_error)}; audioread: {_one_line(ar_error)})"
        ) from None
  return _finish(pcm, rate, sample_rate, name)


def resampled_length(frames: int, rate: int, sample_rate: int) -> int:
  """Samples `frames` samples at `rate` become at `sample_rate`: round(frames × sample_rate / rate), as soxr gives."""
  if int(rate) == int(sample_rate):
    return int(frames)
  return int(frames * sample_rate / rate + 0.5)


def _header_frames(source: Any, start: float | None, end: float | None, name: str) -> tuple[int, int]:
  """Frames of the [start, end) span and the native rate, from libsndfile's header only."""
  with sf.SoundFile(source) as f:
    rate, total = int(f.samplerate), int(f.frames)
  if total >= 2**62:  # libsndfile's "unknown length" (a stream without a frame count)
    raise ValueError("the header gives no frame count")
  if total <= 0:
    raise AudioError(f"{name}: audio is empty (0 samples)")
  first, last = _span_frames(start, end, rate, total, name)
  return last - first, rate


def clip_length(
    source: PathLike | bytes, *, name: str | None = None, sample_rate: int = 16000, start: float | None = None,
    end: float | None = None
) -> int:
  """Samples a clip (a file path, or encoded bytes) holds at `sample_rate`, from its header: no decoding.

  The checks and one-line messages are those of `load_audio` /
  `decode_audio_bytes` (missing or empty file, span beyond the clip's end).
  The length is the header's frame count of the span, resampled by
  `resampled_length`; a decoder can return a sample more or less (or fewer
  frames than a compressed header estimates), so the pipeline fits decoded PCM
  to this length. Where libsndfile cannot read the header (formats only
  audioread decodes), the clip is decoded, since nothing else gives its exact
  length.
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = name or "<bytes>"
    if not source:
      raise AudioError(f"{name}: audio record is empty (0 bytes)")
    try:
      frames, rate = _header_frames(io.BytesIO(source), start, end, name)
    except AudioError:
      raise
    except Exception:  # pylint: disable=broad-except
      return decode_audio_bytes(bytes(source), name=name, sample_rate=sample_rate, start=start, end=end).size
    return resampled_length(frames, rate, sample_rate)
  path = os.fspath(source)
  name = name or path
  if not os.path.exists(path):
    raise AudioError(f"{name}: no such audio file")
  if os.path.isdir(path):
    raise AudioError(f"{name}: is a directory, not an audio file")
  if os.path.getsize(path) == 0:
    raise AudioError(f"{name}: audio file is empty (0 bytes)")
  try:
    frames, rate = _header_frames(path, start, end, name)
  except AudioError:
    raise
  except Exception:  # pylint: disable=broad-except
    return load_audio(path, sample_rate=sample_rate, start=start, end=end).size
  return resampled_length(frames, rate, sample_rate)


def fit_length(pcm: np.ndarray, samples: int) -> np.ndarray:
  """`pcm` trimmed, or zero-padded at the end, to exactly `samples` samples."""
  if pcm.shape[0] > samples:
    return pcm[:samples]
  if pcm.shape[0] < samples:
    return np.pad(pcm, [(0, samples - pcm.shape[0])] + [(0, 0)] * (pcm.ndim - 1))
  return pcm


def audio_duration(path: PathLike) -> float:
  """Duration of an audio file in seconds, read from its header where the format has one."""
  name = os.fspath(path)
  if not os.path.exists(name):
    raise AudioError(f"{name}: no such audio file")
  if os.path.isdir(name) or os.path.getsize(name) == 0:
    raise AudioError(f"{name}: audio file is empty (0 bytes)" if not os.path.isdir(name) else f"{name}: is a directory")
  try:
    info = sf.info(name)
    if info.frames > 0:
      return info.frames / info.samplerate
    raise AudioError(f"{name}: audio is empty (0 samples)")
  except AudioError:
    raise
  except Exception as sf_error:  # pylint: disable=broad-except
    sf_reason = _one_line(sf_error)
  try:
    import audioread  # pylint: disable=import-outside-toplevel

    with audioread.audio_open(name) as f:
      duration = float(f.duration)
  except Exception as ar_error:  # pylint: disable=broad-except
    raise AudioError(f"{name}: cannot read audio (soundfile: {sf_reason}; audioread: {_one_line(ar_error)})") from None
  if not duration > 0 or math.isinf(duration):
    raise AudioError(f"{name}: audio is empty or has no duration")
  return duration


def write_wav(path: PathLike, pcm: np.ndarray, sample_rate: int = 16000) -> None:
  """Writes mono (or [frames, channels]) PCM as 16-bit WAV; float input in [-1, 1] is clipped and rounded.

  The file appears atomically (temporary name, then rename), so a killed writer
  never leaves a truncated clip behind; parent directories are created.
  """
  name = os.fspath(path)
  samples = np.asarray(pcm)
  if samples.dtype != np.int16:
    samples = to_float32(samples, name=name)
    samples = np.clip(np.round(samples.astype(np.float64) * 2**15), -(2**15), 2**15 - 1).astype(np.int16)
  if samples.ndim not in (1, 2) or samples.shape[0] == 0:
    raise AudioError(f"{name}: expected non-empty [samples] or [samples, channels] PCM, got shape {samples.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
  tmp = f"{name}.tmp{os.getpid()}"
  try:
    sf.write(tmp, samples, int(sample_rate), subtype="PCM_16", format="WAV")
    os.replace(tmp, name)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
