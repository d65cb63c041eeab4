"""Hugging Face Qwen2/Qwen2.5/Qwen3/Llama folders ↔ our `LLM`.

Import reads `config.json` into an `LLMConfig` (`llm_config_from_hf`, the
one place that knows the HF keys; `llm_config_to_hf` is the reverse), builds
the model abstractly (no random init of billions of weights) and streams the
safetensors tensor by tensor through the family's name map, optionally placing
each tensor on devices as it is read (`place`), so the host never holds more
than one tensor in flight beside what was already placed.
Export writes `config.json`, sharded safetensors with the index file, and
copies tokenizer/generation files from the source folder; LoRA adapters are
merged into the exported kernels, and `transformers.AutoModelForCausalLM`
loads the result with the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.checkpoints import mapping
from alm_jax.checkpoints.mapping import LINEAR, LINEAR_IN2, RESHAPE, NameMap, Rule
from alm_jax.checkpoints.safetensors_io import (
    INDEX_NAME,
    SIDE_FILES,
    SINGLE_NAME,
    SafetensorsReader,
    copy_side_files,
    read_json,
    write_safetensors,
)
from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models import layers, lora
from alm_jax.models.llm import LLM, ROPE_TYPES, LLMConfig

Place = Callable[[str, np.ndarray], Any]


class WideningReader:
  """`SafetensorsReader` returning every floating tensor as float32, bfloat16 included.

  Released Qwen/Llama checkpoints are bfloat16. `safe_open(framework="numpy")`
  returns them as `ml_dtypes.bfloat16` once JAX is imported (and fails
  before), and `mapping.import_params` only widens numpy's own float types;
  here such tensors are widened, or read straight from the file (header
  offsets, memory-mapped) when numpy cannot load them, one at a time.
  """

  def __init__(self, folder: str):
    self.inner = SafetensorsReader(folder)
    self.source = folder
    index = os.path.join(folder, INDEX_NAME)
    self._file_of = read_json(index)["weight_map"] if os.path.isfile(index) else None
    self._headers: dict[str, tuple[int, dict]] = {}

  def keys(self) -> Iterable[str]:
    return self.inner.keys()

  def _header(self, filename: str) -> tuple[int, dict]:
    if filename not in self._headers:
      with open(os.path.join(self.source, filename), "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        self._headers[filename] = 8 + size, json.loads(f.read(size))
    return self._headers[filename]

  def get(self, name: str) -> np.ndarray:
    try:
      array = self.inner.get(name)
    except TypeError:  # a dtype numpy does not know (bfloat16 without ml_dtypes loaded)
      return self._read_raw(name)
    if array.dtype.name in ("bfloat16", "float16", "float64"):
      array = array.astype(np.float32)
    return array

  def _read_raw(self, name: str) -> np.ndarray:
    filename = self._file_of[name] if self._file_of is not None else SINGLE_NAME
    start, header = self._header(filename)
    info = header[name]
    begin, end = info["data_offsets"]
    raw = np.memmap(os.path.join(self.source, filename), dtype=np.uint8, mode="r", offset=start + begin,
                    shape=(end - begin,))
    if info["dtype"] == "BF16":
      array = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] == "F16":
      array = raw.view("<f2").astype(np.float32)
    else:
      raise CheckpointError(f"{self.source}/{filename}: tensor {name} has unsupported dtype {info['dtype']}")
    return array.reshape(info["shape"])


# ---------------------------------------------------------------------------
# config.json ↔ LLMConfig.

# Our family → the HF causal-LM class a config.json names.
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

# Our field → the HF key it is read from (to name the right key in errors).
_HF_KEY = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
}


def llm_config_from_hf(config: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> LLMConfig:
  """Our `LLMConfig` from a Hugging Face `config.json` dict (old- or new-style RoPE keys).

  Unsupported features (sliding windows, other activations or RoPE types)
  raise `ConfigError` naming `source:key`. `overrides` set our own fields
  (e.g. `remat`, `lora_rank`) that HF configs do not carry.
  """

  def key(name: str) -> str:
    return f"{source}:{name}"

  def get(name: str, default: Any = ConfigError, kind: type | tuple[type, ...] = (int,)) -> Any:
    if name not in config or config[name] is None:
      if default is ConfigError:
        raise ConfigError(key(name), "missing")
      return default
    value = config[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
      raise ConfigError(key(name), f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    return value

  family = config.get("model_type")
  if family not in ARCHITECTURES:
    raise ConfigError(key("model_type"), f"unsupported {family!r} (supported: {', '.join(ARCHITECTURES)})")
  act = get("hidden_act", "silu", str)
  if act not in ("silu", "swish"):
    raise ConfigError(key("hidden_act"), f"only silu (SwiGLU) is supported, got {act!r}")
  if get("use_sliding_window", False, bool):
    raise ConfigError(key("use_sliding_window"), "sliding-window attention is not supported")
  layer_types = config.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise ConfigError(key("layer_types"), f"only full_attention layers are supported, got {sorted(set(layer_types))}")

  # RoPE: transformers 5 writes `rope_parameters` (theta inside), older files `rope_theta` + `rope_scaling`.
  rope_key = "rope_parameters" if isinstance(config.get("rope_parameters"), Mapping) else "rope_scaling"
  rope = dict(config.get(rope_key) or {})
  theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ConfigError(key(f"{rope_key}.rope_type"), f"unsupported {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConfigError(key(f"{rope_key}.partial_rotary_factor"), "partial rotary embeddings are not supported")
  rope_fields: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type in ("linear", "llama3"):
    if "factor" not in rope:
      raise ConfigError(key(f"{rope_key}.factor"), "missing")
    rope_fields["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    for ours, theirs in (
        ("rope_low_freq_factor", "low_freq_factor"),
        ("rope_high_freq_factor", "high_freq_factor"),
        ("rope_original_max_positions", "original_max_position_embeddings"),
    ):
      if theirs not in rope:
        raise ConfigError(key(f"{rope_key}.{theirs}"), "missing")
      rope_fields[ours] = rope[theirs] if ours.endswith("positions") else float(rope[theirs])

  heads = get("num_attention_heads")
  attention_bias = get("attention_bias", False, bool)
  switches = {
      "qwen2": dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
      "qwen3": dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True),
      "llama": dict(
          qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=get("mlp_bias", False, bool), qk_norm=False
      ),
  }[family]
  eos = config.get("eos_token_id")
  eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  values = dict(
      family=family,
      vocab_size=get("vocab_size"),
      hidden_size=get("hidden_size"),
      intermediate_size=get("intermediate_size"),
      num_layers=get("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=get("num_key_value_heads", heads),
      head_dim=get("head_dim", 0),
      max_position_embeddings=get("max_position_embeddings", 32768),
      rms_norm_eps=get("rms_norm_eps", 1e-6, float),
      tie_embeddings=get("tie_word_embeddings", False, bool),
      bos_token_id=get("bos_token_id", None),
      eos_token_ids=eos_ids,
      pad_token_id=get("pad_token_id", None),
      **switches,
      **rope_fields,
  )
  values.update(overrides)
  try:
    return LLMConfig(**values)
  except ConfigError as e:  # name the HF key the checked field came from
    raise ConfigError(key(_HF_KEY.get(e.key.removeprefix("llm."), e.key)), str(e).split(": ", 2)[-1]) from None


def llm_config_to_hf(cfg: LLMConfig) -> dict[str, Any]:
  """The Hugging Face `config.json` dict for `cfg` (float32 weights)."""
  out: dict[str, Any] = {
      "architectures": [ARCHITECTURES[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else
                       (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
      "pad_token_id": cfg.pad_token_id,
      "torch_dtype": "float32",
      "dtype": "float32",
      "use_cache": True,
  }
  if cfg.rope_type == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
  elif cfg.rope_type == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": cfg.rope_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_positions,
    }
  if cfg.family == "qwen2":
    if cfg.qkv_bias is not True or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm:
      raise ConfigError("llm.family", "qwen2 needs qkv_bias=True, o_bias=mlp_bias=qk_norm=False")
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  elif cfg.family == "qwen3":
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias or not cfg.qk_norm:
      raise ConfigError("llm.family", "qwen3 needs qk_norm=True, qkv_bias == o_bias, mlp_bias=False")
    out.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  else:
    if cfg.qkv_bias != cfg.o_bias or cfg.qk_norm:
      raise ConfigError("llm.family", "llama needs qkv_bias == o_bias and qk_norm=False")
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  return out


# ---------------------------------------------------------------------------
# Name maps and tensors.


def hf_name_map(cfg: LLMConfig) -> NameMap:
  """Our parameter paths ↔ `model.*` / `lm_head.weight` names of the HF causal-LM checkpoints."""
  attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
  rules = [
      Rule("embed/embedding", "model.embed_tokens.weight"),
      Rule("final_norm/scale", "model.norm.weight"),
      Rule("layers/{i}/input_norm/scale", "model.layers.{i}.input_layernorm.weight"),
      Rule("layers/{i}/post_attention_norm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
      Rule("layers/{i}/attn/o_proj/kernel", f"{attn}.o_proj.weight", LINEAR_IN2),
      Rule("layers/{i}/attn/o_proj/bias", f"{attn}.o_proj.bias"),
      Rule("layers/{i}/attn/q_norm/scale", f"{attn}.q_norm.weight"),
      Rule("layers/{i}/attn/k_norm/scale", f"{attn}.k_norm.weight"),
      Rule("lm_head/kernel", "lm_head.weight", LINEAR),
  ]
  for p in "qkv":
    rules.append(Rule(f"layers/{{i}}/attn/{p}_proj/kernel", f"{attn}.{p}_proj.weight", LINEAR))
    rules.append(Rule(f"layers/{{i}}/attn/{p}_proj/bias", f"{attn}.{p}_proj.bias", RESHAPE))
  for p in ("gate", "up", "down"):
    rules.append(Rule(f"layers/{{i}}/mlp/{p}_proj/kernel", f"{mlp}.{p}_proj.weight", LINEAR))
    rules.append(Rule(f"layers/{{i}}/mlp/{p}_proj/bias", f"{mlp}.{p}_proj.bias"))
  ignore = [r"\.rotary_emb\.inv_freq$"]
  if cfg.tie_embeddings:
    ignore.append(r"^lm_head\.weight$")  # some tied checkpoints still store the (identical) head
  return NameMap(cfg.family, rules, ignore)


def load_config(folder: str, **overrides: Any) -> LLMConfig:
  """`LLMConfig` from `folder/config.json`; bad or unsupported values raise `CheckpointError` naming the key."""
  path = os.path.join(folder, "config.json")
  try:
    return llm_config_from_hf(read_json(path), source=path, **overrides)
  except ConfigError as e:
    raise CheckpointError(str(e).removeprefix("config error: ")) from None


def _is_lora(path: str) -> bool:
  return re.search(r"/lora_[ab]$", path) is not None


def abstract_model(cfg: LLMConfig) -> LLM:
  """The model with `ShapeDtypeStruct` leaves (nothing allocated), for import targets and sharding plans."""
  return nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))


def load_params(
    source: str | mapping.TensorReader,
    cfg: LLMConfig,
    *,
    place: Place | None = None,
    name_map: NameMap | None = None,
) -> dict[str, Any]:
  """Our flat params `{"layers/0/attn/q_proj/kernel": array}` read from a HF folder (LoRA leaves excluded).

  `source` is a folder or any `TensorReader` (e.g. `mapping.DictReader` over
  an in-memory torch state dict).
  `place(path, array)` may move each tensor onto devices as soon as it is
  read. Any missing, unexpected or mis-shaped tensor raises one
  `CheckpointError` listing them all.
  """
  targets = {p: leaf for p, leaf in mapping.flat_paths(abstract_model(cfg)).items() if not _is_lora(p)}
  reader = WideningReader(source) if isinstance(source, str) else source
  return mapping.import_params(targets, name_map or hf_name_map(cfg), reader, place=place)


def import_hf(
    source: str | mapping.TensorReader,
    cfg: LLMConfig | None = None,
    *,
    place: Place | None = None,
    rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> LLM:
  """Loads a HF folder (or a `TensorReader`, then `cfg` is required) into an `LLM`.

  The config comes from the folder's `config.json` unless given, with
  `overrides` applied on top. `place(path, array)` puts each tensor where it
  belongs as it is read (default: `jnp.asarray`). If the config asks for
  LoRA (`lora_rank > 0`) only the adapters are initialised (zero effect, from
  `rngs`); everything else comes from the checkpoint.
  """
  if cfg is None:
    if not isinstance(source, str):
      raise ValueError("import_hf from a TensorReader needs cfg")
    cfg = load_config(source, **overrides)
  elif overrides:
    cfg = dataclasses.replace(cfg, **overrides)
  base = dataclasses.replace(cfg, lora_rank=0)
  flat = load_params(source, base, place=place or (lambda path, array: jnp.asarray(array)))
  graphdef, state = nnx.split(abstract_model(base))
  leaves = [(path, var.replace(flat["/".join(str(p) for p in path)])) for path, var in nnx.to_flat_state(state)]
  model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
  if cfg.lora_rank > 0:  # only the adapters are initialised
    lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, rngs=rngs or nnx.Rngs(0))
  return model


def export_arrays(model: LLM) -> dict[str, Any]:
  """Our flat params for export: LoRA adapters folded into their kernels, adapter leaves dropped."""
  flat = {p: leaf.get_value() for p, leaf in mapping.flat_paths(model).items() if not _is_lora(p)}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, layers.Linear) and module.lora_a is not None:
      flat["/".join(str(p) for p in path) + "/kernel"] = module.merged_kernel()
  return flat


def _as_numpy(items: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  for name, array in items:
    yield name, np.asarray(array, dtype=np.float32)


def export_hf(
    model: LLM,
    folder: str,
    *,
    src_dir: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    name_map: NameMap | None = None,
) -> list[str]:
  """Writes `model` as a HF folder (config.json, float32 safetensors shards + index); returns the weight files.

  Tokenizer, generation and chat-template files are copied from `src_dir`
  when given (its `config.json` is replaced by ours).
  """
  cfg = model.cfg
  os.makedirs(folder, exist_ok=True)
  names = write_safetensors(
      folder, _as_numpy(mapping.export_params(export_arrays(model), name_map or hf_name_map(cfg))),
      max_shard_bytes=max_shard_bytes,
  )
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(llm_config_to_hf(cfg), f, indent=2, sort_keys=True)
  if src_dir is not None:
    copy_side_files(src_dir, folder, SIDE_FILES, skip=("config.json",))
  return names
