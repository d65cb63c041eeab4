"""Training throughput with sequence packing off and on: real tokens/s of the real trainer on the demo corpus.

Each row is a short run of `alm_jax.train.loop.Trainer` (random init, no
validation, one checkpoint at the end) on a demo stage as `alm_jax.demo`
configures it (`stage_config(configs/tiny.py, PLANS["full"], stage,
init_from="")`), with `data.packing` set and the batch size / window buckets
of the row. Its `metrics.jsonl` gives `tokens_per_s` (real tokens, i.e.
`token_mask`, per second; compilation excluded) and `step_time`, averaged over
the log windows after the first (`--log-every` steps of warm-up dropped).
Examples per step (packed segments) and audio window slots per step (used
and all B·K: the encoders run on every slot) come from the same pipeline
config over the same batches (the plan is deterministic). Step time is the
trainer's: it includes loading the batch (the demo config decodes in-process,
`data.workers=0`).

Timing noise: on a shared machine the runs are sequential, so load from
other jobs lands on some rows and not others. The `pretrain` row as configured
is a control: with `window_buckets=(1,)` packing gives the same batch shapes
and the same real tokens per step as packing off, so its ratio should be 1.
`--repeats R` runs all cases R times, round after round, and reports medians.

Rows:

* `pretrain` (caption/transcribe pairs, one clip each) as configured:
  `window_buckets=(1,)`, so a row holds one window and packing cannot put two
  examples in a row (it only changes the batch order);
* `pretrain` with `window_buckets=(1, 2)`: two one-clip examples can share a row;
* `full` (every task; L (96, 128), K (1, 2, 4, 6)).

Packing with batch size B holds about twice the examples per step, so packing
on is also run at B/2 rows (about the examples per step of packing off). The
ratio is real tokens/s over the same stage and window buckets with packing off.

  python benchmarks/packing.py [--data DIR] [--n 1000] [--steps 30] [--log-every 10] [--stages pretrain full]
      [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@dataclasses.dataclass(frozen=True)
class Case:
  stage: str
  packing: bool
  batch_size: int
  window_buckets: tuple[int, ...] | None = None  # None: as the demo configures the stage

  @property
  def label(self) -> str:
    return self.stage + ("" if self.window_buckets is None else " K=" + ",".join(map(str, self.window_buckets)))


def cases(stages: list[str], batch: int) -> list[Case]:
  out = []
  for stage in stages:
    variants = [None, (1, 2)] if stage == "pretrain" else [None]
    for windows in variants:
      out.append(Case(stage, False, batch, windows))
      out.append(Case(stage, True, batch, windows))
      if not (stage == "pretrain" and windows is None):  # packing changes nothing there: no half-batch row
        out.append(Case(stage, True, batch // 2, windows))
  return out


def run_config(case: Case, data: str, steps: int, log_every: int):
  from alm_jax.demo import DEFAULT_CONFIG, PLANS, resolve_config_path, stage_config

  plan = PLANS["full"]
  stage = next(s for s in plan.stages if s.name == case.stage)
  cfg = stage_config(resolve_config_path(DEFAULT_CONFIG), plan, stage, data, "", {})
  data_cfg = dataclasses.replace(cfg.data, packing=case.packing, batch_size=case.batch_size)
  if case.window_buckets is not None:
    data_cfg = dataclasses.replace(data_cfg, window_buckets=case.window_buckets)
  train = dataclasses.replace(cfg.train, steps=steps, log_every=log_every, eval_batches=0, checkpoint_every=steps,
                              init_from="")
  return dataclasses.replace(cfg, data=data_cfg, train=train)


def batch_counts(cfg, steps: int) -> dict[str, float]:
  """Means over the first `steps` train batches of `cfg` (the batches the trainer sees): packed segments
  (examples), used audio window slots and all B·K window slots per batch."""
  import numpy as np

  from alm_jax.data.pipeline import make_dataset, tokenizer_file
  from alm_jax.data.tokenizer import Tokenizer

  tok = Tokenizer.load(tokenizer_file(cfg.data), cfg.data.template)
  it = iter(make_dataset(cfg.data, cfg.model.token_spec(), tok, split="train", seed=cfg.data.seed,
                         process_index=0, process_count=1))
  try:
    batches = [next(it) for _ in range(steps)]
  finally:
    it.close()
  return {"examples_per_step": float(np.mean([b["segment_ids"].max(axis=1).sum() for b in batches])),
          "used_windows": float(np.mean([(b["audio_clip"] >= 0).sum() for b in batches])),
          "window_slots": float(np.mean([b["audio_clip"].size for b in batches]))}


def train_once(case: Case, data: str, steps: int, log_every: int, workdir: str) -> dict[str, float]:
  from alm_jax.train.loop import Trainer

  cfg = run_config(case, data, steps, log_every)
  start = time.perf_counter()
  Trainer(cfg, workdir, quiet=True).run()
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  lines = [l for l in lines if "tokens_per_s" in l]
  later = [l for l in lines if l["step"] > log_every] or lines  # the first log window is warm-up
  return {
      "tokens_per_s": statistics.mean(l["tokens_per_s"] for l in later),
      "step_time": statistics.mean(l["step_time"] for l in later),
      **batch_counts(cfg, steps),
      "wall": wall,
  }


def packing_table(data: str, steps: int, log_every: int, stages: list[str], batch: int, repeats: int) -> list[str]:
  """Runs every case `repeats` times (all cases once per round, so slow spells of a shared machine spread over
  them); real tokens/s and step time are medians over the rounds."""
  root = tempfile.mkdtemp(prefix="alm_jax_packing_")
  todo = cases(stages, batch)
  runs: dict[Case, list[dict[str, float]]] = {case: [] for case in todo}
  for rnd in range(repeats):
    for i, case in enumerate(todo):
      runs[case].append(train_once(case, data, steps, log_every, os.path.join(root, f"r{rnd}_c{i}")))
      r = runs[case][-1]
      print(f"round {rnd + 1}/{repeats}: {case.label} packing={case.packing} B={case.batch_size}: "
            f"{r['tokens_per_s']:.0f} real tokens/s, {r['step_time']:.3f} s/step, run {r['wall']:.0f} s; "
            f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
  shutil.rmtree(root, ignore_errors=True)
  header = (f"{'stage':16s} | {'packing':7s} | {'rows/step':>9s} | {'examples/step':>13s} | {'real tokens/s':>13s} | "
            f"{'step s':>7s} | {'ratio vs packing off':>20s} | windows used/slots | tokens/s per round")
  rows, base = [], {}
  for case in todo:
    rates = [r["tokens_per_s"] for r in runs[case]]
    rate, step = statistics.median(rates), statistics.median(r["step_time"] for r in runs[case])
    if not case.packing:
      base[case.label] = rate
    ratio = rate / base[case.label] if case.label in base else float("nan")
    r = runs[case][0]
    rows.append(f"{case.label:16s} | {'on' if case.packing else 'off':7s} | {case.batch_size:9d} | "
                f"{r['examples_per_step']:13.1f} | {rate:13.0f} | {step:7.3f} | {ratio:19.2f}x | "
                f"{r['used_windows']:8.1f} / {r['window_slots']:<7.0f} | {' '.join(f'{x:.0f}' for x in rates)}")
  print(f"\ntrainer, {steps} steps per run, means over the log windows after step {log_every}, medians of "
        f"{repeats} round{'s' if repeats > 1 else ''}:")
  print(header)
  print("\n".join(rows))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="demo corpus folder (`alm-jax data synth`; default: build one in a temp dir)")
  parser.add_argument("--n", type=int, default=1000, help="examples to synthesise when --data is not given")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=0, help="rows per step (default: the demo's, 16)")
  parser.add_argument("--repeats", type=int, default=1, help="rounds over all cases (medians reported)")
  parser.add_argument("--stages", nargs="+", default=["pretrain", "full"], choices=["pretrain", "full"])
  args = parser.parse_args()
  from alm_jax.demo import PLANS

  wall = time.perf_counter()
  print(f"load average at start: {os.getloadavg()}")
  data = args.data
  if data is None:
    from alm_jax.data.synth import write_corpus

    data = os.path.join(tempfile.mkdtemp(prefix="alm_jax_bench_"), "synth")
    summary = write_corpus(data, args.n, seed=0)
    print(f"built a {args.n}-example demo corpus in {summary['seconds']:.1f} s at {data}")
  packing_table(data, args.steps, args.log_every, args.stages, args.batch_size or PLANS["full"].batch_size,
                args.repeats)
  print(f"load average at end: {os.getloadavg()}; {time.perf_counter() - wall:.0f} s in all")


if __name__ == "__main__":
  main()
