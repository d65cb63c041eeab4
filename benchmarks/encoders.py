"""Whisper encoder throughput: our jitted JAX encoder beside transformers' PyTorch eager encoder.

Both run whisper-base's encoder shape (6 layers, width 512, 8 heads, 80 mels)
on the same random weights (copied through our HF name map) and the same
batch of 30 s log-Mel windows, in float32 on this machine's CPU. Compilation is
excluded (one warm-up call each); timed calls alternate between the two (with
a pause between, so neither runtime's idle spinning threads slow the other) so
a busy machine slows both alike. Prints a Markdown table and the speed ratio.

  python benchmarks/encoders.py [--batch 8] [--repeats 5] [--preset base]
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="base", help="Whisper size (tiny, base, small, ...)")
  parser.add_argument("--batch", type=int, default=8, help="30 s windows per call")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def main() -> int:
  args = _parse()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from alm_jax.checkpoints import mapping  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import whisper as ckpt  # pylint: disable=import-outside-toplevel
  from alm_jax.models.whisper import CPU_ATTENTION_BLOCK, WhisperConfig  # pylint: disable=import-outside-toplevel

  config = WhisperConfig.preset(args.preset, attention_block=CPU_ATTENTION_BLOCK)  # the CPU choice
  torch.manual_seed(args.seed)
  hf_config = transformers.WhisperConfig(**ckpt.config_to_hf(config))  # the exporter's field mapping
  reference = transformers.models.whisper.modeling_whisper.WhisperEncoder(hf_config).eval()

  # The same weights in our encoder, through the HF name map (encoder-only layout: no prefix).
  _, abstract_state = nnx.split(ckpt.abstract_model(config))
  arrays = mapping.import_params(
      mapping.flat_paths(abstract_state),
      ckpt.name_map(""),
      mapping.DictReader(reference.state_dict(), "transformers.WhisperEncoder"),
  )
  state = ckpt.fill_state(abstract_state, arrays)
  graphdef = nnx.graphdef(ckpt.abstract_model(config))

  @jax.jit
  def encode(state, mel):
    return nnx.merge(graphdef, state)(mel)[0]

  frames = 2 * config.max_positions
  mel = np.random.default_rng(args.seed).normal(size=(args.batch, frames, config.n_mels)).astype(np.float32)
  mel_jax = jnp.asarray(mel)
  mel_torch = torch.from_numpy(np.ascontiguousarray(mel.transpose(0, 2, 1)))

  def run_jax() -> np.ndarray:
    return jax.block_until_ready(encode(state, mel_jax))

  def run_torch() -> torch.Tensor:
    with torch.inference_mode():
      return reference(mel_torch).last_hidden_state

  start = time.perf_counter()
  ours = np.asarray(run_jax())
  compile_s = time.perf_counter() - start
  theirs = run_torch().numpy()
  error = float(np.abs(ours - theirs).max() / np.abs(theirs).max())

  times: dict[str, list[float]] = {"jax": [], "torch": []}
  cpu: dict[str, list[float]] = {"jax": [], "torch": []}
  load = [os.getloadavg()[0]]
  for _ in range(args.repeats):
    for name, fn in (("jax", run_jax), ("torch", run_torch)):
      time.sleep(1.0)  # let the other runtime's worker threads stop spinning
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      times[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
    load.append(os.getloadavg()[0])

  audio_s = args.batch * frames / 100.0
  jax_s, torch_s = statistics.median(times["jax"]), statistics.median(times["torch"])
  print(f"Whisper-{args.preset} encoder, batch {args.batch} x 30 s, float32, CPU "
        f"({os.cpu_count()} cores, jax {jax.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads)\n")
  print("| implementation | median s / batch | min s / batch | CPU s / batch | audio s / s | speed vs torch |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  rows = (("alm_jax (jax.jit)", "jax"), (f"transformers (torch eager, {reference.config._attn_implementation})", "torch"))
  for label, name in rows:
    median = statistics.median(times[name])
    print(f"| {label} | {median:.2f} | {min(times[name]):.2f} | {statistics.median(cpu[name]):.2f} | "
          f"{audio_s / median:.0f} | {torch_s / median:.2f}x |")
  print(f"\nratio (torch / jax, medians): {torch_s / jax_s:.2f}; JAX compile + first call {compile_s:.1f} s; "
        f"max abs diff {error:.1e} of the output scale; {args.repeats} alternating repeats; "
        f"1-min load average {min(load):.1f}-{max(load):.1f} (other processes share these cores).")
  return 0


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  code = main()
  _run_info.stamp(__file__, "end")
  raise SystemExit(code)
