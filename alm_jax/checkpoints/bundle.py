"""A checkpoint as a usable model: its config, parameters and tokenizer.

Every run directory written by `alm-jax train` or `alm-jax import-hf` holds
`checkpoints/` (Orbax; the metadata carries the resolved config) and
`tokenizer.json`, so `load_bundle(path)` needs nothing else. `path` may be the
run directory, its `checkpoints/` folder or one step folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import Mesh

from alm_jax.checkpoints import orbax as ckpt_lib
from alm_jax.config import ConfigError, from_dict
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import CheckpointError
from alm_jax.models.alm import ALMConfig, AudioLanguageModel
from alm_jax.models.partitioning import Rules
from alm_jax.params import Flat, ParamLayout

TOKENIZER_FILE = "tokenizer.json"


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
                overrides: dict[str, Any] | None = None) -> ModelBundle:
  """Loads config, tokenizer and parameters (placed on `mesh`, default one device).

  `overrides` replace model config fields that do not change parameter
  shapes (e.g. `{"llm": {...remat...}}` is not supported; keep it to flat
  fields such as `trim_padding`). `path` may be relative to the current
  directory or start with `~`; `ModelBundle.source` is its absolute form.
  """
  path = str(ckpt_lib.absolute(path))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint")
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
  if mesh is None:
    from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(shape=(1, 1, 1)), devices=[_first_device()])
    rules = sharding_lib.MeshConfig().logical_rules
  params = ckpt_lib.restore_params_only(path, layout.abstract_sharded(mesh, rules))
  return ModelBundle(model_cfg, template, tokenizer, layout, params, metadata.step, path)


def _first_device():
  import jax  # pylint: disable=import-outside-toplevel

  return jax.local_devices()[0]
