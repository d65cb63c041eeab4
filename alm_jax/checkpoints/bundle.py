"""A checkpoint as a usable model: its config, parameters and tokenizer.

Every run directory written by `alm-jax train` or `alm-jax import-hf` holds
`checkpoints/` (Orbax; the metadata carries the resolved config) and
`tokenizer.json`, so `load_bundle(path)` needs nothing else. `path` may be the
run directory, its `checkpoints/` folder or one step folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from alm_jax.checkpoints import orbax as ckpt_lib
from alm_jax.config import ConfigError, from_dict
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import CheckpointError
from alm_jax.models.alm import ALMConfig, AudioLanguageModel
from alm_jax.models.partitioning import Rules
from alm_jax.params import Flat, ParamLayout

TOKENIZER_FILE = "tokenizer.json"
FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class ModelBundle:
  """What inference needs from a checkpoint."""

  config: ALMConfig
  template: str
  tokenizer: Tokenizer
  layout: ParamLayout
  params: Flat
  step: int
  source: str
  mesh: Mesh | None = None  # where `params` live (their shards) and generation runs
  rules: Rules | None = None
  dtype: str = "float32"  # the parameters' floating dtype, which the model computes in


def run_directory(path: str) -> str:
  """The run directory (the one holding `checkpoints/` and `tokenizer.json`) of any checkpoint path (absolute)."""
  path = str(ckpt_lib.absolute(path))
  probe = path
  while probe and probe != os.path.dirname(probe):
    if os.path.isdir(os.path.join(probe, "checkpoints")) or os.path.isfile(os.path.join(probe, TOKENIZER_FILE)):
      return probe
    probe = os.path.dirname(probe)
  return path


def model_config_of(metadata: ckpt_lib.CheckpointMetadata, source: str) -> tuple[ALMConfig, str]:
  """The model config and chat template recorded in a checkpoint's metadata."""
  config = metadata.config or {}
  if "model" not in config:
    raise CheckpointError(f"{source}: the checkpoint holds no model config")
  try:
    model = from_dict(ALMConfig, config["model"], "checkpoint.model")
  except ConfigError as e:
    raise CheckpointError(f"{source}: stored model config is invalid ({e})") from None
  template = (config.get("data") or {}).get("template") or "tiny"
  return model, template


def load_bundle(path: str, *, mesh: Mesh | None = None, rules: Rules | None = None,
                overrides: dict[str, Any] | None = None, dtype: str = "float32",
                shardings: Callable[[ParamLayout, Mesh, Rules], dict[str, Any]] | None = None) -> ModelBundle:
  """Loads config, tokenizer and parameters, restored straight into their shards on `mesh`.

  Parameters are placed by the training rules (`rules`; default one device): Orbax reads on each host
  only the slices its devices hold, from a checkpoint written on any mesh, so no host ever holds the
  whole model. `dtype` ("float32" or "bfloat16") is the floating dtype they are restored in (the
  model then computes in it). `overrides` replace model config fields that do not change parameter
  shapes (flat fields such as `trim_padding`). `path` may be relative to the current directory or
  start with `~`; `ModelBundle.source` is its absolute form. `shardings(layout, mesh, rules)` places the
  parameters instead of the training rules (generation's `serving_shardings`).
  """
  path = str(ckpt_lib.absolute(path))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint")
  if dtype not in FLOAT_DTYPES:
    raise CheckpointError(f"{path}: unknown dtype {dtype!r} (expected one of {sorted(FLOAT_DTYPES)})")
  metadata = ckpt_lib.read_metadata(path)
  model_cfg, template = model_config_of(metadata, path)
  if overrides:
    model_cfg = dataclasses.replace(model_cfg, **overrides)
  run_dir = run_directory(path)
  tokenizer_path = os.path.join(run_dir, TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise CheckpointError(f"{path}: no {TOKENIZER_FILE} in {run_dir}")
  tokenizer = Tokenizer.load(tokenizer_path, template)
  layout = ParamLayout(lambda rngs: AudioLanguageModel(model_cfg, rngs=rngs))
  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

  if mesh is None:
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(shape=(1, 1, 1)), devices=[_first_device()])
  if rules is None:
    rules = sharding_lib.MeshConfig().logical_rules
  if shardings is None:
    layout.check_divisible(mesh, rules)
    placed = layout.shardings(mesh, rules)
  else:
    placed = shardings(layout, mesh, rules)
  target = {p: _with_float_dtype(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed[p]), FLOAT_DTYPES[dtype])
            for p, a in layout.abstract.items()}
  params = ckpt_lib.restore_params_only(path, target)
  return ModelBundle(model_cfg, template, tokenizer, layout, params, metadata.step, path, mesh, rules, dtype)


def stored_config(path: str) -> dict[str, Any]:
  """The resolved run config a checkpoint recorded (empty when it has none)."""
  path = str(ckpt_lib.absolute(path))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint")
  return dict(ckpt_lib.read_metadata(path).config or {})


def _with_float_dtype(abstract: Any, dtype: Any) -> Any:
  """`abstract` (a sharded ShapeDtypeStruct) with a floating dtype replaced by `dtype`; integers kept."""
  if not jnp.issubdtype(abstract.dtype, jnp.floating):
    return abstract
  return jax.ShapeDtypeStruct(abstract.shape, dtype, sharding=abstract.sharding)


def _first_device():
  return jax.local_devices()[0]
