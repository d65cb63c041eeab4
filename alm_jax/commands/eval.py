"""`alm-jax eval --ckpt DIR --benchmark B --data FILE --audio-root DIR --out report.json`."""

from __future__ import annotations

import argparse
import os

from alm_jax import distributed
from alm_jax.infer import placement

BENCHMARKS = ("mmau", "mmau-pro", "asr", "longaudio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, help="run directory, checkpoints folder or step folder")
  parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
  parser.add_argument("--data", required=True, help="benchmark file (published JSON, or a JSONL manifest)")
  parser.add_argument("--audio-root", default=None, help="folder relative audio paths start from")
  parser.add_argument("--out", required=True, help="report.json (a .md table and .png chart are written beside)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="prompts per generation call per group of processes holding the same batch rows "
                           "(rounded up to fill this process's batch shards)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--think", action="store_true", help="chain-of-thought prompting; the final answer is scored")
  parser.add_argument("--limit", type=int, default=None, help="only the first N items")
  placement.add_arguments(parser)
  distributed.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
  distributed.initialize_from_args(args)
  from alm_jax.eval import report as report_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.eval.predictor import ALMPredictor  # pylint: disable=import-outside-toplevel
  from alm_jax.eval.runner import EvalOptions, run_eval  # pylint: disable=import-outside-toplevel
  from alm_jax.infer.alm_generate import ALMGenerator  # pylint: disable=import-outside-toplevel

  max_new = args.max_new_tokens * (4 if args.think else 1)
  bundle = placement.load_for_generation(args.ckpt, args.mesh, args.dtype, args.config_overrides)
  generator = ALMGenerator(bundle, max_new_tokens=max_new, batch_size=args.batch_size)
  # Saved predictions name the checkpoint absolutely, so `--ckpt run` and `--ckpt ./run` resume alike.
  options = EvalOptions(checkpoint=bundle.source, batch_size=args.batch_size, think=args.think, limit=args.limit)
  data, audio_root, out = (os.path.expanduser(p) if p else p for p in (args.data, args.audio_root, args.out))
  report = run_eval(ALMPredictor(generator), args.benchmark, data, audio_root, out, options)
  if report is not None:
    print(report_lib.summary(report))
    print(f"report: {args.out}")
  return 0
