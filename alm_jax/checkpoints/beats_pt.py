"""BEATs checkpoints in the official format: a `torch.save`d dict with `cfg` and `model`.

`load_beats(path)` reads the config from `cfg` (`from_beats_cfg`; `to_beats_cfg`
is the reverse), builds the encoder abstractly and fills it from `model`
through one declarative name map (both directions);
the shared relative-position table copies of layers ≥ 1 and the fine-tuned
`predictor` head are ignored. Weight-norm tensors are accepted under the
official names (`weight_g`, `weight_v`) and the newer parametrization names
(`parametrizations.weight.original0/1`, as the speechbrain port saves them).
torch is imported only inside the functions that read or write `.pt` files.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from alm_jax.checkpoints import mapping
from alm_jax.checkpoints.mapping import CONV1D, CONV2D, LINEAR, LINEAR_IN2, RESHAPE, NameMap, Rule, Transform
from alm_jax.checkpoints.whisper import fill_state, read_torch_checkpoint
from alm_jax.config import ConfigError, from_dict, require
from alm_jax.errors import CheckpointError
from alm_jax.models.beats import BeatsConfig, BeatsEncoder

# Official `BEATsConfig` defaults, used for keys a checkpoint's `cfg` leaves out.
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    input_patch_size=-1,
    embed_dim=512,
    conv_bias=False,
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    activation_fn="gelu",
    layer_norm_first=False,
    deep_norm=False,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=False,
    num_buckets=320,
    max_distance=1280,
    gru_rel_pos=False,
)

# Official activation names → `layers.activation` names.
OFFICIAL_ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "relu": "relu", "tanh": "tanh"}

# weight_norm's g is (1, 1, k) for dim=2; ours is (k,). grep_a is (1, H, 1, 1); ours (H,).
WEIGHT_G = Transform("weight_norm_g", lambda x, shape: x.reshape(shape), lambda x: x.reshape(1, 1, -1))
GREP_A = Transform("grep_a", lambda x, shape: x.reshape(shape), lambda x: x.reshape(1, -1, 1, 1))


def _rules() -> list[Rule]:
  layer = "encoder.layers.{i}"
  rules = [
      Rule("patch_embedding", "patch_embedding.weight", CONV2D),
      Rule("patch_bias", "patch_embedding.bias"),
      Rule("layer_norm/scale", "layer_norm.weight"),
      Rule("layer_norm/bias", "layer_norm.bias"),
      Rule("post_extract_proj/kernel", "post_extract_proj.weight", LINEAR),
      Rule("post_extract_proj/bias", "post_extract_proj.bias"),
      Rule("pos_conv/weight_v", "encoder.pos_conv.0.weight_v", CONV1D),
      Rule("pos_conv/weight_g", "encoder.pos_conv.0.weight_g", WEIGHT_G),
      Rule("pos_conv/bias", "encoder.pos_conv.0.bias"),
      Rule("encoder_layer_norm/scale", "encoder.layer_norm.weight"),
      Rule("encoder_layer_norm/bias", "encoder.layer_norm.bias"),
      Rule("relative_attention_bias", "encoder.layers.0.self_attn.relative_attention_bias.weight"),
      Rule("layers/{i}/self_attn/out_proj/kernel", f"{layer}.self_attn.out_proj.weight", LINEAR_IN2),
      Rule("layers/{i}/self_attn/out_proj/bias", f"{layer}.self_attn.out_proj.bias"),
      Rule("layers/{i}/self_attn/grep_linear/kernel", f"{layer}.self_attn.grep_linear.weight", LINEAR),
      Rule("layers/{i}/self_attn/grep_linear/bias", f"{layer}.self_attn.grep_linear.bias"),
      Rule("layers/{i}/self_attn/grep_a", f"{layer}.self_attn.grep_a", GREP_A),
  ]
  for p in ("q", "k", "v"):
    rules += [
        Rule(f"layers/{{i}}/self_attn/{p}_proj/kernel", f"{layer}.self_attn.{p}_proj.weight", LINEAR),
        Rule(f"layers/{{i}}/self_attn/{p}_proj/bias", f"{layer}.self_attn.{p}_proj.bias", RESHAPE),
    ]
  for norm in ("self_attn_layer_norm", "final_layer_norm"):
    rules += [
        Rule(f"layers/{{i}}/{norm}/scale", f"{layer}.{norm}.weight"),
        Rule(f"layers/{{i}}/{norm}/bias", f"{layer}.{norm}.bias"),
    ]
  for fc in ("fc1", "fc2"):
    rules += [
        Rule(f"layers/{{i}}/mlp/{fc}/kernel", f"{layer}.{fc}.weight", LINEAR),
        Rule(f"layers/{{i}}/mlp/{fc}/bias", f"{layer}.{fc}.bias"),
    ]
  return rules


# Official BEATs names. Layers >= 1 hold copies of layer 0's relative position table (one shared module).
NAME_MAP = NameMap(
    "beats",
    _rules(),
    ignore=[r"^predictor\.", r"^encoder\.layers\.[1-9]\d*\.self_attn\.relative_attention_bias\.weight$"],
)

# Newer torch weight-norm parametrization names → the official ones.
_ALIASES = (
    (re.compile(r"\.parametrizations\.weight\.original0$"), ".weight_g"),
    (re.compile(r"\.parametrizations\.weight\.original1$"), ".weight_v"),
)


class _AliasReader:
  """A `TensorReader` that shows parametrization-style weight-norm names under the official ones."""

  def __init__(self, tensors: Mapping[str, Any], source: str):
    self._inner = mapping.DictReader(tensors, source)
    self.source = source
    self._names = {}
    for name in tensors:
      official = name
      for pattern, replacement in _ALIASES:
        official = pattern.sub(replacement, official)
      self._names[official] = name

  def keys(self) -> Iterable[str]:
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._inner.get(self._names[name])


def abstract_model(config: BeatsConfig) -> BeatsEncoder:
  """The encoder with shape-only parameters (nothing allocated)."""
  return nnx.eval_shape(lambda: BeatsEncoder(config, rngs=nnx.Rngs(0)))


def beats_model(config: BeatsConfig, state: nnx.State) -> BeatsEncoder:
  """A `BeatsEncoder` holding `state` (as returned by `load_beats`)."""
  graphdef, _ = nnx.split(abstract_model(config))
  return nnx.merge(graphdef, state)


def load_beats(path: str, *, trust_pickle: bool = False, **overrides: Any) -> tuple[BeatsConfig, nnx.State]:
  """Imports an official BEATs `.pt` (`{"cfg": ..., "model": ...}`); returns `(config, state)`.

  `overrides` replace config fields (e.g. `remat="full"`). A missing, extra or
  mis-shaped tensor raises one `CheckpointError` naming every offending key.
  """
  checkpoint = read_torch_checkpoint(path, trust_pickle=trust_pickle)
  if not isinstance(checkpoint, Mapping) or "cfg" not in checkpoint or "model" not in checkpoint:
    raise CheckpointError(f"{path}: not a BEATs checkpoint (expected a dict with 'cfg' and 'model')")
  cfg = checkpoint["cfg"]
  cfg = cfg if isinstance(cfg, Mapping) else getattr(cfg, "__dict__", cfg)
  try:
    config = from_beats_cfg(cfg, **overrides)
  except ConfigError as e:
    raise CheckpointError(f"{path}: {e}") from None
  graphdef_state = nnx.split(abstract_model(config))[1]
  targets = mapping.flat_paths(graphdef_state)
  arrays = mapping.import_params(targets, NAME_MAP, _AliasReader(checkpoint["model"], path))
  return config, fill_state(graphdef_state, arrays)


def from_beats_cfg(cfg: Mapping[str, Any], **overrides: Any) -> BeatsConfig:
  """Our `BeatsConfig` from an official checkpoint's `cfg` dict (missing keys take the official defaults).

  Training-only keys (dropouts, layer drop, predictor) are ignored; a
  pre-LN model (`layer_norm_first`) or a GLU feed-forward raises `ConfigError`.
  """
  c = {**OFFICIAL_DEFAULTS, **dict(cfg)}
  require(not c["layer_norm_first"], "beats.layer_norm_first", "only post-LN BEATs (as released) is supported")
  if c["activation_fn"] not in OFFICIAL_ACTIVATIONS:
    raise ConfigError("beats.activation_fn", f"unsupported activation {c['activation_fn']!r}")
  values = dict(
      patch_size=c["input_patch_size"],
      patch_dim=c["embed_dim"],
      patch_bias=bool(c["conv_bias"]),
      width=c["encoder_embed_dim"],
      num_layers=c["encoder_layers"],
      num_heads=c["encoder_attention_heads"],
      ffn_dim=c["encoder_ffn_embed_dim"],
      activation=OFFICIAL_ACTIVATIONS[c["activation_fn"]],
      deep_norm=bool(c["deep_norm"]),
      conv_pos=c["conv_pos"],
      conv_pos_groups=c["conv_pos_groups"],
      relative_position_embedding=bool(c["relative_position_embedding"]),
      num_buckets=c["num_buckets"],
      max_distance=c["max_distance"],
      gru_rel_pos=bool(c["gru_rel_pos"]),
  )
  values.update(overrides)
  return from_dict(BeatsConfig, values, "beats")


def to_beats_cfg(config: BeatsConfig) -> dict[str, Any]:
  """The official `cfg` dict for `config` (inference fields; dropouts zero)."""
  activation = {ours: theirs for theirs, ours in OFFICIAL_ACTIVATIONS.items()}
  return dict(
      input_patch_size=config.patch_size,
      embed_dim=config.patch_dim,
      conv_bias=config.patch_bias,
      encoder_layers=config.num_layers,
      encoder_embed_dim=config.width,
      encoder_ffn_embed_dim=config.ffn_dim,
      encoder_attention_heads=config.num_heads,
      activation_fn=activation[config.activation],
      layer_norm_first=False,
      deep_norm=config.deep_norm,
      conv_pos=config.conv_pos,
      conv_pos_groups=config.conv_pos_groups,
      relative_position_embedding=config.relative_position_embedding,
      num_buckets=config.num_buckets,
      max_distance=config.max_distance,
      gru_rel_pos=config.gru_rel_pos,
      dropout=0.0,
      attention_dropout=0.0,
      activation_dropout=0.0,
      encoder_layerdrop=0.0,
      dropout_input=0.0,
      finetuned_model=False,
  )


def save_beats(config: BeatsConfig, state: nnx.State | BeatsEncoder, path: str) -> None:
  """Writes `{"cfg", "model"}` in the official format (the shared table under every layer, as torch saves it)."""
  import torch  # pylint: disable=import-outside-toplevel

  flat = mapping.flat_paths(state)
  tensors = {name: torch.from_numpy(np.array(array)) for name, array in mapping.export_params(flat, NAME_MAP)}
  shared = "encoder.layers.0.self_attn.relative_attention_bias.weight"
  if shared in tensors:
    for i in range(1, config.num_layers):
      tensors[shared.replace(".0.", f".{i}.", 1)] = tensors[shared]
  torch.save({"cfg": to_beats_cfg(config), "model": tensors}, path)
