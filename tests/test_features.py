"""Parity and behaviour tests for the JAX audio front ends (Whisper log-Mel, Kaldi/BEATs fbank).

References: HF `WhisperFeatureExtractor` (torch STFT), `kaldi_native_fbank`, and
HF's float64 numpy `spectrogram` with Kaldi options where Kaldi itself refuses
the BEATs setting (128 bins at 16 kHz leave one mel bin without an FFT bin).
"""

import functools
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax.audio import features
from alm_jax.models.audio_slots import AudioTokenSpec

SR = 16000
WINDOW = 30 * SR
# float32 rounding of log10 on the chirp's weakest bins: measured worst 8.3e-5 (rfft), 9.7e-5 (matmul, one
# window at a time) and 1.05e-4 (matmul, all windows at once: XLA blocks the batched matmul differently).
# A wrong window, filter norm or clamp is off by > 1e-2.
WHISPER_TOL = 1.5e-4
FBANK_TOL = 1e-3


def _t(seconds: float) -> np.ndarray:
  return np.arange(int(round(seconds * SR))) / SR


def _whisper_clips() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  t30 = _t(30)
  clips = {
      "noise_30s": 0.1 * rng.standard_normal(WINDOW),
      "tones_30s": 0.5 * np.sin(2 * np.pi * 440 * t30) + 0.05 * np.sin(2 * np.pi * 3150.5 * t30),
      "silence_30s": np.zeros(WINDOW),
      "noise_0.5s": 0.3 * rng.standard_normal(SR // 2 + 77),  # lengths off the 160 grid test the mask's ceil
      "speechlike_7.3s": 0.2 * np.abs(np.sin(2 * np.pi * 1.7 * _t(7.3))) * rng.standard_normal(len(_t(7.3))),
      "noise_1.2s": 0.05 * rng.standard_normal(int(1.2 * SR) + 101),
      "chirp_30s": 0.4 * np.sin(2 * np.pi * (50 + 130 * t30) * t30),
      "uniform_31s": rng.uniform(-1, 1, 31 * SR),  # longer than the window: truncated
  }
  return {name: clip.astype(np.float32) for name, clip in clips.items()}


@functools.lru_cache(maxsize=None)
def _whisper_reference(n_mels: int, window: int = WINDOW):
  """HF features [B, T, n_mels] and attention mask [B, T] of the standard clips padded/truncated to `window`."""
  from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel

  clips = _whisper_clips()
  out = WhisperFeatureExtractor(feature_size=n_mels)(
      list(clips.values()), sampling_rate=SR, padding="max_length", max_length=window, return_attention_mask=True,
      return_tensors="np",
  )
  return list(clips), out["input_features"].transpose(0, 2, 1), out["attention_mask"].astype(bool)


@functools.lru_cache(maxsize=None)
def _jitted(fn_name: str, **kwargs):
  fn = getattr(features, fn_name)
  return jax.jit(lambda x: fn(x, **kwargs))


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_whisper_log_mel_matches_transformers(n_mels, method):
  names, reference, reference_mask = _whisper_reference(n_mels)
  clips = _whisper_clips()
  pcm = np.stack([features.pad_or_trim(clip, WINDOW) for clip in clips.values()])
  out = np.asarray(_jitted("whisper_log_mel", n_mels=n_mels, method=method)(pcm))
  assert out.shape == (len(names), 3000, n_mels) == reference.shape
  errors = np.abs(out - reference).max(axis=(1, 2))
  assert errors.max() <= WHISPER_TOL, dict(zip(names, errors))
  mask = np.asarray(features.whisper_frame_mask(np.array([clip.size for clip in clips.values()]), 3000))
  np.testing.assert_array_equal(mask, reference_mask)


@pytest.mark.parametrize("window", [SR, 2 * SR + 123])
def test_whisper_log_mel_short_windows_match_transformers(window):
  """Small models use windows shorter than 30 s; odd lengths give N // 160 frames, like HF."""
  names, reference, reference_mask = _whisper_reference(80, window)
  clips = _whisper_clips()
  pcm = np.stack([features.pad_or_trim(clip, window) for clip in clips.values()])
  out = np.asarray(features.whisper_log_mel(jnp.asarray(pcm)))
  assert out.shape == reference.shape == (len(names), window // 160, 80)
  assert np.abs(out - reference).max() <= WHISPER_TOL
  mask = features.whisper_frame_mask(jnp.array([clip.size for clip in clips.values()]), window // 160)
  np.testing.assert_array_equal(np.asarray(mask), reference_mask)


def test_whisper_parity_detects_wrong_window_and_mel_norm(monkeypatch):
  """The parity check above is sharp enough: a symmetric Hann or unnormalised mel triangles break it."""
  window = 2 * SR
  _, reference, _ = _whisper_reference(80, window)
  pcm = np.stack([features.pad_or_trim(clip, window) for clip in _whisper_clips().values()])

  def error():
    return float(np.abs(np.asarray(features.whisper_log_mel(pcm)) - reference).max())

  assert error() <= WHISPER_TOL
  good_filters = features.whisper_mel_filters
  with monkeypatch.context() as patch:
    patch.setattr(features, "_periodic_hann", lambda n: np.hanning(n).astype(np.float32))  # symmetric
    assert error() > 10 * WHISPER_TOL
  with monkeypatch.context() as patch:
    patch.setattr(features, "whisper_mel_filters", lambda n: good_filters(n) / good_filters(n).max(axis=0))
    assert error() > 10 * WHISPER_TOL


def test_whisper_clamp_and_values():
  """Padding sits exactly at the per-example floor max - 8 (log10), i.e. (max - 8 + 4) / 4 after scaling."""
  pcm = features.pad_or_trim(_whisper_clips()["noise_0.5s"], 4 * SR)[None]
  out = np.asarray(features.whisper_log_mel(pcm))[0]
  np.testing.assert_allclose(out[-50:], out.max() - 2.0, atol=1e-6)  # (max-8+4)/4 = scaled max - 2
  silence = np.asarray(features.whisper_log_mel(np.zeros((1, SR), np.float32)))
  np.testing.assert_array_equal(silence, np.full_like(silence, (-10.0 + 4.0) / 4.0))


def test_mel_filters_match_references():
  from transformers.audio_utils import mel_filter_bank  # pylint: disable=import-outside-toplevel
  import librosa  # pylint: disable=import-outside-toplevel

  for n_mels in (80, 128):
    ours = features.whisper_mel_filters(n_mels)
    hf = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                         sampling_rate=SR, norm="slaney", mel_scale="slaney")
    lr = librosa.filters.mel(sr=SR, n_fft=400, n_mels=n_mels, fmin=0.0, fmax=8000.0, htk=False, norm="slaney").T
    np.testing.assert_allclose(ours, hf, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours, lr, rtol=0, atol=1e-8)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # HF warns about the empty bin, as Kaldi would refuse it
    hf_kaldi = mel_filter_bank(num_frequency_bins=257, num_mel_filters=128, min_frequency=20.0, max_frequency=8000.0,
                               sampling_rate=SR, norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
  np.testing.assert_allclose(features.kaldi_mel_banks(128), hf_kaldi, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- Kaldi fbank


def _fbank_clips(seconds: float = 3.0) -> dict[str, np.ndarray]:
  """Broadband clips (every mel bin well inside float32 range of its frame's peak) and edge cases."""
  rng = np.random.default_rng(1)
  n = int(seconds * SR)
  t = _t(seconds)
  clips = {
      "noise": 0.1 * rng.standard_normal(n),
      "loud_uniform": rng.uniform(-1, 1, n),
      "quiet_noise": 3e-4 * rng.standard_normal(n),  # ~10 int16 steps
      "noise_with_dc": 0.05 * rng.standard_normal(n) + 0.3,
      "tone_in_noise": 0.5 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(n),  # 25 dB SNR
      "silence_then_noise": np.concatenate([np.zeros(n // 2), 0.2 * rng.standard_normal(n - n // 2)]),
      "silence": np.zeros(n),
  }
  return {name: clip.astype(np.float32) for name, clip in clips.items()}


def _knf_fbank(pcm: np.ndarray, num_bins: int) -> np.ndarray:
  import kaldi_native_fbank as knf  # pylint: disable=import-outside-toplevel

  options = knf.FbankOptions()
  options.frame_opts.samp_freq = SR
  options.frame_opts.dither = 0.0
  options.frame_opts.snip_edges = True
  options.frame_opts.window_type = "povey"
  options.frame_opts.preemph_coeff = 0.97
  options.frame_opts.remove_dc_offset = True
  options.frame_opts.round_to_power_of_two = True
  options.mel_opts.num_bins = num_bins
  options.mel_opts.low_freq = 20.0
  options.mel_opts.high_freq = 0.0
  options.use_energy = False
  options.use_log_fbank = True
  options.use_power = True
  fbank = knf.OnlineFbank(options)
  fbank.accept_waveform(SR, (pcm * 32768.0).tolist())
  fbank.input_finished()
  return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def _hf_kaldi_fbank(pcm: np.ndarray, num_bins: int) -> np.ndarray:
  """Kaldi fbank in float64 numpy via HF's `spectrogram` (the path ASTFeatureExtractor uses without torchaudio)."""
  from transformers import audio_utils  # pylint: disable=import-outside-toplevel

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    banks = audio_utils.mel_filter_bank(num_frequency_bins=257, num_mel_filters=num_bins, min_frequency=20.0,
                            max_frequency=SR / 2, sampling_rate=SR, norm=None, mel_scale="kaldi",
                            triangularize_in_mel_space=True)
  window = audio_utils.window_function(400, "povey", periodic=False)
  return audio_utils.spectrogram(pcm * 32768.0, window, frame_length=400, hop_length=160, fft_length=512, power=2.0,
                                 center=False, preemphasis=0.97, mel_filters=banks, log_mel="log",
                                 mel_floor=float(np.finfo(np.float32).eps), remove_dc_offset=True).T


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_kaldi_fbank_matches_kaldi_native_fbank(method):
  clips = _fbank_clips()
  pcm = np.stack(list(clips.values()))
  out = np.asarray(_jitted("kaldi_fbank", num_mel_bins=80, method=method)(pcm))
  reference = np.stack([_knf_fbank(clip, 80) for clip in clips.values()])
  assert out.shape == reference.shape == (len(clips), features.fbank_num_frames(pcm.shape[1]), 80)
  errors = np.abs(out - reference).max(axis=(1, 2))
  assert errors.max() <= FBANK_TOL, dict(zip(clips, errors))


def test_kaldi_fbank_pure_tones_within_float32_range():
  """Pure tones: bins > 15 nats (65 dB) under their frame's peak sit at float32 round-off in every float32
  implementation (kaldi-native-fbank itself is off by up to 0.6 there vs float64), so compare the rest."""
  t = _t(2.0)
  pcm = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * (100 + 700 * t) * t) + 0.02]
                 ).astype(np.float32)
  out = np.asarray(features.kaldi_fbank(pcm, num_mel_bins=80))
  reference = np.stack([_knf_fbank(clip, 80) for clip in pcm])
  in_range = reference >= reference.max(axis=-1, keepdims=True) - 15.0
  assert in_range.sum() > 2000
  assert np.abs(out - reference)[in_range].max() <= FBANK_TOL


def test_kaldi_fbank_30s_window_matches_kaldi_native_fbank():
  pcm = (0.1 * np.random.default_rng(2).standard_normal((1, WINDOW))).astype(np.float32)
  out = np.asarray(_jitted("kaldi_fbank", num_mel_bins=80)(pcm))
  assert out.shape == (1, 2998, 80)
  assert np.abs(out[0] - _knf_fbank(pcm[0], 80)).max() <= FBANK_TOL


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_kaldi_fbank_128_bins_matches_float64_kaldi(method):
  """BEATs' 128 bins: Kaldi (and kaldi-native-fbank) refuse them because mel bin 3 covers no FFT bin;
  torchaudio, which BEATs uses, leaves that bin at log(eps). Compare with HF's float64 Kaldi recipe."""
  clips = _fbank_clips(2.0)
  pcm = np.stack(list(clips.values()))
  out = np.asarray(_jitted("kaldi_fbank", num_mel_bins=128, method=method)(pcm))
  reference = np.stack([_hf_kaldi_fbank(clip, 128) for clip in clips.values()])
  assert out.shape == reference.shape
  # The narrow low bins of "tone_in_noise" fall > 15 nats under the 440 Hz peak (pre-emphasis): float32 round-off.
  in_range = reference >= reference.max(axis=-1, keepdims=True) - 15.0
  assert in_range.mean() > 0.97
  errors = np.where(in_range, np.abs(out - reference), 0.0).max(axis=(1, 2))
  assert errors.max() <= FBANK_TOL, dict(zip(clips, errors))
  np.testing.assert_array_equal(out[:, :, 3], np.log(np.finfo(np.float32).eps))
  beats = np.asarray(features.beats_fbank(pcm, method=method))
  # Two separately compiled programs: float32 sums may associate differently (seen: 1.1e-5 on an AMD EPYC
  # host with the matmul DFT), far below what a wrong mean or scale would give.
  np.testing.assert_allclose(beats, (out - 15.41663) / (2 * 6.55582), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- batching, jit, frame counting


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_batch_equals_single_examples_and_jit_equals_eager(method):
  rng = np.random.default_rng(3)
  pcm = (0.2 * rng.standard_normal((3, SR // 2))).astype(np.float32)
  pcm[1] *= 0.01  # a quiet example: its clamp must not depend on its neighbours
  whisper = functools.partial(features.whisper_log_mel, n_mels=80, method=method)
  for fn in (whisper, functools.partial(features.beats_fbank, method=method)):
    jitted = jax.jit(fn)
    batched = np.asarray(jitted(pcm))
    for i in range(3):
      np.testing.assert_allclose(np.asarray(jitted(pcm[i : i + 1]))[0], batched[i], rtol=0, atol=2e-5)
    nested = jax.eval_shape(jitted, jax.ShapeDtypeStruct((3, 1, SR // 2), jnp.float32))  # any leading dims
    assert nested.shape == (3, 1) + batched.shape[1:]
    if fn is whisper:
      assert batched.shape == (3, 50, 80)
      np.testing.assert_allclose(np.asarray(fn(pcm[1:2])), batched[1:2], rtol=0, atol=2e-5)  # eager == jit


def test_frame_counts_agree_with_audio_slots():
  spec = AudioTokenSpec()
  assert features.whisper_num_frames(spec.window_samples) == spec.mel_frames == 3000
  valid = np.array([1, 159, 160, 161, 8000, 116800, 479999, 480000, 600000])
  mask = np.asarray(features.whisper_frame_mask(valid, spec.mel_frames))
  for v, row in zip(valid, mask):
    frames = int(row.sum())
    assert frames == min(3000, -(-v // 160))
    assert row[:frames].all()
    assert spec.encoder_frames(int(v)) == (frames - 1) // 2 + 1
  beats = AudioTokenSpec(frame_source="beats", trim_padding=False)
  assert features.fbank_num_frames(WINDOW) == 2998
  for n in [0, 399, 400, 559, 560, 16000, WINDOW]:
    assert beats.encoder_frames(n) == features.fbank_num_frames(n) // 16
  for n in [400, 559, 560, 1234]:
    out = jax.eval_shape(features.kaldi_fbank, jax.ShapeDtypeStruct((1, n), jnp.float32))
    assert out.shape == (1, features.fbank_num_frames(n), 128)
    out = jax.eval_shape(features.whisper_log_mel, jax.ShapeDtypeStruct((1, n), jnp.float32))
    assert out.shape == (1, features.whisper_num_frames(n), 80)
  fbank_mask = np.asarray(features.fbank_frame_mask(np.array([399, 400, 560, 16000]), 98))
  assert fbank_mask.sum(axis=1).tolist() == [0, 1, 2, 98]


def test_pad_or_trim_and_input_checks():
  x = np.arange(5, dtype=np.float32)
  np.testing.assert_array_equal(features.pad_or_trim(x, 3), [0, 1, 2])
  np.testing.assert_array_equal(features.pad_or_trim(x[None], 7), [[0, 1, 2, 3, 4, 0, 0]])
  assert isinstance(features.pad_or_trim(x, 7), np.ndarray)
  np.testing.assert_array_equal(np.asarray(features.pad_or_trim(jnp.asarray(x), 7)), [0, 1, 2, 3, 4, 0, 0])
  with pytest.raises(ValueError, match="samples"):
    features.whisper_log_mel(jnp.zeros((1, 200)))
  with pytest.raises(ValueError, match="400 samples"):
    features.kaldi_fbank(jnp.zeros((1, 399)))
  with pytest.raises(ValueError, match="method"):
    features.whisper_log_mel(jnp.zeros((1, 1600)), method="dct")


_SHARDED_SCRIPT = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from alm_jax.audio import features
mesh = Mesh(np.array(jax.devices()), ("data",))
pcm = (0.1 * np.random.default_rng(0).standard_normal((16, 4000))).astype(np.float32)
spread = NamedSharding(mesh, P("data"))
for fn in (features.whisper_log_mel, features.beats_fbank):
  step = jax.jit(fn, out_shardings=spread)
  out = step(jax.device_put(pcm, spread))
  hlo = step.lower(jax.device_put(pcm, spread)).compile().as_text()
  single = np.concatenate([np.asarray(fn(pcm[i : i + 1], method="fft")) for i in range(16)])
  assert out.sharding.spec == P("data"), out.sharding
  assert "all-gather" not in hlo and "all-to-all" not in hlo, fn.__name__
  assert np.abs(np.asarray(out) - single).max() < 1e-4, np.abs(np.asarray(out) - single).max()
print("ok")
"""


def test_batch_sharded_over_devices_stays_sharded():
  """In a data-parallel step the features of a batch split over 8 devices are computed where the data lives."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
