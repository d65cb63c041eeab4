"""`alm-jax` command line: parse, load config, dispatch — no logic here.

Each subcommand lives in `alm_jax/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when
their command runs, so `alm-jax --help` is instant. Config overrides
(`--config.train.steps=20`) are collected before argparse sees the line and
handed to the command as `args.config_overrides`.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import sys
from typing import Sequence

from alm_jax.config import ConfigError
from alm_jax.errors import UserError

COMMANDS = {
    "demo": "Build the synthetic corpus, train a tiny ALM through all stages, evaluate it.",
    "train": "Train (or resume) one stage of a model from a config.",
    "eval": "Evaluate a checkpoint on MMAU, MMAU-Pro, ASR or long-audio QA; score any predictions; compare reports.",
    "generate": "Answer a prompt about one or more audio files with a checkpoint.",
    "import-hf": "Convert a Hugging Face model folder into an alm_jax checkpoint.",
    "import-salmonn": "Convert a SALMONN release (.pth + Whisper, BEATs and Llama towers) into an alm_jax checkpoint.",
    "export-hf": "Write an alm_jax checkpoint as a Hugging Face model folder.",
    "data": "Data tools: build the synthetic corpus, compose multi-audio questions, pack manifests into ArrayRecord.",
    "compile": "Compile the train step (or the generation program) ahead of time for a device topology; print "
               "memory, collectives and a roofline.",
}


def _module_name(command: str) -> str:
  return "alm_jax.commands." + command.replace("-", "_")


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` from the other arguments."""
  rest, overrides = [], {}
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config.") :].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ConfigError(f"config.{key}", "override has no value")
        value = argv[i + 1]
        i += 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _skip_absent_tpu() -> None:
  """Keeps JAX from probing for a TPU on machines that only have libtpu installed.

  libtpu (the `[tpu]` extra, for ahead-of-time compiles) makes JAX try to
  start a TPU backend and print pages of warnings on a CPU/GPU host. With no
  TPU device files and no explicit `JAX_PLATFORMS`, pick the GPU or CPU.
  """
  if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  gpu = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="alm-jax",
      description="Train, evaluate and serve audio-language models in JAX.",
      epilog="Config overrides: --config configs/tiny.py --config.train.steps=20",
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, help_text in COMMANDS.items():
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(command=name)
    try:
      module = importlib.import_module(_module_name(name))
    except ModuleNotFoundError as e:
      if e.name != _module_name(name):
        raise
      continue
    module.add_arguments(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `alm-jax` console script; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  _skip_absent_tpu()
  try:
    argv, overrides = split_config_overrides(argv)
  except ConfigError as e:
    print(f"alm-jax: {e}", file=sys.stderr)
    return 2
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "command", None):
    parser.print_help()
    return 2
  args.config_overrides = overrides
  try:
    module = importlib.import_module(_module_name(args.command))
  except ModuleNotFoundError as e:
    if e.name != _module_name(args.command):
      raise
    print(f"alm-jax: '{args.command}' is not available in this build", file=sys.stderr)
    return 2
  try:
    return int(module.run(args) or 0)
  except ConfigError as e:
    print(f"alm-jax: {e}", file=sys.stderr)
    return 2
  except UserError as e:
    print(f"alm-jax: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("alm-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
