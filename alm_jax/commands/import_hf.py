"""`alm-jax import-hf SRC_DIR OUT [--family ...]`: a Hugging Face folder → a run directory.

OUT gets `checkpoints/0` (Orbax, stage `imported`, nothing marked trainable;
the metadata holds the model config, the chat template and the source's
`config.json` for export), `tokenizer.json`, and `hf_files/` with the
source's processor/tokenizer/generation files so `export-hf` can carry them
through. `load_bundle(OUT)` (and so `alm-jax generate --ckpt OUT`, `eval`,
`train.init_from=OUT`) reads it. A bare LLM or Whisper folder is stored the
same way under `llm/` or `encoder/whisper/` for a round trip through
`export-hf`; training starts from such towers directly via
`config.train.pretrained`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

FAMILY_CHOICES = ("auto", "qwen2-audio", "af3", "musicflamingo", "qwen2.5-omni", "qwen2", "llama", "qwen3", "whisper")
HF_FILES = "hf_files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("src", metavar="SRC_DIR",
                      help="Hugging Face model folder (config.json, *.safetensors, tokenizer files)")
  parser.add_argument("out", metavar="OUT", help="run directory to create (checkpoints/, tokenizer.json, hf_files/)")
  parser.add_argument("--family", choices=FAMILY_CHOICES, default="auto",
                      help="model family (auto: from config.json's architectures / model_type)")
  parser.add_argument("--max-windows", type=int, default=0,
                      help="30 s windows per clip (0: the family's own limit: 1 for qwen2-audio, 20 for af3 and "
                           "qwen2.5-omni, 40 for musicflamingo)")


@dataclasses.dataclass(frozen=True)
class ImportSummary:
  """What `import_hf` wrote."""

  family: str
  out: str
  num_params: int
  tokenizer: bool


def _place_fn(layout: Any):
  """Places each tensor onto the local devices as it is read (FSDP over them when shapes divide)."""
  import jax  # pylint: disable=import-outside-toplevel

  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

  rules = sharding_lib.MeshConfig().logical_rules
  devices = jax.local_devices()
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(shape=(1, -1, 1)), devices=devices)
  try:
    layout.check_divisible(mesh, rules)
  except ConfigError:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(shape=(1, 1, 1)), devices=devices[:1])
  return lambda path, array: layout.place(path, array, mesh, rules)


def _tokenizer_json(src: str, out: str) -> bool:
  """Copies SRC/tokenizer.json to OUT (converting a slow tokenizer with transformers when that is all there is)."""
  import shutil  # pylint: disable=import-outside-toplevel

  from alm_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel

  target = os.path.join(out, "tokenizer.json")
  if os.path.isfile(os.path.join(src, "tokenizer.json")):
    shutil.copy2(os.path.join(src, "tokenizer.json"), target)
    return True
  if not any(os.path.isfile(os.path.join(src, n)) for n in ("vocab.json", "tokenizer.model", "tokenizer_config.json")):
    return False
  try:
    import transformers  # pylint: disable=import-outside-toplevel

    fast = transformers.AutoTokenizer.from_pretrained(src)
    fast.backend_tokenizer.save(target)
  except Exception as e:  # noqa: BLE001 - any failure to convert is the same problem for the user
    raise CheckpointError(f"{src}: no tokenizer.json, and converting the tokenizer failed ({e})") from None
  return True


def _check_tokenizer(path: str, template: str, audio_token_id: int) -> None:
  from alm_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from alm_jax.errors import CheckpointError, DataError  # pylint: disable=import-outside-toplevel

  try:
    tokenizer = Tokenizer.load(path, template)
  except DataError as e:
    raise CheckpointError(str(e)) from None
  if tokenizer.audio_id != audio_token_id:
    raise CheckpointError(f"{path}: the audio token {tokenizer.template.audio_token} has id {tokenizer.audio_id} "
                          f"but config.json says {audio_token_id}")


def import_hf(src: str, out: str, *, family: str = "auto", max_windows: int | None = None) -> ImportSummary:
  """Converts the HF folder `src` into the run directory `out` (see the module docstring)."""
  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints import orbax as ckpt_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints.safetensors_io import SIDE_FILES, copy_side_files  # pylint: disable=import-outside-toplevel
  from alm_jax.config import to_dict  # pylint: disable=import-outside-toplevel
  from alm_jax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  from alm_jax.params import count  # pylint: disable=import-outside-toplevel

  src, out = os.path.expanduser(src), str(ckpt_lib.absolute(out))  # relative to the current directory or `~/...`
  if not os.path.isdir(src):
    raise CheckpointError(f"{src}: not a folder")
  if ckpt_lib.has_checkpoint(out):
    raise CheckpointError(f"{out}: already holds a checkpoint; choose a new directory")
  detected, hf_config = hf_alm.read_family(src, family)
  hf_meta: dict[str, Any] = {"family": detected, "source": os.path.abspath(src), "config": hf_config}
  os.makedirs(out, exist_ok=True)
  has_tokenizer = _tokenizer_json(src, out)
  if detected in hf_alm.FAMILIES:  # the tokenizer is checked before any weight is read
    template = hf_alm.FAMILIES[detected].template
    if not has_tokenizer:
      raise CheckpointError(f"{src}: no tokenizer.json (an audio-language model needs its tokenizer)")
    token_id = hf_alm.alm_config_from_hf(hf_config, detected, source=f"{src}/config.json").audio_token_id
    _check_tokenizer(os.path.join(out, "tokenizer.json"), template, token_id)
    imported = hf_alm.import_alm(src, detected, make_place=_place_fn, max_windows=max_windows)
    params, hf_meta["layout"] = imported.params, imported.layout
    config = {"model": to_dict(imported.config), "data": {"template": template}, "hf": hf_meta}
  else:
    _, tower_cfg, params, extra = hf_alm.import_tower(src, detected)
    hf_meta.update(extra)
    config = {"tower": {"kind": "whisper" if detected == "whisper" else "llm", "config": to_dict(tower_cfg)},
              "hf": hf_meta}
  copy_side_files(src, os.path.join(out, HF_FILES), SIDE_FILES, skip=("config.json",))
  with ckpt_lib.TrainCheckpointer(os.path.join(out, "checkpoints")) as checkpointer:
    checkpointer.save(0, params, stage="imported", mask={p: False for p in params}, config=config)
  return ImportSummary(detected, out, count(params), has_tokenizer)


def run(args: argparse.Namespace) -> int:
  summary = import_hf(args.src, args.out, family=args.family, max_windows=args.max_windows or None)
  print(f"imported a {summary.family} model ({summary.num_params / 1e6:.1f}M parameters) from {args.src} "
        f"into {summary.out}")
  return 0
