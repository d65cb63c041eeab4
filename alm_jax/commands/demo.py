"""`alm-jax demo --workdir W`: corpus → pretrain → projector → LoRA → full → evaluation."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", default="workdir/demo", help="everything goes here; rerun to resume")
  parser.add_argument("--config", default="configs/tiny.py", help="model and training recipe")
  parser.add_argument("--scale", choices=("full", "ci"), default="full",
                      help="full: the README numbers (~12.5 min on 2 CPU cores); ci: a minutes-long smoke run")
  parser.add_argument("--seed", type=int, default=0, help="corpus seed")


def run(args: argparse.Namespace) -> int:
  from alm_jax.demo import run_demo  # pylint: disable=import-outside-toplevel

  run_demo(args.workdir, scale=args.scale, config_path=args.config, seed=args.seed,
           overrides=args.config_overrides)
  return 0
