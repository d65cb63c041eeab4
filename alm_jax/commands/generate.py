"""`alm-jax generate --ckpt DIR --audio a.wav [--audio b.wav] --prompt "..."`: print the answer."""

from __future__ import annotations

import argparse

from alm_jax import distributed
from alm_jax.infer import placement


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--ckpt", required=True, help="run directory, checkpoints folder or step folder")
  parser.add_argument("--audio", action="append", default=[], required=True,
                      help="an audio file (repeat for several clips; refer to them as <audio 1>, <audio 2>...)")
  parser.add_argument("--prompt", required=True, help="the question or instruction")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  placement.add_arguments(parser)
  distributed.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
  distributed.initialize_from_args(args)
  from alm_jax.audio.io import load_audio  # pylint: disable=import-outside-toplevel
  from alm_jax.infer.alm_generate import ALMGenerator, user_prompt  # pylint: disable=import-outside-toplevel
  from alm_jax.infer.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel

  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  audio = [load_audio(path) for path in args.audio]  # bad files fail here, before the model loads
  bundle = placement.load_for_generation(args.ckpt, args.mesh, args.dtype, args.config_overrides)
  generator = ALMGenerator(bundle, max_new_tokens=args.max_new_tokens, sampling=sampling, batch_size=1,
                           seed=args.seed)
  answer = generator([user_prompt(args.prompt, audio)])[0]
  if distributed.is_main_process():
    print(answer)
  return 0
