"""A whole run's configuration: `model`, `data`, `train`, `mesh` sections.

`load_run_config("configs/tiny.py", {"train.steps": "20"})` loads the Python
config file, applies overrides and validates every section into frozen
dataclasses before anything heavy starts. Every error is a `ConfigError`
whose key is the full dotted path (`config.model.llm.num_heads`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from alm_jax.config import ConfigError, from_dict, load_config, to_dict
from alm_jax.data.pipeline import DataConfig
from alm_jax.models.alm import ALMConfig
from alm_jax.sharding import MeshConfig
from alm_jax.train.config import TrainConfig

SECTIONS = ("model", "data", "train", "mesh")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Validated sections of a run."""

  model: ALMConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig

  def to_dict(self) -> dict[str, Any]:
    """JSON-able resolved config (saved in every checkpoint)."""
    return to_dict(self)


def _qualified(error: ConfigError, section: str) -> ConfigError:
  key = error.key
  if key.startswith("config."):
    return error
  if key.startswith(section + "."):
    key = key[len(section) + 1 :]
  message = str(error).split(": ", 2)[-1]
  return ConfigError(f"config.{section}.{key}", message)


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> RunConfig:
  """Turns a config dict into a `RunConfig`, naming the key of any problem."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  unknown = sorted(set(config) - set(SECTIONS))
  if unknown:
    raise ConfigError(f"config.{unknown[0]}", f"unknown section (known: {', '.join(SECTIONS)})")
  sections = {}
  builders = {
      "model": lambda v: from_dict(ALMConfig, v, "config.model"),
      "data": lambda v: DataConfig.from_config(v, "config.data"),
      "train": lambda v: from_dict(TrainConfig, v, "config.train"),
      "mesh": lambda v: from_dict(MeshConfig, v, "config.mesh"),
  }
  for name, build in builders.items():
    try:
      sections[name] = build(config.get(name, {}))
    except ConfigError as e:
      raise _qualified(e, name) from None
  model, data = sections["model"], sections["data"]
  if 0 < model.clip_embeddings < data.max_clips:
    raise ConfigError("config.model.clip_embeddings",
                      f"{model.clip_embeddings} clip vectors for up to {data.max_clips} clips (data.max_clips)")
  return RunConfig(**sections)


def load_run_config(spec: str, overrides: Mapping[str, str] | None = None) -> RunConfig:
  """Loads `path.py[:arg]`, applies `--config.*` overrides, validates."""
  return validate(load_config(spec, overrides))
