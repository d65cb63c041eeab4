"""`alm-jax train --config C --workdir W`: train one stage (resumes if W has a checkpoint)."""

from __future__ import annotations

import argparse
import os

from alm_jax import distributed


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py or configs/tiny.py:lora")
  parser.add_argument("--workdir", required=True,
                      help="output folder: checkpoints/, tensorboard/, metrics.jsonl (rerun to resume)")
  distributed.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
  from alm_jax.run_config import load_run_config  # pylint: disable=import-outside-toplevel

  cfg = load_run_config(args.config, args.config_overrides)  # validated before anything heavy
  distributed.initialize_from_args(args)
  from alm_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel

  result = Trainer(cfg, os.path.expanduser(args.workdir)).run()  # relative paths start at the current directory
  if distributed.is_main_process() and result:
    print(f"done: step {result.get('step')} loss {result.get('loss', float('nan')):.4f}; "
          f"checkpoints in {args.workdir}/checkpoints, TensorBoard logs in {args.workdir}/tensorboard")
  return 0
