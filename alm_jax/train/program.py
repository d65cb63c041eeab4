"""The train step as an abstract program: every argument a sharded `ShapeDtypeStruct`.

`alm-jax compile` lowers it for a device topology that is not attached (a TPU
pod described by libtpu, or CPU devices standing in for a GPU cluster), so
memory per device and collectives are known before any hardware is booked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alm_jax.data.pipeline import batch_shapes
from alm_jax.models.alm import AudioLanguageModel
from alm_jax.models.partitioning import Rules, logical_to_spec
from alm_jax.params import ParamLayout
from alm_jax.run_config import RunConfig
from alm_jax.sharding import assert_params_sufficiently_sharded
from alm_jax.train import stages as stages_lib
from alm_jax.train.optimizer import abstract_opt_state, make_optimizer
from alm_jax.train.step import make_train_step, model_config_for

BATCH_DTYPES = {"tokens": jnp.int32, "token_mask": jnp.bool_, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "audio": jnp.float32, "audio_samples": jnp.int32, "audio_clip": jnp.int32}


@dataclasses.dataclass
class AbstractProgram:
  """A train step with its abstract, sharded arguments."""

  step_fn: Any
  args: tuple
  in_shardings: tuple
  out_shardings: tuple
  layout: ParamLayout
  mask: dict[str, bool]


def batch_spec_sharding(name: str, ndim: int, mesh: Mesh, rules: Rules) -> NamedSharding:
  """Every batch field is split over its leading (row / window) dimension."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def abstract_train_program(cfg: RunConfig, mesh: Mesh, rules: Rules, *, process_count: int = 1) -> AbstractProgram:
  """The configured model's train step for the largest batch shape the data pipeline emits."""
  model_cfg = cfg.model
  if model_cfg.audio_token_id < 0:  # shapes only: any id will do
    model_cfg = dataclasses.replace(model_cfg, audio_token_id=0)
  model_cfg = model_config_for(model_cfg, cfg.train.objective)
  layout = ParamLayout(lambda rngs: AudioLanguageModel(model_cfg, rngs=rngs))
  layout.check_divisible(mesh, rules)
  assert_params_sufficiently_sharded(layout.abstract_sharded(mesh, rules), mesh, cfg.mesh.sharding_tolerance)
  mask = stages_lib.trainable_mask(layout.abstract, cfg.train.stage_config)
  trainable_paths = [p for p, t in mask.items() if t]
  frozen_paths = [p for p, t in mask.items() if not t]
  tx = make_optimizer(cfg.train.optimizer, {p: layout.abstract[p] for p in trainable_paths}, cfg.train.steps)
  trainable = layout.abstract_sharded(mesh, rules, trainable_paths)
  frozen = layout.abstract_sharded(mesh, rules, frozen_paths)  # as loaded: the step casts its compute copy
  opt_state = abstract_opt_state(tx, trainable)
  accum = cfg.train.grad_accum_steps
  shapes = batch_shapes(cfg.data, model_cfg.token_spec(), process_count)[-1]
  batch = {}
  for name, shape in shapes.items():
    if name not in BATCH_DTYPES:
      continue
    shape = (shape[0] * process_count,) + tuple(shape[1:])
    sharding = batch_spec_sharding(name, len(shape), mesh, rules)
    if accum > 1:  # micro-batches lead (see make_train_step)
      shape = (accum,) + shape
      sharding = NamedSharding(mesh, PartitionSpec(None, *sharding.spec))
    batch[name] = jax.ShapeDtypeStruct(shape, BATCH_DTYPES[name], sharding=sharding)
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
  step_fn = make_train_step(layout, tx, dtype, objective=cfg.train.objective, grad_accum_steps=accum)
  in_shardings = (shardings(trainable), shardings(frozen), shardings(opt_state), shardings(batch))
  out_shardings = (shardings(trainable), shardings(opt_state), None)
  return AbstractProgram(step_fn, (trainable, frozen, opt_state, batch), in_shardings, out_shardings, layout, mask)
