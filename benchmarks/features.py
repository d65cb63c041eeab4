"""Front-end speed: jitted JAX log-Mel / fbank beside the transformers, librosa and Kaldi references.

`python benchmarks/features.py [--batch 32] [--seconds 30] [--repeats 5]` prints
Markdown tables of clips/s (compile excluded, `block_until_ready`, best and
median of the repeats) on identical inputs, and each row's max |diff| from the
reference as a check that like is compared with like. The speech-like inputs hold
pure-tone stretches, so the fbank diff shows float32 round-off in bins > 65 dB
under a frame's peak (see tests/test_features.py).
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: keep an installed libtpu from probing for a TPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alm_jax.audio import features  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(best, median) wall seconds of `fn()` over `repeats` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), statistics.median(times)


def _speech_like(batch: int, samples: int, seed: int = 0) -> np.ndarray:
  """Noise shaped by a slow random envelope plus a few tones: broadband, with quiet stretches, like speech."""
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / features.SAMPLE_RATE
  envelope = np.abs(np.sin(2 * np.pi * rng.uniform(0.5, 3.0, (batch, 1)) * t)) ** 2
  tones = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 3000, (batch, 1)) * t)
  return (0.2 * envelope * rng.standard_normal((batch, samples)) + tones).astype(np.float32)


def _whisper_log_mel_librosa(pcm: np.ndarray, n_mels: int) -> np.ndarray:
  """The same log-Mel with librosa's STFT and mel filters (numpy), for the comparison row."""
  import librosa  # pylint: disable=import-outside-toplevel

  mel = librosa.feature.melspectrogram(
      y=pcm, sr=16000, n_fft=400, hop_length=160, window="hann", center=True, pad_mode="reflect", power=2.0,
      n_mels=n_mels, fmin=0.0, fmax=8000.0, htk=False, norm="slaney",
  )[..., :-1]
  log_mel = np.log10(np.maximum(mel, 1e-10))
  log_mel = np.maximum(log_mel, log_mel.max(axis=(-2, -1), keepdims=True) - 8.0)
  return ((log_mel + 4.0) / 4.0).transpose(0, 2, 1)


def _row(name: str, best: float, median: float, batch: int, base: float, diff: float | None) -> str:
  ratio = f"{base / best:.1f}x"
  diff_text = "(reference)" if diff is None else f"{diff:.1e}"
  cells = [name, f"{best * 1e3:.0f}", f"{median * 1e3:.0f}", f"{batch / best:.1f}", f"{batch / median:.1f}", ratio,
           diff_text]
  return "| " + " | ".join(cells) + " |"


def bench_log_mel(pcm: np.ndarray, n_mels: int, repeats: int) -> list[str]:
  """Rows for the Whisper log-Mel table; the JAX row's ratio is against transformers."""
  from transformers import WhisperFeatureExtractor  # pylint: disable=import-outside-toplevel

  batch = pcm.shape[0]
  extractor = WhisperFeatureExtractor(feature_size=n_mels)
  clips = list(pcm)

  def run_hf():
    return extractor(clips, sampling_rate=16000, padding="max_length", return_tensors="np")["input_features"]

  hf_out = run_hf().transpose(0, 2, 1)
  hf_best, hf_median = _timed(run_hf, repeats)

  device_pcm = jax.device_put(pcm)
  fn = jax.jit(lambda x: features.whisper_log_mel(x, n_mels=n_mels, method="fft", examples_per_step=1))
  jax_out = np.asarray(fn(device_pcm).block_until_ready())  # compile
  jax_best, jax_median = _timed(lambda: fn(device_pcm).block_until_ready(), repeats)
  mm_fn = jax.jit(lambda x: features.whisper_log_mel(x, n_mels=n_mels, method="matmul"))
  mm_out = np.asarray(mm_fn(device_pcm).block_until_ready())
  mm_best, mm_median = _timed(lambda: mm_fn(device_pcm).block_until_ready(), repeats)

  lr_out = _whisper_log_mel_librosa(pcm, n_mels)
  lr_best, lr_median = _timed(lambda: _whisper_log_mel_librosa(pcm, n_mels), max(2, repeats // 2))

  return [
      _row("transformers `WhisperFeatureExtractor` (torch STFT)", hf_best, hf_median, batch, hf_best, None),
      _row("librosa `feature.melspectrogram` (+ log/clamp)", lr_best, lr_median, batch, hf_best,
           float(np.abs(lr_out - hf_out).max())),
      _row("**alm_jax `whisper_log_mel` (jit, method=fft, examples_per_step=1: the CPU choice)**", jax_best, jax_median,
           batch, hf_best, float(np.abs(hf_out - jax_out).max())),
      _row("alm_jax `whisper_log_mel` (jit, method=matmul, all at once: the TPU choice)", mm_best, mm_median, batch,
           hf_best, float(np.abs(hf_out - mm_out).max())),
  ]


def bench_fbank(pcm: np.ndarray, repeats: int) -> list[str]:
  """Rows for the Kaldi fbank table (80 bins: Kaldi refuses 128 bins at 16 kHz / 512-point FFT)."""
  import kaldi_native_fbank as knf  # pylint: disable=import-outside-toplevel

  batch, bins = pcm.shape[0], 80
  options = knf.FbankOptions()
  options.frame_opts.dither = 0.0
  options.frame_opts.snip_edges = True
  options.frame_opts.window_type = "povey"
  options.frame_opts.preemph_coeff = 0.97
  options.frame_opts.remove_dc_offset = True
  options.mel_opts.num_bins = bins
  options.mel_opts.low_freq = 20.0
  options.mel_opts.high_freq = 0.0
  options.use_energy = False
  scaled = [(clip * 32768.0).tolist() for clip in pcm]

  def run_knf():
    out = []
    for clip in scaled:
      fbank = knf.OnlineFbank(options)
      fbank.accept_waveform(16000, clip)
      fbank.input_finished()
      out.append(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))
    return np.stack(out)

  knf_out = run_knf()
  knf_best, knf_median = _timed(run_knf, max(2, repeats // 2))
  device_pcm = jax.device_put(pcm)
  rows = [_row("kaldi-native-fbank (C++, one clip at a time)", knf_best, knf_median, batch, knf_best, None)]
  for name, method, steps in (("**alm_jax `kaldi_fbank` (jit, method=fft, examples_per_step=1: the CPU choice)**",
                               "fft", 1),
                              ("alm_jax `kaldi_fbank` (jit, method=matmul, all at once: the TPU choice)", "matmul", 0)):
    fn = jax.jit(lambda x, m=method, k=steps: features.kaldi_fbank(x, num_mel_bins=bins, method=m, examples_per_step=k))
    jax_out = np.asarray(fn(device_pcm).block_until_ready())
    jax_best, jax_median = _timed(lambda f=fn: f(device_pcm).block_until_ready(), repeats)
    rows.append(_row(name, jax_best, jax_median, batch, knf_best, float(np.abs(knf_out - jax_out).max())))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--n-mels", type=int, default=80)
  parser.add_argument("--skip-fbank", action="store_true")
  args = parser.parse_args()
  warnings.filterwarnings("ignore")

  samples = int(args.seconds * features.SAMPLE_RATE)
  pcm = _speech_like(args.batch, samples)
  header = ["| implementation | best ms | median ms | clips/s (best) | clips/s (median) | speed vs reference (best) "
            "| max abs diff vs reference |", "|---|---:|---:|---:|---:|---:|---:|"]
  print(f"# Audio front ends: batch {args.batch} x {args.seconds:g} s, best/median of {args.repeats}")
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})\n")
  print(f"## Whisper log-Mel ({args.n_mels} bins); reference = transformers\n")
  print("\n".join(header + bench_log_mel(pcm, args.n_mels, args.repeats)))
  if not args.skip_fbank:
    print("\n## Kaldi fbank (80 bins); reference = kaldi-native-fbank\n")
    print("\n".join(header + bench_fbank(pcm, args.repeats)))


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
