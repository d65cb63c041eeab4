"""Decode speed of our jitted generation vs transformers `generate` (PyTorch CPU), same random weights.

A random Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads / 2 kv
heads, FFN 4864, vocab 151936, tied, float32) generates 128 greedy tokens
from a 32-token prompt at batch 1 and 8, with no stop token so both sides do
all the steps. Decode tokens/s = batch × 127 / (time for 128 new tokens −
time for 1 new token), i.e. the prefill and first token are excluded;
compilation is timed separately (ahead of time) and excluded. transformers
runs under `torch.inference_mode` with the faster of 1 or all torch threads
(its OpenMP threads degrade sharply when other processes share the cores).
Prints a Markdown table.

  python benchmarks/generate.py [--batches 1 8] [--new 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--new", type=int, default=128, help="new tokens per row")
  parser.add_argument("--prompt", type=int, default=32, help="prompt length")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layers", type=int, default=24, help="fewer for a quick smoke run")
  args = parser.parse_args()

  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from alm_jax.checkpoints import hf_llm, mapping
  from alm_jax.infer import generate as gen

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(
      hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers, num_attention_heads=14,
      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
      max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0,
  )
  ref = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  cfg = hf_llm.llm_config_from_hf(hf_cfg.to_dict())
  model = hf_llm.import_hf(mapping.DictReader(ref.state_dict(), "torch state dict"), cfg)
  graphdef, state = nnx.split(model)
  del model

  def run_ours(ids: np.ndarray, new: int):
    out = gen.generate((graphdef, state), ids, max_new_tokens=new, stop_tokens=(), length_bucket=1)
    out.tokens.block_until_ready()
    return out

  def compile_seconds(ids: np.ndarray, new: int) -> float:
    """Ahead-of-time compile of the same program `generate` runs (timed on its own)."""
    t0 = time.perf_counter()
    gen._generate_jit.lower(
        graphdef, state, jax.numpy.asarray(ids), None, jax.numpy.ones(ids.shape, bool), jax.random.key(0),
        jax.numpy.full((8,), -1, jax.numpy.int32), max_new_tokens=new, sampling=gen.SamplingConfig(), pad_id=0,
        cache_dtype=None,
    ).compile()
    return time.perf_counter() - t0

  def run_hf(x, new: int):
    return ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, pad_token_id=0,
                        eos_token_id=None)

  def best_torch_threads(x) -> int:
    """torch's OpenMP threads suffer badly from other load on few cores: use whichever count is faster."""
    timings = {}
    for threads in sorted({1, torch.get_num_threads()}):
      torch.set_num_threads(threads)
      run_hf(x, 4)
      t0 = time.perf_counter()
      run_hf(x, 12)
      timings[threads] = time.perf_counter() - t0
    return min(timings, key=timings.get)

  def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out

  def measure(ids: np.ndarray) -> dict:
    """Median wall times of 1 and `new` new tokens, both sides interleaved so they see the same machine load."""
    ids32 = ids.astype(np.int32)
    x = torch.from_numpy(ids)
    run_ours(ids32, 1)  # compile + warm-up
    run_ours(ids32, args.new)
    with torch.inference_mode():
      run_hf(x, 2)
      times = {"ours_1": [], "ours_n": [], "hf_1": [], "hf_n": []}
      for _ in range(args.repeats):
        for name, fn in (("ours_1", lambda: run_ours(ids32, 1)), ("hf_1", lambda: run_hf(x, 1)),
                         ("ours_n", lambda: run_ours(ids32, args.new)), ("hf_n", lambda: run_hf(x, args.new))):
          seconds, out = timed(fn)
          times[name].append(seconds)
          if name == "ours_n":
            times["ours_tokens"] = np.asarray(out.tokens)
          elif name == "hf_n":
            times["hf_tokens"] = out[:, ids.shape[1]:].numpy()
    return {k: (statistics.median(v) if k.endswith(("_1", "_n")) else v) for k, v in times.items()}

  rows = []
  load_before = os.getloadavg()[0]
  all_threads = torch.get_num_threads()
  rng = np.random.default_rng(0)
  for batch in args.batches:
    ids = rng.integers(1, hf_cfg.vocab_size, (batch, args.prompt)).astype(np.int64)
    compile_n = compile_seconds(ids.astype(np.int32), args.new)
    torch.set_num_threads(all_threads)
    with torch.inference_mode():
      threads = best_torch_threads(torch.from_numpy(ids))
    torch.set_num_threads(threads)
    m = measure(ids)
    steps = args.new - 1
    ours_tps = batch * steps / (m["ours_n"] - m["ours_1"])
    hf_tps = batch * steps / (m["hf_n"] - m["hf_1"])
    agree = float((m["ours_tokens"] == m["hf_tokens"]).mean())
    rows.append((batch, ours_tps, hf_tps, ours_tps / hf_tps, m["ours_n"], m["hf_n"], compile_n, threads, agree))
    print(f"batch {batch}: ours {ours_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s ({threads} torch threads)",
          flush=True)

  print()
  print(f"Decode speed, random Qwen2-0.5B-shaped model ({args.layers} layers), float32, CPU "
        f"({os.cpu_count()} cores, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}), "
        f"prompt {args.prompt}, {args.new} new tokens, greedy, median of {args.repeats}; "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
  print()
  print("| batch | ours decode tok/s | transformers decode tok/s | ratio | ours total s | transformers total s "
        "| ours compile s | torch threads | same tokens |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for batch, o, h, r, on, hn, cn, threads, agree in rows:
    print(f"| {batch} | {o:.1f} | {h:.1f} | {r:.2f}x | {on:.2f} | {hn:.2f} | {cn:.1f} | {threads} | {agree:.0%} |")


if __name__ == "__main__":
  main()
