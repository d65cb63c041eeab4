"""Starting a fresh run from separately released towers (big_vision style):
a Whisper encoder (Hugging Face folder or openai-whisper `.pt`), a BEATs
encoder (official `.pt`) and a decoder LLM (Hugging Face Qwen2/Qwen3/Llama
folder), each placed into our parameter tree shard by shard.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import Mesh

from alm_jax.checkpoints import mapping
from alm_jax.errors import CheckpointError
from alm_jax.models.partitioning import Rules
from alm_jax.params import ParamLayout
from alm_jax.train.config import PretrainedConfig


@dataclasses.dataclass
class LoadedTowers:
  params: dict[str, Any]
  note: str


def _check_compatible(loaded: Any, ours: Any, fields: tuple[str, ...], source: str, key: str) -> None:
  """Raises `CheckpointError` when the checkpoint's shape fields differ from the config's."""
  bad = [f"{f}={getattr(loaded, f)} (config {getattr(ours, f)})" for f in fields if getattr(loaded, f) != getattr(ours, f)]
  if bad:
    raise CheckpointError(f"{source}: does not fit config.model.{key}: {', '.join(bad)}")


def _place_state(state: Any, prefix: str, layout: ParamLayout, mesh: Mesh, rules: Rules) -> dict[str, Any]:
  out = {}
  for path, leaf in mapping.flat_paths(state).items():
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    out[prefix + path] = layout.place(prefix + path, value, mesh, rules)
  return out


def load_pretrained_towers(cfg: PretrainedConfig, layout: ParamLayout, mesh: Mesh, rules: Rules,
                           model_cfg: Any) -> LoadedTowers:
  """Reads every configured tower; returns our flat params for them and a note."""
  params: dict[str, Any] = {}
  notes = []
  if cfg.whisper:
    from alm_jax.checkpoints import whisper as whisper_ckpt  # pylint: disable=import-outside-toplevel

    if model_cfg.whisper is None or "whisper" not in model_cfg.encoders:
      raise CheckpointError(f"{cfg.whisper}: config.train.pretrained.whisper is set but the model has no Whisper")
    form = {"scan_layers": model_cfg.whisper.scan_layers}  # stacked or per-layer paths, as the model holds them
    if cfg.whisper.endswith(".pt"):
      loaded, state = whisper_ckpt.load_whisper_openai(cfg.whisper, **form)
    else:
      loaded, state = whisper_ckpt.load_whisper_hf(cfg.whisper, **form)
    _check_compatible(loaded, model_cfg.whisper, ("n_mels", "d_model", "num_layers", "num_heads", "ffn_dim",
                                                  "max_positions"), cfg.whisper, "whisper")
    params.update(_place_state(state, "encoder/whisper/", layout, mesh, rules))
    notes.append(f"Whisper from {cfg.whisper}")
  if cfg.beats:
    from alm_jax.checkpoints import beats_pt  # pylint: disable=import-outside-toplevel

    if model_cfg.beats is None or "beats" not in model_cfg.encoders:
      raise CheckpointError(f"{cfg.beats}: config.train.pretrained.beats is set but the model has no BEATs")
    loaded, state = beats_pt.load_beats(cfg.beats, scan_layers=model_cfg.beats.scan_layers)
    _check_compatible(loaded, model_cfg.beats, ("n_mels", "patch_size", "patch_dim", "width", "num_layers",
                                                "num_heads", "ffn_dim"), cfg.beats, "beats")
    params.update(_place_state(state, "encoder/beats/", layout, mesh, rules))
    notes.append(f"BEATs from {cfg.beats}")
  if cfg.llm:
    from alm_jax.checkpoints import hf_llm  # pylint: disable=import-outside-toplevel

    if not os.path.isdir(cfg.llm):
      raise CheckpointError(f"{cfg.llm}: config.train.pretrained.llm must be a Hugging Face model folder")
    loaded = hf_llm.load_config(cfg.llm)
    _check_compatible(loaded, model_cfg.llm, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                              "num_heads", "num_kv_heads", "head_dim", "tie_embeddings"),
                      cfg.llm, "llm")
    flat = hf_llm.load_params(cfg.llm, model_cfg.llm,
                              place=lambda path, array: layout.place("llm/" + path, array, mesh, rules))
    params.update({"llm/" + p: v for p, v in flat.items()})
    notes.append(f"LLM from {cfg.llm}")
  return LoadedTowers(params, "; ".join(notes))
