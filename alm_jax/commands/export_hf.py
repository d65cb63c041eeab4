"""`alm-jax export-hf CKPT OUT`: a run directory → a Hugging Face folder `transformers` loads.

CKPT is any checkpoint the stack reads (an `import-hf` output or a training
run; its directory, `checkpoints/` or one step folder). A Qwen2-Audio / AF3
shaped model (Whisper encoder with pooling and padding masks, MLP projector,
Qwen2/Qwen3/Llama decoder, 30 s windows) is written as
`Qwen2AudioForConditionalGeneration` / `AudioFlamingo3ForConditionalGeneration`
with LoRA adapters merged, plus the tokenizer and the side files the import
carried (`hf_files/`); anything the family cannot represent (a Q-former, BEATs)
is a `CheckpointError` saying why. Towers imported alone go back to their own
layout.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoints folder or step folder")
  parser.add_argument("out", metavar="OUT", help="folder to write (config.json, *.safetensors, tokenizer files)")
  parser.add_argument("--family", choices=("auto", "qwen2-audio", "af3", "musicflamingo", "qwen2.5-omni"), default="auto",
                      help="layout to write (auto: the imported family, else the chat template's, else the "
                           "projector's depth)")
  parser.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")


def _export_tower(ckpt: str, config: dict, out: str, max_shard_bytes: int) -> list[str]:
  """A tower imported alone (`llm/` or `encoder/whisper/` params) → its own HF layout."""
  import jax  # pylint: disable=import-outside-toplevel

  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import orbax as ckpt_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints.bundle import run_directory  # pylint: disable=import-outside-toplevel
  from alm_jax.config import from_dict  # pylint: disable=import-outside-toplevel
  from alm_jax.models.llm import LLM, LLMConfig  # pylint: disable=import-outside-toplevel
  from alm_jax.models.whisper import WhisperConfig, WhisperEncoder  # pylint: disable=import-outside-toplevel
  from alm_jax.params import ParamLayout  # pylint: disable=import-outside-toplevel

  tower, hf = config["tower"], config.get("hf") or {}
  if tower["kind"] == "whisper":
    cfg = from_dict(WhisperConfig, tower["config"], "checkpoint.tower")
    layout, prefix = ParamLayout(lambda rngs: WhisperEncoder(cfg, rngs=rngs)), "encoder/whisper/"
  else:
    cfg = from_dict(LLMConfig, tower["config"], "checkpoint.tower")
    layout, prefix = ParamLayout(lambda rngs: LLM(cfg, rngs=rngs)), "llm/"
  abstract = {prefix + p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in layout.abstract.items()}
  params = ckpt_lib.restore_params_only(ckpt, abstract)
  side = os.path.join(run_directory(ckpt), "hf_files")
  return hf_alm.export_tower(hf.get("family", tower["kind"]), cfg, params, out, extra=hf, side_files=side,
                             max_shard_bytes=max_shard_bytes)


def export_hf(ckpt: str, out: str, *, family: str = "auto", max_shard_bytes: int = 2 * 1024**3) -> list[str]:
  """Writes the checkpoint `ckpt` as a HF folder `out`; returns the weight files."""
  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import orbax as ckpt_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import bundle as bundle_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel

  ckpt = str(ckpt_lib.absolute(ckpt))  # relative to the current directory or `~/...`
  if not os.path.exists(ckpt):
    raise CheckpointError(f"{ckpt}: no such checkpoint")
  metadata = ckpt_lib.read_metadata(ckpt)
  config = metadata.config or {}
  if "tower" in config:
    return _export_tower(ckpt, config, out, max_shard_bytes)
  model_cfg, template = bundle_lib.model_config_of(metadata, ckpt)
  hf = config.get("hf") or {}
  family = hf_alm.family_of(model_cfg, template, hf) if family == "auto" else family
  hf_alm.alm_config_to_hf(model_cfg, family, source=ckpt)  # refuses unrepresentable models before loading weights
  bundle = bundle_lib.load_bundle(ckpt)
  run_dir = bundle_lib.run_directory(ckpt)
  return hf_alm.export_alm(bundle.config, bundle.params, out, family=family, base_config=hf.get("config"),
                           side_files=os.path.join(run_dir, "hf_files"),
                           tokenizer=os.path.join(run_dir, "tokenizer.json"), max_shard_bytes=max_shard_bytes,
                           source=ckpt)


def run(args: argparse.Namespace) -> int:
  files = export_hf(args.ckpt, args.out, family=args.family, max_shard_bytes=int(args.max_shard_gb * 1024**3))
  print(f"wrote {args.out} ({len(files)} weight file{'s' if len(files) != 1 else ''})")
  return 0
