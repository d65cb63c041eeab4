"""`alm-jax import-salmonn CKPT.pth --whisper W --beats B.pt --llm L OUT`: a SALMONN release → a run directory.

CKPT.pth is SALMONN's own checkpoint (`{"model": trainable parameters}`: the
window Q-former, `speech_llama_proj`, `ln_speech` / `ln_audio` and the LLM's
LoRA factors); W is a Hugging Face Whisper folder, B.pt an official BEATs
checkpoint and L a Hugging Face Llama/Vicuna folder (with its tokenizer).
OUT gets `checkpoints/0` (Orbax, stage `imported`; the metadata holds the
model config and the `salmonn` chat template) and `tokenizer.json`, as
`import-hf` writes them, so `generate`, `eval` and `train.init_from=OUT` read
it. The LoRA adapters stay adapters (a `lora` stage can go on training them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

TEMPLATE = "salmonn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("ckpt", metavar="CKPT.pth", help="SALMONN checkpoint (torch file with a 'model' state dict)")
  parser.add_argument("out", metavar="OUT", help="run directory to create (checkpoints/, tokenizer.json)")
  parser.add_argument("--whisper", required=True, help="Hugging Face Whisper folder (e.g. whisper-large-v2)")
  parser.add_argument("--beats", required=True, help="official BEATs checkpoint (.pt)")
  parser.add_argument("--llm", required=True, help="Hugging Face Llama/Vicuna folder with its tokenizer")
  parser.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA alpha (default: the checkpoint's config.model.lora_alpha, else 32)")
  parser.add_argument("--qformer-heads", type=int, default=0,
                      help="Q-former attention heads (default: width / 64, as BERT)")
  parser.add_argument("--window-frames", type=int, default=17,
                      help="Whisper frames per Q-former window (SALMONN: 17 = 0.333 s)")
  parser.add_argument("--trust-pickle", action="store_true",
                      help="load pickled (not weights-only) torch files; only for sources you trust")


@dataclasses.dataclass(frozen=True)
class SalmonnSummary:
  """What `import_salmonn` wrote."""

  out: str
  num_params: int
  lora_rank: int
  lora_targets: tuple[str, ...]


def import_salmonn(ckpt: str, out: str, *, whisper: str, beats: str, llm: str, lora_alpha: float | None = None,
                   qformer_heads: int = 0, window_frames: int = 17, trust_pickle: bool = False) -> SalmonnSummary:
  """Converts a SALMONN release into the run directory `out` (see the module docstring)."""
  from alm_jax.checkpoints import orbax as ckpt_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import salmonn_pth  # pylint: disable=import-outside-toplevel
  from alm_jax.commands.import_hf import _place_fn, _tokenizer_json  # pylint: disable=import-outside-toplevel
  from alm_jax.config import to_dict  # pylint: disable=import-outside-toplevel
  from alm_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from alm_jax.errors import CheckpointError, DataError  # pylint: disable=import-outside-toplevel
  from alm_jax.params import count  # pylint: disable=import-outside-toplevel

  paths = [os.path.expanduser(p) for p in (ckpt, whisper, beats, llm)]
  ckpt, whisper, beats, llm = paths
  out = str(ckpt_lib.absolute(out))
  for path, what in ((whisper, "--whisper"), (llm, "--llm")):
    if not os.path.isdir(path):
      raise CheckpointError(f"{path}: {what} must be a Hugging Face model folder")
  if ckpt_lib.has_checkpoint(out):
    raise CheckpointError(f"{out}: already holds a checkpoint; choose a new directory")
  os.makedirs(out, exist_ok=True)
  tokenizer_path = os.path.join(out, "tokenizer.json")
  if not _tokenizer_json(llm, out):
    raise CheckpointError(f"{llm}: no tokenizer (SALMONN needs the LLM's tokenizer)")
  try:
    audio_id = Tokenizer.load(tokenizer_path, TEMPLATE).audio_id
  except DataError as e:
    raise CheckpointError(str(e)) from None
  imported = salmonn_pth.import_salmonn(ckpt, whisper, beats, llm, lora_alpha=lora_alpha, qformer_heads=qformer_heads,
                                        window=window_frames, trust_pickle=trust_pickle, make_place=_place_fn)
  cfg = dataclasses.replace(imported.config, audio_token_id=audio_id)
  meta = {"checkpoint": os.path.abspath(ckpt), "whisper": os.path.abspath(whisper), "beats": os.path.abspath(beats),
          "llm": os.path.abspath(llm)}
  config = {"model": to_dict(cfg), "data": {"template": TEMPLATE}, "salmonn": meta}
  params = imported.params
  with ckpt_lib.TrainCheckpointer(os.path.join(out, "checkpoints")) as checkpointer:
    checkpointer.save(0, params, stage="imported", mask={p: False for p in params}, config=config)
  return SalmonnSummary(out, count(params), cfg.llm.lora_rank, cfg.llm.lora_targets if cfg.llm.lora_rank else ())


def run(args: argparse.Namespace) -> int:
  summary = import_salmonn(args.ckpt, args.out, whisper=args.whisper, beats=args.beats, llm=args.llm,
                           lora_alpha=args.lora_alpha, qformer_heads=args.qformer_heads,
                           window_frames=args.window_frames, trust_pickle=args.trust_pickle)
  adapters = f", LoRA r{summary.lora_rank} on {'/'.join(summary.lora_targets)}" if summary.lora_rank else ""
  print(f"imported a SALMONN model ({summary.num_params / 1e6:.1f}M parameters{adapters}) from {args.ckpt} "
        f"into {summary.out}")
  return 0
