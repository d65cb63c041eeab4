"""The jitted train and eval steps, as pure functions of flat parameter dicts.

`train_step(trainable, frozen, opt_state, batch)` differentiates only the
trainable half (frozen leaves get no gradient and no optimizer state), casts
parameters to the compute dtype inside the loss (float32 master weights stay
in the optimizer), and refuses a non-finite update: when the loss or the
gradient norm is NaN/Inf the old parameters and optimizer state come back
unchanged and `metrics["finite"]` is 0, so the loop can stop without saving
anything bad.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from alm_jax.train.optimizer import cast_for_compute
from alm_jax.train.params import Flat, ParamLayout


def model_config_for(model_cfg: Any, objective: str) -> Any:
  """The ALM config an objective trains: `tagging` adds the tagging head (`models/tagging.py`)."""
  return dataclasses.replace(model_cfg, tagging_head=True) if objective == "tagging" else model_cfg


def _loss_fn(layout: ParamLayout, compute_dtype: Any, objective: str, ignore_ids: Sequence[int]) -> Callable:
  if objective not in ("lm", "tagging"):
    raise ValueError(f"unknown training objective {objective!r}")

  def loss_fn(trainable: Flat, frozen: Flat, batch: dict) -> tuple[jax.Array, dict]:
    params = {**cast_for_compute(trainable, compute_dtype), **frozen}
    model = layout.model(params)
    if objective == "tagging":
      return model.tagging_loss(batch, ignore_ids)
    return model.loss(batch)

  return loss_fn


def make_train_step(layout: ParamLayout, tx: optax.GradientTransformation, compute_dtype: Any = jnp.float32, *,
                    objective: str = "lm", ignore_ids: Sequence[int] = ()) -> Callable:
  """`(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`; jit it with donation.

  `frozen` must already be in the compute dtype (cast once, outside the step).
  `objective`: `lm` (answer tokens) or `tagging` (`ignore_ids`: special tokens that are not tags).
  """
  loss_fn = _loss_fn(layout, compute_dtype, objective, tuple(ignore_ids))

  def train_step(trainable: Flat, frozen: Flat, opt_state: Any, batch: dict):
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


def make_eval_step(layout: ParamLayout, compute_dtype: Any = jnp.float32, *, objective: str = "lm",
                   ignore_ids: Sequence[int] = ()) -> Callable:
  """`(trainable, frozen, batch) -> metrics` (the training objective's loss, no gradients)."""
  loss_fn = _loss_fn(layout, compute_dtype, objective, tuple(ignore_ids))

  def eval_step(trainable: Flat, frozen: Flat, batch: dict) -> dict:
    _, metrics = loss_fn(trainable, frozen, batch)
    return metrics

  return eval_step
