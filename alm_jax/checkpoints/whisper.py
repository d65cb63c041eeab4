"""Whisper encoder checkpoints: Hugging Face folders, openai-whisper `.pt` files, and export.

One name map per layout, written relative to the encoder root so a bigger
model can prefix it (`model.encoder.` in `WhisperForConditionalGeneration`,
`encoder.` in `WhisperModel`, `audio_tower.` in Qwen2-Audio / AF3). Importers
build the encoder abstractly (`nnx.eval_shape`), fill it tensor by tensor with
`mapping.import_params` (so every missing, unexpected or mis-shaped tensor is
reported in one `CheckpointError`), and return `(config, state)`;
`whisper_model(config, state)` turns that into a ready `WhisperEncoder`.
The checkpoint configs are read here too (`config_from_hf`,
`config_from_openai_dims`; `config_to_hf` for export).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.checkpoints import mapping
from alm_jax.checkpoints.mapping import CONV1D, LINEAR, LINEAR_IN2, RESHAPE, NameMap, Rule
from alm_jax.checkpoints.safetensors_io import SafetensorsReader, read_json, write_safetensors
from alm_jax.config import ConfigError, from_dict
from alm_jax.errors import CheckpointError
from alm_jax.models.whisper import WhisperConfig, WhisperEncoder, sinusoids


# ---------------------------------------------------------------------------
# Checkpoint configs (HF config.json, openai `dims`) ↔ WhisperConfig.

# HF `model_type`s whose encoder pools and masks padding (Qwen2-Audio, Audio Flamingo 3).
POOLED_MODEL_TYPES = ("qwen2_audio_encoder", "audioflamingo3_encoder")


def config_from_hf(config: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
  """Our `WhisperConfig` from a HF `config.json` dict: Whisper, Qwen2-Audio(-encoder) or AF3(-encoder).

  A composite config's `audio_config` is used; the Qwen2-Audio / AF3 encoder
  types turn on `pool` and `mask_padding`. Missing keys take HF defaults.
  """
  c = config.get("audio_config") or config
  pooled = c.get("model_type", "whisper") in POOLED_MODEL_TYPES
  def first(*keys: str, default: Any) -> Any:  # Whisper names, then the newer generic ones (AF3)
    return next((c[k] for k in keys if k in c), default)

  values = dict(
      n_mels=c.get("num_mel_bins", 80),
      d_model=first("d_model", "hidden_size", default=384),
      num_layers=first("encoder_layers", "num_hidden_layers", default=4),
      num_heads=first("encoder_attention_heads", "num_attention_heads", default=6),
      ffn_dim=first("encoder_ffn_dim", "intermediate_size", default=1536),
      max_positions=c.get("max_source_positions", 1500),
      activation=c.get("activation_function", "gelu"),
      pool=pooled,
      mask_padding=pooled,
  )
  values.update(overrides)
  return from_dict(WhisperConfig, values, "whisper")


def config_from_openai_dims(dims: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
  """Our `WhisperConfig` from an openai-whisper checkpoint's `dims` dict (FFN width is 4 × state)."""
  try:
    values = dict(
        n_mels=dims["n_mels"],
        d_model=dims["n_audio_state"],
        num_layers=dims["n_audio_layer"],
        num_heads=dims["n_audio_head"],
        ffn_dim=4 * dims["n_audio_state"],
        max_positions=dims["n_audio_ctx"],
    )
  except KeyError as e:
    raise ConfigError(f"dims.{e.args[0]}", "missing from the openai-whisper checkpoint") from None
  values.update(overrides)
  return from_dict(WhisperConfig, values, "whisper")


def config_to_hf(config: WhisperConfig) -> dict[str, Any]:
  """The encoder fields of a HF `WhisperConfig` for `config` (for export)."""
  return dict(
      model_type="whisper",
      num_mel_bins=config.n_mels,
      d_model=config.d_model,
      encoder_layers=config.num_layers,
      encoder_attention_heads=config.num_heads,
      encoder_ffn_dim=config.ffn_dim,
      max_source_positions=config.max_positions,
      activation_function=config.activation,
  )


# ---------------------------------------------------------------------------
# Name maps.


def _layer_rules(attn: str, q: str, k: str, v: str, o: str, attn_ln: str, mlp_ln: str, fc1: str, fc2: str) -> list:
  """Per-layer rules; arguments are the foreign names below `<layers>.{i}.`."""
  rules = []
  for ours, theirs in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
    rules.append(Rule(f"layers/{{i}}/self_attn/{ours}/kernel", f"{attn}.{{i}}.{theirs}.weight", LINEAR))
    if ours != "k_proj":
      rules.append(Rule(f"layers/{{i}}/self_attn/{ours}/bias", f"{attn}.{{i}}.{theirs}.bias", RESHAPE))
  rules += [
      Rule("layers/{i}/self_attn/out_proj/kernel", f"{attn}.{{i}}.{o}.weight", LINEAR_IN2),
      Rule("layers/{i}/self_attn/out_proj/bias", f"{attn}.{{i}}.{o}.bias"),
  ]
  for ours, theirs in (("self_attn_layer_norm", attn_ln), ("final_layer_norm", mlp_ln)):
    rules += [
        Rule(f"layers/{{i}}/{ours}/scale", f"{attn}.{{i}}.{theirs}.weight"),
        Rule(f"layers/{{i}}/{ours}/bias", f"{attn}.{{i}}.{theirs}.bias"),
    ]
  for ours, theirs in (("fc1", fc1), ("fc2", fc2)):
    rules += [
        Rule(f"layers/{{i}}/mlp/{ours}/kernel", f"{attn}.{{i}}.{theirs}.weight", LINEAR),
        Rule(f"layers/{{i}}/mlp/{ours}/bias", f"{attn}.{{i}}.{theirs}.bias"),
    ]
  return rules


def _stem_rules(positions: str, final_norm: str) -> list:
  return [
      Rule("conv1/kernel", "conv1.weight", CONV1D),
      Rule("conv1/bias", "conv1.bias"),
      Rule("conv2/kernel", "conv2.weight", CONV1D),
      Rule("conv2/bias", "conv2.bias"),
      Rule("embed_positions", positions),
      Rule("layer_norm/scale", f"{final_norm}.weight"),
      Rule("layer_norm/bias", f"{final_norm}.bias"),
  ]


# HF `WhisperEncoder` / `Qwen2AudioEncoder` / `AudioFlamingo3Encoder` names, relative to the encoder root.
HF_ENCODER = NameMap(
    "whisper",
    _stem_rules("embed_positions.weight", "layer_norm")
    + _layer_rules(
        "layers",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "self_attn_layer_norm",
        "final_layer_norm",
        "fc1",
        "fc2",
    ),
)

# openai-whisper `AudioEncoder` names, relative to the encoder root (`encoder.` in the checkpoint).
OPENAI_ENCODER = NameMap(
    "openai-whisper",
    _stem_rules("positional_embedding", "ln_post")
    + _layer_rules(
        "blocks", "attn.query", "attn.key", "attn.value", "attn.out", "attn_ln", "mlp_ln", "mlp.0", "mlp.2"
    ),
)


def name_map(prefix: str = "model.encoder.", *, layout: str = "hf") -> NameMap:
  """The encoder map under a foreign `prefix`; tensors outside the prefix are ignored."""
  base = {"hf": HF_ENCODER, "openai": OPENAI_ENCODER}[layout]
  prefixed = base.prefixed(theirs=prefix)
  ignore = [f"^(?!{re.escape(prefix)})"] if prefix else []
  return NameMap(base.family, prefixed.rules, ignore)


# ---------------------------------------------------------------------------
# Building models from flat arrays.


def abstract_model(config: WhisperConfig) -> WhisperEncoder:
  """The encoder with shape-only parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))


def fill_state(abstract_state: nnx.State, arrays: Mapping[str, Any]) -> nnx.State:
  """An `nnx.State` shaped like `abstract_state` holding `arrays` (flat `a/b/c` paths)."""
  leaves = []
  for path, var in nnx.to_flat_state(abstract_state):
    key = "/".join(str(p) for p in path)
    leaves.append((path, var.replace(jnp.asarray(arrays[key]))))
  return nnx.from_flat_state(leaves)


def whisper_model(config: WhisperConfig, state: nnx.State) -> WhisperEncoder:
  """A `WhisperEncoder` holding `state` (as returned by the loaders)."""
  graphdef, _ = nnx.split(abstract_model(config))
  return nnx.merge(graphdef, state)


def _import(
    config: WhisperConfig,
    names: NameMap,
    reader: mapping.TensorReader,
    allow_missing: Callable[[str], bool] | None = None,
) -> nnx.State:
  _, abstract_state = nnx.split(abstract_model(config))
  targets = mapping.flat_paths(abstract_state)
  arrays = mapping.import_params(targets, names, reader, allow_missing=allow_missing)
  if "embed_positions" not in arrays:  # a checkpoint without the (sinusoidal) position buffer
    arrays["embed_positions"] = np.asarray(sinusoids(config.max_positions, config.d_model))
  return fill_state(abstract_state, arrays)


# ---------------------------------------------------------------------------
# Hugging Face folders.


def find_encoder_prefix(names: Any, source: str) -> str:
  """The prefix under which a checkpoint holds a Whisper encoder (`model.encoder.`, `audio_tower.`, ...)."""
  names = set(names)
  prefixes = sorted(
      n[: -len("conv1.weight")]
      for n in names
      if n.endswith("conv1.weight") and n[: -len("conv1.weight")] + "embed_positions.weight" in names
  )
  if not prefixes:
    raise CheckpointError(f"{source}: no Whisper encoder found (no '*conv1.weight' beside '*embed_positions.weight')")
  if len(prefixes) > 1:
    raise CheckpointError(f"{source}: several Whisper encoders ({', '.join(prefixes)}); pass prefix=")
  return prefixes[0]


def load_whisper_hf(folder: str, *, prefix: str | None = None, **overrides: Any) -> tuple[WhisperConfig, nnx.State]:
  """Imports the encoder of a HF Whisper / Qwen2-Audio / AF3 folder (config.json + safetensors).

  `prefix` (found automatically when None) is where the encoder's tensors live;
  `overrides` replace config fields (e.g. `remat="full"`). Decoder, projector
  and LLM tensors are ignored. Returns `(config, state)`.
  """
  try:
    config = config_from_hf(read_json(os.path.join(folder, "config.json")), **overrides)
  except ConfigError as e:
    raise CheckpointError(f"{folder}/config.json: {e}") from None
  reader = SafetensorsReader(folder)
  if prefix is None:
    prefix = find_encoder_prefix(reader.keys(), folder)
  return config, _import(config, name_map(prefix), reader)


def export_whisper_hf(
    config: WhisperConfig,
    state: nnx.State | WhisperEncoder,
    folder: str,
    *,
    prefix: str = "model.encoder.",
    max_shard_bytes: int = 2 * 1024**3,
) -> list[str]:
  """Writes the encoder under HF names (+ a config.json) into `folder`; returns the weight files.

  The result loads with `transformers` `from_pretrained` (decoder weights, which
  we do not hold, are then freshly initialised there).
  """
  flat = mapping.flat_paths(state)
  files = write_safetensors(folder, mapping.export_params(flat, name_map(prefix)), max_shard_bytes=max_shard_bytes)
  hf = config_to_hf(config)
  if config.pool and config.mask_padding:
    hf["model_type"] = "qwen2_audio_encoder"
  elif prefix == "model.encoder.":
    hf["architectures"] = ["WhisperForConditionalGeneration"]
  elif prefix == "encoder.":
    hf["architectures"] = ["WhisperModel"]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return files


# ---------------------------------------------------------------------------
# openai-whisper `.pt` files.


def read_torch_checkpoint(path: str, *, trust_pickle: bool = False) -> Any:
  """`torch.load` on CPU as a `CheckpointError`-raising call (weights-only unless `trust_pickle`)."""
  import torch  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not found")
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
    hint = " (a pickled checkpoint from a source you trust loads with trust_pickle=True)" if not trust_pickle else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path}: unreadable PyTorch checkpoint: {message}{hint}") from None


def load_whisper_openai(path: str, *, trust_pickle: bool = False, **overrides: Any) -> tuple[WhisperConfig, nnx.State]:
  """Imports the encoder of an openai-whisper `.pt` (`{"dims": ..., "model_state_dict": ...}`)."""
  checkpoint = read_torch_checkpoint(path, trust_pickle=trust_pickle)
  if not isinstance(checkpoint, Mapping) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
    raise CheckpointError(f"{path}: not an openai-whisper checkpoint (expected keys 'dims' and 'model_state_dict')")
  weights = checkpoint["model_state_dict"]
  fc1 = weights.get("encoder.blocks.0.mlp.0.weight")
  if fc1 is not None and "ffn_dim" not in overrides:  # openai models use 4 x width; derived ones may not
    overrides["ffn_dim"] = int(fc1.shape[0])
  try:
    config = config_from_openai_dims(dict(checkpoint["dims"]), **overrides)
  except ConfigError as e:
    raise CheckpointError(f"{path}: {e}") from None
  reader = mapping.DictReader(weights, path)
  state = _import(
      config, name_map("encoder.", layout="openai"), reader, allow_missing=lambda p: p == "embed_positions"
  )
  return config, state
