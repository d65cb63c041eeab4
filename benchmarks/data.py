"""Host input-pipeline throughput (examples/s) and padding with sequence packing off and on.

Two sections, both on the grain pipeline of `alm_jax.data.pipeline`, train split:

1. Throughput: builds (or reuses) the synthetic demo corpus, then times decode +
   resample + tokenise + batch with 0 (in-process), 1 and 2 decoding worker
   processes (30 s windows, packing off, as before packing existed). Worker
   start-up is excluded (the first batches are a warm-up).
2. Padding (`--padding-batches` batches per row of the table, in-process): for
   `data.packing` off and on, the share of the B·L token slots that are padding
   (1 - real tokens / B·L, summed over batches), the share of the B·K audio
   window slots that are padding (`audio_clip < 0`), examples per batch (packed
   segments) and examples/s, on
   (a) the demo corpus, for the `pretrain` stage (caption/transcribe pairs)
       and the `full` stage (every task), with the data config and
       `model.token_spec()` of `alm_jax.demo.stage_config(configs/tiny.py,
       PLANS["full"], stage)`: packing off as the demo ran before packing (16
       rows, L (96, 128), K (1, 2, 4, 6); pairs K 1), packing on with the rows
       of `benchmarks/packing.py` (pairs: 8 rows, K (1, 2), as the demo packs
       them; questions: 10 rows, L 128, K (2, 4, 6));
   (b) a corpus with a realistic length spread (`--spread-n` examples, written
       once to a temp dir): transcribe pairs of one clip of uniform 1-30 s of
       tone + noise and an answer of uniform 1-200 tokens (random words, exact
       token count under the demo tokenizer, which it reuses), with a Whisper-
       style 30 s window spec (`AudioTokenSpec(window_seconds=30, max_windows=1,
       pool=True)`: 25-750 audio tokens per clip), `length_buckets` (256, 512,
       1024), default window buckets (1, 2, 4).

`--padding-warmup` batches are dropped first (packing fills a pool of
4·batch_size open rows before its first batch). examples/s is the in-process
rate over the measured batches (loaded and collated), so it reflects the same
single core as the padding numbers, not the worker-process rate of section 1.

  python benchmarks/data.py [--data DIR] [--n 1000] [--batches 100] [--workers 0 1 2]
      [--padding-batches 40] [--spread-n 320] [--skip-throughput] [--skip-padding]
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def measure(data: str, workers: int, batches: int, warmup: int, batch_size: int, window_seconds: float) -> float:
  """Examples per second over `batches` batches after `warmup` batches (packing off)."""
  from alm_jax.data.pipeline import DataConfig, make_dataset
  from alm_jax.data.tokenizer import Tokenizer
  from alm_jax.models.audio_slots import AudioTokenSpec

  spec = AudioTokenSpec(window_seconds=window_seconds, max_windows=1, pool=True)
  tok = Tokenizer.load(os.path.join(data, "tokenizer.json"), "tiny")
  cfg = DataConfig.from_config({"path": data, "batch_size": batch_size, "workers": workers,
                                "length_buckets": (128, 256, 512), "worker_buffer": 16, "packing": False})
  it = iter(make_dataset(cfg, spec, tok, split="train", process_index=0, process_count=1))
  try:
    for _ in range(warmup):
      next(it)
    start, examples = time.perf_counter(), 0
    for _ in range(batches):
      examples += int((next(it)["example_id"] >= 0).sum())
    return examples / (time.perf_counter() - start)
  finally:
    it.close()


def batch_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """Real / total token slots, used / total window slots and examples (packed segments) of one batch."""
  b, length = batch["tokens"].shape
  k = batch["audio_clip"].shape[1]
  return {
      "real_tokens": int(batch["token_mask"].sum()), "token_slots": b * length,
      "used_windows": int((batch["audio_clip"] >= 0).sum()), "window_slots": b * k,
      "examples": int(batch["segment_ids"].max(axis=1).sum()),  # segments are 1..n in each row, 0 on padding
  }


def padding_stats(cfg, spec, tokenizer, batches: int, warmup: int) -> dict[str, float]:
  """Padding shares, examples per batch and examples/s over `batches` train batches after `warmup`."""
  from alm_jax.data.pipeline import make_dataset

  it = iter(make_dataset(cfg, spec, tokenizer, split="train", process_index=0, process_count=1))
  try:
    for _ in range(warmup):
      next(it)
    totals: dict[str, int] = {}
    shapes: dict[tuple[int, int], int] = {}
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
      for key, value in batch_counts(batch).items():
        totals[key] = totals.get(key, 0) + value
      shape = (batch["tokens"].shape[1], batch["audio"].shape[1])
      shapes[shape] = shapes.get(shape, 0) + 1
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return {
      "token_padding": 1 - totals["real_tokens"] / totals["token_slots"],
      "window_padding": 1 - totals["used_windows"] / totals["window_slots"],
      "examples_per_batch": totals["examples"] / batches,
      "examples_per_s": totals["examples"] / seconds,
      "real_tokens_per_batch": totals["real_tokens"] / batches,
      "shapes": shapes,
  }


def demo_corpus(data: str | None, n: int) -> str:
  """`data`, or an `n`-example synthetic demo corpus built in a temp dir (benchmarks/packing.py uses it too)."""
  if data is not None:
    return data
  from alm_jax.data.synth import write_corpus

  data = os.path.join(tempfile.mkdtemp(prefix="alm_jax_bench_"), "synth")
  summary = write_corpus(data, n, seed=0)
  print(f"built a {n}-example demo corpus in {summary['seconds']:.1f} s at {data}")
  return data


def demo_cases(data: str) -> list[tuple[str, object, object, object]]:
  """(name, unpacked DataConfig, packed DataConfig, spec) of the demo stages: packed as `alm_jax.demo` configures
  them now, unpacked as it ran before packing (configs/tiny.py's buckets, 16 rows; pairs one window per row)."""
  from alm_jax.demo import DEFAULT_CONFIG, PLANS, resolve_config_path, stage_config

  plan = PLANS["full"]
  stages = {s.name: s for s in plan.stages}
  unpacked = {"pretrain": {"batch_size": 16, "window_buckets": (1,)},
              "full": {"batch_size": 16, "length_buckets": (96, 128), "window_buckets": (1, 2, 4, 6)}}
  packed = {"pretrain": {"batch_size": 8, "window_buckets": (1, 2)},
            "full": {"batch_size": 10, "length_buckets": (128,), "window_buckets": (2, 4, 6)}}
  cases = []
  for name in ("pretrain", "full"):
    cfg = stage_config(resolve_config_path(DEFAULT_CONFIG), plan, stages[name], data, "", {})
    cases.append((f"demo {name}", dataclasses.replace(cfg.data, packing=False, **unpacked[name]),
                  dataclasses.replace(cfg.data, packing=True, **packed[name]), cfg.model.token_spec()))
  return cases


def write_spread_corpus(out: str, n: int, tokenizer, seed: int = 0, seconds=(1.0, 30.0),
                        answer_tokens=(1, 200)) -> dict:
  """Transcribe pairs: one clip of uniform `seconds` (tone + noise, 16 kHz int16 wav) and an answer of uniform
  `answer_tokens` tokens under `tokenizer` (random words); writes `out/train.jsonl` and `out/audio/`."""
  import soundfile as sf

  rng = np.random.default_rng(seed)
  words = ("the a to of and in is it you that he was for on are with as his they be at one have this from or "
           "had by word but what some we can out other were all there when up use your how said an each she which "
           "do their time if will way about many then them write would like so these her long make thing see him "
           "two has look more day could go come did number sound no most people my over know water than call first "
           "who may down side been now find any new work part take get place made live where after back little only "
           "round man year came show every good me give our under name very through just form sentence great think "
           "say help low line differ turn cause much mean before move right boy old too same tell does set three "
           "want air well also play small end put home read hand port large spell add even land here must big high "
           "such follow act why ask men change went light kind off need house picture try us again animal point "
           "mother world near build self earth father head stand own page should country found answer school grow "
           "study still learn plant cover food sun four between state keep eye never last let thought city tree "
           "cross farm hard start might story saw far sea draw left late run don't while press close night real "
           "life few north open seem together next white children begin got walk example ease paper group always "
           "music those both mark often letter until mile river car feet care second book carry took science eat "
           "room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main").split()
  os.makedirs(os.path.join(out, "audio"), exist_ok=True)
  lines, seconds_total, tokens_total = [], 0.0, 0
  for i in range(n):
    dur = float(rng.uniform(*seconds))
    samples = int(dur * 16000)
    t = np.arange(samples) / 16000
    pcm = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(samples)
    rel = os.path.join("audio", f"s{i:05d}.wav")
    sf.write(os.path.join(out, rel), (pcm * 32767).astype(np.int16), 16000, subtype="PCM_16")
    target = int(rng.integers(answer_tokens[0], answer_tokens[1] + 1))
    ids: list[int] = []
    while len(ids) < target:  # whole words until the answer reaches its token count, then cut to it exactly
      ids += tokenizer.encode((" " if ids else "") + str(rng.choice(words)))
    text = tokenizer.decode(ids[:target])
    lines.append({"id": f"spread-{i:05d}", "audio": [rel], "text": text.strip() or "a", "task": "transcribe",
                  "category": "speech", "sub_category": "transcribe", "split": "train"})
    seconds_total += dur
    tokens_total += target
  with open(os.path.join(out, "train.jsonl"), "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  return {"n": n, "mean_seconds": seconds_total / n, "mean_answer_tokens": tokens_total / n}


def padding_table(data: str, args: argparse.Namespace) -> None:
  """The padding table: demo stages and the length-spread corpus, packing off and on."""
  from alm_jax.data.pipeline import DataConfig
  from alm_jax.data.tokenizer import Tokenizer
  from alm_jax.models.audio_slots import AudioTokenSpec

  tok_file = os.path.join(data, "tokenizer.json")
  cases = demo_cases(data)
  start = time.perf_counter()
  spread = os.path.join(tempfile.mkdtemp(prefix="alm_jax_spread_"), "spread")
  summary = write_spread_corpus(spread, args.spread_n, Tokenizer.load(tok_file, "tiny"), seed=0)
  print(f"built a {summary['n']}-example length-spread corpus in {time.perf_counter() - start:.1f} s at {spread} "
        f"(mean clip {summary['mean_seconds']:.1f} s, mean answer {summary['mean_answer_tokens']:.0f} tokens)")
  spread_cfg = DataConfig.from_config({"path": spread, "tokenizer": tok_file, "batch_size": args.batch_size,
                                       "length_buckets": (256, 512, 1024), "workers": 0})
  cases.append(("spread 1-30 s / 1-200 tok", dataclasses.replace(spread_cfg, packing=False), spread_cfg,
                AudioTokenSpec(window_seconds=30.0, max_windows=1, pool=True)))
  header = (f"{'corpus':28s} | {'packing':7s} | {'rows':>4s} | {'token padding %':>15s} | {'window padding %':>16s} | "
            f"{'examples/batch':>14s} | {'examples/s':>10s} | (L, K) batches")
  rows = []
  for name, off, on, spec in cases:
    tok = Tokenizer.load(on.tokenizer or tok_file, on.template)
    for packing, cfg in ((False, off), (True, on)):
      c = dataclasses.replace(cfg, workers=0)
      s = padding_stats(c, spec, tok, args.padding_batches, args.padding_warmup)
      shapes = " ".join(f"({l},{k})x{n}" for (l, k), n in sorted(s["shapes"].items()))
      rows.append(f"{name:28s} | {'on' if packing else 'off':7s} | {c.batch_size:4d} | "
                  f"{100 * s['token_padding']:15.1f} | {100 * s['window_padding']:16.1f} | "
                  f"{s['examples_per_batch']:14.1f} | {s['examples_per_s']:10.1f} | {shapes}")
      print(rows[-1], file=sys.stderr, flush=True)  # progress; the table follows on stdout
  shutil.rmtree(os.path.dirname(spread), ignore_errors=True)
  print(f"\npadding over {args.padding_batches} train batches per row (after {args.padding_warmup} warm-up), "
        "in-process decoding:")
  print(header)
  print("\n".join(rows))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="corpus folder from `alm-jax data synth` (default: build one in a temp dir)")
  parser.add_argument("--n", type=int, default=1000, help="examples to synthesise when --data is not given")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--window-seconds", type=float, default=30.0, help="encoder window (30 s for Whisper)")
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--padding-batches", type=int, default=40, help="batches per row of the padding table")
  parser.add_argument("--padding-warmup", type=int, default=2)
  parser.add_argument("--spread-n", type=int, default=320, help="examples of the length-spread corpus")
  parser.add_argument("--skip-throughput", action="store_true", help="only the padding table")
  parser.add_argument("--skip-padding", action="store_true", help="only the worker throughput")
  args = parser.parse_args()
  wall = time.perf_counter()
  print(f"load average at start: {os.getloadavg()}")
  data = demo_corpus(args.data, args.n)
  if not args.skip_throughput:
    print(f"pipeline: train split, packing off, batch {args.batch_size}, {args.window_seconds:g} s windows, "
          f"{os.cpu_count()} CPUs")
    for workers in args.workers:
      rate = measure(data, workers, args.batches, args.warmup, args.batch_size, args.window_seconds)
      label = "in-process" if workers == 0 else f"{workers} worker process{'es' if workers > 1 else ''}"
      print(f"  {label:>20}: {rate:8.1f} examples/s", flush=True)
  if not args.skip_padding:
    padding_table(data, args)
  print(f"load average at end: {os.getloadavg()}; {time.perf_counter() - wall:.0f} s in all")


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
