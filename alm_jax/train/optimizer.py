"""AdamW with warmup + decay, clipping, a weight-decay mask and gradient accumulation.

The optimizer is built over the *trainable* flat dict only (see
`alm_jax.train.stages.split`), so frozen parameters never get optimizer state.
Parameters stay float32 ("master weights"); `cast_for_compute` casts a copy for
bf16 compute inside the loss, and because the cast is differentiated, gradients
and updates come back in float32.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from alm_jax.config import ConfigError, require

KEY_PREFIX = "config.train.optimizer"

# No weight decay on biases, norm scales and anything inside a norm module
# (`.../final_norm/scale`, `.../ln_post/bias`, `.../input_layernorm/weight`).
# Embeddings, LoRA adapters and Q-former query tokens are decayed, as in the
# Hugging Face Trainer recipes these models were released with.
DEFAULT_NO_DECAY = (r"(^|/)(bias|scale)$", r"(^|/)(ln|[^/]*norm)[^/]*/[^/]+$")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW hyper-parameters and the learning-rate schedule (`config.optimizer`).

  The schedule warms up linearly from 0 to `learning_rate` over `warmup_steps`,
  then follows `decay` down to `learning_rate * end_learning_rate_ratio` at the
  last step. Steps count optimizer updates (with `config.train.grad_accum_steps
  = k` each averages the gradients of k micro-batches). `grad_clip_norm = 0` turns
  clipping off; `no_decay` regexes select paths without weight decay.
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  decay: Literal["cosine", "constant", "linear"] = "cosine"
  end_learning_rate_ratio: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  no_decay: tuple[str, ...] = DEFAULT_NO_DECAY

  def __post_init__(self):
    k = KEY_PREFIX
    require(self.learning_rate > 0, f"{k}.learning_rate", f"must be > 0, got {self.learning_rate}")
    require(self.warmup_steps >= 0, f"{k}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
    require(self.decay in ("cosine", "constant", "linear"), f"{k}.decay",
            f"must be cosine, constant or linear, got {self.decay!r}")
    require(0.0 <= self.end_learning_rate_ratio <= 1.0, f"{k}.end_learning_rate_ratio",
            f"must be in [0, 1], got {self.end_learning_rate_ratio}")
    require(self.weight_decay >= 0, f"{k}.weight_decay", f"must be >= 0, got {self.weight_decay}")
    require(0.0 <= self.b1 < 1.0, f"{k}.b1", f"must be in [0, 1), got {self.b1}")
    require(0.0 <= self.b2 < 1.0, f"{k}.b2", f"must be in [0, 1), got {self.b2}")
    require(self.eps > 0, f"{k}.eps", f"must be > 0, got {self.eps}")
    require(self.grad_clip_norm >= 0, f"{k}.grad_clip_norm", f"must be >= 0 (0 = off), got {self.grad_clip_norm}")
    for i, pattern in enumerate(self.no_decay):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"{k}.no_decay[{i}]", f"bad regex {pattern!r}: {e}") from None


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (warmup, then `cfg.decay`)."""
  if total_steps < 1:
    raise ConfigError("config.train.steps", f"must be >= 1, got {total_steps}")
  peak = cfg.learning_rate
  end = peak * cfg.end_learning_rate_ratio
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def learning_rate_at(cfg: OptimizerConfig, total_steps: int, step: int) -> float:
  """The learning rate the update of optimizer step `step` (0-based) uses, for logging."""
  return float(make_schedule(cfg, total_steps)(step))


def decay_mask(trainable_params: Mapping[str, Any], no_decay: tuple[str, ...] = DEFAULT_NO_DECAY) -> dict[str, bool]:
  """`{path: True}` where weight decay applies, False where a `no_decay` regex matches."""
  patterns = [re.compile(p) for p in no_decay]
  return {path: not any(p.search(path) for p in patterns) for path in trainable_params}


def make_optimizer(
    cfg: OptimizerConfig, trainable_params: Mapping[str, Any], total_steps: int
) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW(schedule, decay mask).

  `trainable_params` (arrays or ShapeDtypeStructs) fixes the tree the optimizer
  works on: pass only the trainable half of the params, never the frozen half.
  Gradient accumulation (`config.train.grad_accum_steps`) happens inside the train step
  (`train.step.make_train_step`), so `update` is called once per optimizer step on
  the accumulated gradient, which is clipped as a whole.
  """
  schedule = make_schedule(cfg, total_steps)
  chain = []
  if cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(
      optax.adamw(
          learning_rate=schedule,
          b1=cfg.b1,
          b2=cfg.b2,
          eps=cfg.eps,
          weight_decay=cfg.weight_decay,
          mask=decay_mask(trainable_params, cfg.no_decay),
      )
  )
  return optax.chain(*chain)


def cast_for_compute(flat: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
  """Casts floating leaves to `dtype` (e.g. bf16) for compute; integer leaves are kept.

  Call it inside the loss on the float32 masters: the cast's gradient casts
  back, so gradients (and optimizer updates) stay float32.
  """
  dtype = jnp.dtype(dtype)
  return {p: (v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v) for p, v in flat.items()}


def _keypath_str(entry: Any) -> str | None:
  return entry.key if isinstance(entry, jax.tree_util.DictKey) and isinstance(entry.key, str) else None


def abstract_opt_state(tx: optax.GradientTransformation, abstract_trainable: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
  """The optimizer state's shapes with shardings, without allocating it.

  Each moment leaf takes the sharding of the parameter at the same path (and
  shape); scalars such as step counts are replicated. Use the result as
  `out_shardings` to create the state sharded, or as the restore target.
  """
  shapes = jax.eval_shape(tx.init, dict(abstract_trainable))
  shardings = {p: getattr(v, "sharding", None) for p, v in abstract_trainable.items()}
  some = next((s for s in shardings.values() if s is not None), None)
  if isinstance(some, NamedSharding):
    replicated = NamedSharding(some.mesh, PartitionSpec())
  elif some is not None:
    replicated = some if isinstance(some, SingleDeviceSharding) else SingleDeviceSharding(jax.devices()[0])
  else:
    replicated = None

  def with_sharding(keypath, leaf):
    sharding = replicated
    for entry in reversed(keypath):
      name = _keypath_str(entry)
      if name in abstract_trainable and tuple(abstract_trainable[name].shape) == tuple(leaf.shape):
        sharding = shardings[name] or replicated
        break
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(with_sharding, shapes)
