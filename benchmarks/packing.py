"""Training throughput with sequence packing off and on: real tokens/s of the real trainer on the demo corpus.

Each row is a short run of `alm_jax.train.loop.Trainer` (random init, no
validation, one checkpoint at the end, no compilation cache) on a demo stage as
`alm_jax.demo` configures it (`stage_config(configs/tiny.py, PLANS["full"],
stage, init_from="")`), with some data settings changed. Its `metrics.jsonl`
gives `tokens_per_s` (real tokens, i.e. `token_mask`, per second; compilation
excluded) and `step_time`, averaged over the log windows after the first
(`--log-every` steps of warm-up dropped). Examples per step (packed segments)
and audio window slots per step (used and all B·K: the encoders run on every
slot) come from the same pipeline config over the same batches (the plan is
deterministic). Step time is the trainer's: it includes loading the batch (the
demo config decodes in-process, `data.workers=0`).

Rows, per stage (`pretrain`: caption/transcribe pairs, one clip each, encoders
frozen; `full`: every task, everything trains):

* `unpacked`: one example per row as the demo ran before packing (16 rows;
  configs/tiny.py's L (96, 128) and K (1, 2, 4, 6); pairs one window per row);
* `packed, 8 / 10 rows`: as the demo packs them now (pairs: 8 rows of two,
  K (1, 2); questions: 10 rows of L 128, K (2, 4, 6)), about the examples per
  step of unpacked;
* `packed, 16 rows`: packing at the unpacked row count (more examples per step).

The ratio is real tokens/s over the stage's unpacked row. Timing noise: on a
shared machine the runs are sequential, so load from other jobs lands on some
rows and not others; `--repeats R` runs all cases R times, round after round,
and reports medians.

  python benchmarks/packing.py [--data DIR] [--n 1000] [--steps 30] [--log-every 10] [--stages pretrain full]
      [--repeats 1]
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

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


# One example per row, as the demo ran before packing: configs/tiny.py's buckets, 16 rows (pairs: one window).
UNPACKED = {"pretrain": {"packing": False, "batch_size": 16, "window_buckets": (1,)},
            "full": {"packing": False, "batch_size": 16, "length_buckets": (96, 128), "window_buckets": (1, 2, 4, 6)}}
# Packed rows: pairs as the demo packs them (8 rows of two, K (1, 2)); questions in one 128-token bucket with
# K (2, 4, 6) (two or three compiled shapes), 10 rows holding about the 16 examples of 16 unpacked rows.
PACKED = {"pretrain": {"packing": True, "batch_size": 8, "window_buckets": (1, 2)},
          "full": {"packing": True, "batch_size": 10, "length_buckets": (128,), "window_buckets": (2, 4, 6)}}


@dataclasses.dataclass(frozen=True)
class Case:
  """One trainer run: a demo stage with these data settings."""

  stage: str
  name: str
  data: tuple[tuple[str, object], ...] = ()

  @property
  def label(self) -> str:
    return f"{self.stage} {self.name}"

  @property
  def packing(self) -> bool:
    return bool(dict(self.data)["packing"])


def cases(stages: list[str]) -> list[Case]:
  """Per stage: one example per row (the baseline), the demo's packed rows, and packing at the baseline's 16
  rows (about twice the examples per step)."""
  out = []
  for stage in stages:
    out.append(Case(stage, "unpacked", tuple(UNPACKED[stage].items())))
    out.append(Case(stage, f"packed, {PACKED[stage]['batch_size']} rows", tuple(PACKED[stage].items())))
    out.append(Case(stage, "packed, 16 rows", tuple({**PACKED[stage], "batch_size": 16}.items())))
  return out


def run_config(case: Case, data: str, steps: int, log_every: int):
  from alm_jax.demo import DEFAULT_CONFIG, PLANS, resolve_config_path, stage_config

  plan = PLANS["full"]
  stage = next(s for s in plan.stages if s.name == case.stage)
  cfg = stage_config(resolve_config_path(DEFAULT_CONFIG), plan, stage, data, "", {})
  data_cfg = dataclasses.replace(cfg.data, **dict(case.data))
  train = dataclasses.replace(cfg.train, steps=steps, log_every=log_every, eval_batches=0, checkpoint_every=steps,
                              init_from="", compilation_cache_dir="none")
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
  return {"rows": int(batches[0]["tokens"].shape[0]),
          "examples_per_step": float(np.mean([b["segment_ids"].max(axis=1).sum() for b in batches])),
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


def packing_table(data: str, steps: int, log_every: int, stages: list[str], repeats: int) -> list[str]:
  """Runs every case `repeats` times (all cases once per round, so slow spells of a shared machine spread over
  them); real tokens/s and step time are medians over the rounds."""
  root = tempfile.mkdtemp(prefix="alm_jax_packing_")
  todo = cases(stages)
  runs: dict[Case, list[dict[str, float]]] = {case: [] for case in todo}
  for rnd in range(repeats):
    for i, case in enumerate(todo):
      runs[case].append(train_once(case, data, steps, log_every, os.path.join(root, f"r{rnd}_c{i}")))
      r = runs[case][-1]
      print(f"round {rnd + 1}/{repeats}: {case.label}: "
            f"{r['tokens_per_s']:.0f} real tokens/s, {r['step_time']:.3f} s/step, run {r['wall']:.0f} s; "
            f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
  shutil.rmtree(root, ignore_errors=True)
  header = (f"{'stage':26s} | {'packing':7s} | {'rows/step':>9s} | {'examples/step':>13s} | {'real tokens/s':>13s} | "
            f"{'step s':>7s} | {'ratio vs packing off':>20s} | windows used/slots | tokens/s per round")
  rows, base = [], {}
  for case in todo:
    rates = [r["tokens_per_s"] for r in runs[case]]
    rate, step = statistics.median(rates), statistics.median(r["step_time"] for r in runs[case])
    if not case.packing:
      base[case.stage] = rate
    ratio = rate / base[case.stage] if case.stage in base else float("nan")
    r = runs[case][0]
    rows.append(f"{case.label:26s} | {'on' if case.packing else 'off':7s} | {r['rows']:9d} | "
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
  parser.add_argument("--repeats", type=int, default=1, help="rounds over all cases (medians reported)")
  parser.add_argument("--stages", nargs="+", default=["pretrain", "full"], choices=["pretrain", "full"])
  args = parser.parse_args()
  wall = time.perf_counter()
  print(f"load average at start: {os.getloadavg()}")
  from data import demo_corpus  # benchmarks/data.py, beside this script

  data = demo_corpus(args.data, args.n)
  packing_table(data, args.steps, args.log_every, args.stages, args.repeats)
  print(f"load average at end: {os.getloadavg()}; {time.perf_counter() - wall:.0f} s in all")


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
