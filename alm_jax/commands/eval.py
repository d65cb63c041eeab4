"""`alm-jax eval`: a checkpoint on a benchmark, answers from any source, or reports side by side.

  alm-jax eval --ckpt DIR --benchmark B --data FILE --audio-root DIR --out report.json
  alm-jax eval --predictions FILE --benchmark B [--data FILE] --out report.json   (no checkpoint, no JAX)
  alm-jax eval --compare A.json B.json ... --out comparison.json                   (or comparison.md)
"""

from __future__ import annotations

import argparse
import os

from alm_jax import distributed
from alm_jax.config import ConfigError
from alm_jax.infer import placement

BENCHMARKS = ("mmau", "mmau-pro", "asr", "longaudio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--ckpt", help="run directory, checkpoints folder or step folder")
  source.add_argument("--predictions", metavar="FILE",
                      help="score answers from any source without a checkpoint: {id, prediction} records (JSON "
                           "array or JSON Lines) matched to the benchmark's items by id, or the published MMAU "
                           "layout (benchmark records with `model_prediction` or `model_output`; then --data may "
                           "be left out)")
  source.add_argument("--compare", nargs="+", metavar="REPORT",
                      help="report.json files of one benchmark, drawn side by side: --out C.json (or C.md) gets a "
                           "table per scorer (C.md), a grouped bar chart (C.png) and the combined numbers (C.json)")
  parser.add_argument("--benchmark", choices=BENCHMARKS, help="required with --ckpt and --predictions")
  parser.add_argument("--data", default=None, help="benchmark file (published JSON, or a JSONL manifest)")
  parser.add_argument("--audio-root", default=None, help="folder relative audio paths start from")
  parser.add_argument("--out", required=True, help="report.json (a .md table and .png chart are written beside)")
  parser.add_argument("--name", default=None,
                      help="with --predictions: the report's `checkpoint` (default: the predictions file's path)")
  parser.add_argument("--labels", nargs="+", default=None,
                      help="with --compare: column names, one per report (default: each report's checkpoint, or "
                           "its file stem)")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="prompts per generation call per group of processes holding the same batch rows "
                           "(rounded up to fill this process's batch shards)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--think", action="store_true",
                      help="chain-of-thought prompting; the final answer is scored (with --predictions: score only "
                           "the final answer of each prediction)")
  parser.add_argument("--limit", type=int, default=None, help="only the first N items")
  placement.add_arguments(parser)
  distributed.add_arguments(parser)


def _check_flags(args: argparse.Namespace) -> None:
  """Flags that belong to another mode are refused rather than silently ignored."""
  mode = "--compare" if args.compare else "--predictions" if args.predictions else "--ckpt"
  if args.name is not None and mode != "--predictions":
    raise ConfigError("--name", "only with --predictions")
  if args.labels is not None and mode != "--compare":
    raise ConfigError("--labels", "only with --compare")
  if mode == "--compare":
    for flag, value in (("--data", args.data), ("--think", args.think), ("--limit", args.limit)):
      if value:
        raise ConfigError(flag, "not used with --compare")
    return
  if args.benchmark is None:
    raise ConfigError("--benchmark", f"required with {mode}")
  if mode == "--ckpt" and args.data is None:
    raise ConfigError("--data", "required with --ckpt")


def run(args: argparse.Namespace) -> int:
  _check_flags(args)
  if args.compare:
    return _compare(args)
  if args.predictions:
    return _score_predictions(args)
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


def _score_predictions(args: argparse.Namespace) -> int:
  """`--predictions FILE`: read, match by id, score and write the report; no JAX, no model."""
  from alm_jax.eval import external, report as report_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.eval.runner import EvalOptions  # pylint: disable=import-outside-toplevel

  predictions, data, audio_root, out = (os.path.expanduser(p) if p else p
                                        for p in (args.predictions, args.data, args.audio_root, args.out))
  options = EvalOptions(checkpoint=args.name or "", think=args.think, limit=args.limit, progress=False)
  report = external.score_file(args.benchmark, predictions, data, audio_root, out, options)
  print(report_lib.summary(report) + f", without a prediction {len(report['missing_predictions'])}")
  print(f"report: {args.out}")
  return 0


def _compare(args: argparse.Namespace) -> int:
  """`--compare A.json B.json ...`: the reports side by side in C.md, C.png and C.json."""
  from alm_jax.eval import compare  # pylint: disable=import-outside-toplevel

  combined = compare.combine([os.path.expanduser(p) for p in args.compare], args.labels)
  if args.benchmark is not None and combined["benchmark"] != args.benchmark:
    raise ConfigError("--benchmark", f"the reports are {combined['benchmark']!r} reports, not {args.benchmark!r}")
  paths = compare.write_comparison(combined, os.path.expanduser(args.out))
  print(f"{combined['benchmark']}: {len(args.compare)} reports compared: " + ", ".join(p for p in paths if p))
  return 0
