"""The jitted train and eval steps, as pure functions of flat parameter dicts.

`train_step(trainable, frozen, opt_state, batch)` differentiates only the
trainable half (frozen leaves get no gradient and no optimizer state), casts
all parameters to the compute dtype inside the loss (the float32 weights, trainable
and frozen, are never replaced by their bf16 copies), accumulates micro-batches
inside the step when asked, and refuses a non-finite update: when the loss or the
gradient norm is NaN/Inf the old parameters and optimizer state come back
unchanged and `metrics["finite"]` is 0, so the loop can stop without saving
anything bad.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from alm_jax.models.partitioning import Rules
from alm_jax.params import Flat, ParamLayout
from alm_jax.train.optimizer import cast_for_compute


def model_config_for(model_cfg: Any, objective: str) -> Any:
  """The ALM config an objective trains: `tagging` adds the tagging head (`models/tagging.py`)."""
  return dataclasses.replace(model_cfg, tagging_head=True) if objective == "tagging" else model_cfg


def _loss_fn(layout: ParamLayout, compute_dtype: Any, objective: str, ignore_ids: Sequence[int]) -> Callable:
  if objective not in ("lm", "tagging"):
    raise ValueError(f"unknown training objective {objective!r}")

  def loss_fn(trainable: Flat, frozen: Flat, batch: dict) -> tuple[jax.Array, dict]:
    # Frozen leaves stay in the dtype they were loaded in (float32 masters, saved bit for bit);
    # their compute copy is made here, inside the step, like the trainable one's.
    params = cast_for_compute({**trainable, **frozen}, compute_dtype)
    model = layout.model(params)
    if objective == "tagging":
      return model.tagging_loss(batch, ignore_ids)
    return model.loss(batch)

  return loss_fn


# Metrics that add up over micro-batches; the rest are means weighted by `target_tokens` (the loss's weight).
SUMMED_METRICS = ("target_tokens", "tokens")


def _accumulated_grads(loss_fn: Callable, trainable: Flat, frozen: Flat, batches: dict) -> tuple[dict, Flat]:
  """Gradient and metrics of the whole accumulated batch: micro-batches (leading axis) run in a scan.

  Each micro-batch's loss is a mean over its own targets (`target_tokens`); the
  micro-batches are combined with those counts as weights, so k micro-batches give
  exactly the loss and gradient of one batch holding all their rows.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(carry, batch):
    grad_sum, metric_sums = carry
    (_, metrics), grads = grad_fn(trainable, frozen, batch)
    weight = metrics["target_tokens"]
    grad_sum = jax.tree.map(lambda acc, g: acc + weight * g, grad_sum, grads)
    metric_sums = {k: metric_sums[k] + (v if k in SUMMED_METRICS else weight * v) for k, v in metrics.items()}
    return (grad_sum, metric_sums), None

  _, metric_shapes = jax.eval_shape(lambda b: loss_fn(trainable, frozen, b), jax.tree.map(lambda x: x[0], batches))
  zeros = ({p: jnp.zeros_like(v) for p, v in trainable.items()},
           {k: jnp.zeros(v.shape, v.dtype) for k, v in metric_shapes.items()})
  (grad_sum, metric_sums), _ = jax.lax.scan(body, zeros, batches)
  total = jnp.maximum(metric_sums["target_tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / total, grad_sum)
  metrics = {k: v if k in SUMMED_METRICS else v / total for k, v in metric_sums.items()}
  return metrics, grads


def make_train_step(layout: ParamLayout, tx: optax.GradientTransformation, compute_dtype: Any = jnp.float32, *,
                    objective: str = "lm", ignore_ids: Sequence[int] = (), grad_accum_steps: int = 1) -> Callable:
  """`(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`; jit it with donation.

  `frozen` is passed as loaded (float32); the step casts a compute copy. With
  `grad_accum_steps = k > 1` every batch field has a leading axis of k micro-batches
  (`stack_micro_batches`), accumulated in a scan inside the step: one optimizer
  update on their token-weighted mean gradient, identical to one step on all rows.
  `objective`: `lm` (answer tokens) or `tagging` (`ignore_ids`: special tokens that are not tags).
  """
  loss_fn = _loss_fn(layout, compute_dtype, objective, tuple(ignore_ids))

  def train_step(trainable: Flat, frozen: Flat, opt_state: Any, batch: dict):
    if grad_accum_steps > 1:
      metrics, grads = _accumulated_grads(loss_fn, trainable, frozen, batch)
      loss = metrics["loss"]
    else:
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_trainable = keep(new_trainable, trainable)
    new_opt_state = keep(new_opt_state, opt_state)
    metrics = {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    return new_trainable, new_opt_state, metrics

  return train_step


def stack_micro_batches(batches: Sequence[dict]) -> dict:
  """k host batches of one shape -> one batch whose fields lead with the micro-batch axis (k, ...)."""
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def jit_train_step(layout: ParamLayout, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, *,
                   trainable_paths: Sequence[str], frozen_paths: Sequence[str], batch_shardings: Any,
                   compute_dtype: Any = jnp.float32, objective: str = "lm", ignore_ids: Sequence[int] = (),
                   grad_accum_steps: int = 1) -> Any:
  """The train step as `alm-jax train` runs it: jitted with the rules bound, explicit in/out shardings and
  donated parameters and optimizer state. Tests and `alm-jax compile` build it through here too."""
  from alm_jax.sharding import bind_rules  # pylint: disable=import-outside-toplevel
  from alm_jax.train.optimizer import abstract_opt_state  # pylint: disable=import-outside-toplevel

  trainable_s = layout.shardings(mesh, rules, trainable_paths)
  frozen_s = layout.shardings(mesh, rules, frozen_paths)
  opt_s = jax.tree.map(lambda a: a.sharding,
                       abstract_opt_state(tx, layout.abstract_sharded(mesh, rules, trainable_paths)))
  step_fn = make_train_step(layout, tx, compute_dtype, objective=objective, ignore_ids=ignore_ids,
                            grad_accum_steps=grad_accum_steps)
  return jax.jit(bind_rules(step_fn, mesh, rules), in_shardings=(trainable_s, frozen_s, opt_s, batch_shardings),
                 out_shardings=(trainable_s, opt_s, None), donate_argnums=(0, 2))


def make_eval_step(layout: ParamLayout, compute_dtype: Any = jnp.float32, *, objective: str = "lm",
                   ignore_ids: Sequence[int] = ()) -> Callable:
  """`(trainable, frozen, batch) -> metrics` (the training objective's loss, no gradients)."""
  loss_fn = _loss_fn(layout, compute_dtype, objective, tuple(ignore_ids))

  def eval_step(trainable: Flat, frozen: Flat, batch: dict) -> dict:
    _, metrics = loss_fn(trainable, frozen, batch)
    return metrics

  return eval_step
