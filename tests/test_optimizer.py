"""Optimizer: schedule, decay mask, clipping, accumulation, no state for frozen leaves, fp32 masters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alm_jax.config import ConfigError, from_dict
from alm_jax.train import stages
from alm_jax.train.config import TrainConfig
from alm_jax.train.optimizer import (
    OptimizerConfig,
    abstract_opt_state,
    cast_for_compute,
    decay_mask,
    learning_rate_at,
    make_optimizer,
)


def small_params(frozen_width: int = 16) -> dict:
  rng = np.random.default_rng(0)
  shapes = {
      "encoder/whisper/layers/0/fc1/kernel": (frozen_width, frozen_width),
      "bridge/proj/kernel": (4, 6),
      "bridge/proj/bias": (6,),
      "bridge/norm/scale": (6,),
      "llm/embed/embedding": (10, 6),
      "llm/layers/0/mlp/up/lora_a": (6, 2),
      "llm/layers/0/mlp/up/lora_b": (2, 6),
      "llm/layers/0/mlp/up/kernel": (6, 6),
      "llm/layers/0/input_layernorm/weight": (6,),
  }
  return {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}


@pytest.mark.parametrize(
    "values, key",
    [
        ({"decay": "exponential"}, "config.train.optimizer.decay"),
        ({"learning_rate": 0.0}, "config.train.optimizer.learning_rate"),
        ({"warmup_steps": -1}, "config.train.optimizer.warmup_steps"),
        ({"b2": 1.0}, "config.train.optimizer.b2"),
        ({"end_learning_rate_ratio": 2.0}, "config.train.optimizer.end_learning_rate_ratio"),
        ({"no_decay": ["(bias"]}, "config.train.optimizer.no_decay[0]"),
        ({"learning_rate": "fast"}, "config.train.optimizer.learning_rate"),
        ({"momentum": 0.9}, "config.train.optimizer.momentum"),
    ],
)
def test_config_validation_names_the_key(values, key):
  with pytest.raises(ConfigError) as info:
    from_dict(OptimizerConfig, values, "config.train.optimizer")
  assert info.value.key == key


def test_gradient_accumulation_is_a_train_key():
  """`config.train.grad_accum_steps` (DESIGN.md's key), validated with its name; not an optimizer field."""
  assert from_dict(TrainConfig, {"grad_accum_steps": 4}, "config.train").grad_accum_steps == 4
  with pytest.raises(ConfigError) as info:
    from_dict(TrainConfig, {"grad_accum_steps": 0}, "config.train")
  assert info.value.key == "config.train.grad_accum_steps"
  with pytest.raises(ConfigError) as info:
    from_dict(OptimizerConfig, {"grad_accum_steps": 2}, "config.train.optimizer")
  assert info.value.key == "config.train.optimizer.grad_accum_steps"  # unknown there: one place for one setting


def test_warmup_then_cosine_linear_constant():
  cfg = from_dict(OptimizerConfig, {"learning_rate": 1e-3, "warmup_steps": 10, "end_learning_rate_ratio": 0.1},
                  "config.train.optimizer")
  lr = lambda s, c=cfg: learning_rate_at(c, 110, s)  # noqa: E731
  assert lr(0) == 0.0
  assert lr(5) == pytest.approx(5e-4)
  assert lr(10) == pytest.approx(1e-3)
  assert lr(60) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
  assert lr(110) == pytest.approx(1e-4)
  linear = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay="linear", end_learning_rate_ratio=0.0)
  assert learning_rate_at(linear, 110, 60) == pytest.approx(5e-4)
  assert learning_rate_at(linear, 110, 110) == pytest.approx(0.0)
  constant = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay="constant")
  assert learning_rate_at(constant, 110, 100) == pytest.approx(1e-3)


def test_schedule_drives_the_updates():
  """Adam's first update is -lr·sign(g): the optimizer really uses the schedule."""
  cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=4, weight_decay=0.0, grad_clip_norm=0.0, eps=1e-12)
  params = {"bridge/proj/kernel": jnp.ones((3, 3))}
  tx = make_optimizer(cfg, params, total_steps=20)
  state = tx.init(params)
  grads = {"bridge/proj/kernel": jnp.full((3, 3), 0.5)}
  update = jax.jit(tx.update)
  for step in range(3):
    updates, state = update(grads, state, params)
    # Constant gradients: bias-corrected mu/sqrt(nu) is exactly 1 at every step.
    np.testing.assert_allclose(updates["bridge/proj/kernel"], -learning_rate_at(cfg, 20, step), rtol=1e-4)


def test_decay_mask_defaults():
  mask = decay_mask(small_params())
  assert not mask["bridge/proj/bias"]
  assert not mask["bridge/norm/scale"]
  assert not mask["llm/layers/0/input_layernorm/weight"]
  assert mask["bridge/proj/kernel"] and mask["llm/embed/embedding"] and mask["llm/layers/0/mlp/up/lora_a"]


def test_weight_decay_applies_only_where_masked():
  params = small_params()
  cfg = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, decay="constant", grad_clip_norm=0.0)
  tx = make_optimizer(cfg, params, total_steps=10)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  mask = decay_mask(params)
  for path, update in updates.items():
    want = -0.1 * 0.5 * params[path] if mask[path] else jnp.zeros_like(update)
    np.testing.assert_allclose(update, want, rtol=1e-6, atol=1e-7, err_msg=path)


def test_gradients_are_clipped_by_global_norm():
  params = {"a": jnp.zeros((4,)), "b": jnp.zeros((3,))}
  cfg = OptimizerConfig(grad_clip_norm=1.0, b1=0.5)
  tx = make_optimizer(cfg, params, total_steps=10)
  grads = {"a": jnp.full((4,), 30.0), "b": jnp.full((3,), -40.0)}
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))
  assert float(optax.global_norm(adam.mu)) == pytest.approx(0.5 * 1.0, rel=1e-5)  # (1 - b1) · clipped


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_params_have_no_optimizer_state():
  cfg = OptimizerConfig()
  sizes = []
  for width in (16, 256):
    params = small_params(frozen_width=width)
    trainable, frozen = stages.split(params, stages.trainable_mask(params, "lora"))
    tx = make_optimizer(cfg, trainable, total_steps=10)
    state = tx.init(trainable)
    paths = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert not any("encoder" in p or "up/kernel" in p for p in paths)
    # Adam mu + nu: two copies of the trainable part, plus scalar counters (accumulation lives in the step).
    scalars = _bytes(state) - 2 * _bytes(trainable)
    assert 0 <= scalars <= 64
    sizes.append(_bytes(state))
  assert sizes[0] == sizes[1]  # 16x more frozen weights, identical optimizer state


def test_bf16_compute_keeps_fp32_grads_updates_and_masters():
  params = small_params()
  params["llm/layers/0/positions"] = jnp.arange(6, dtype=jnp.int32)
  trainable, frozen = stages.split(params, stages.trainable_mask(params, "lora"))
  x = jnp.ones((2, 6), jnp.bfloat16)

  def loss(t):
    p = cast_for_compute(stages.merge(t, frozen), jnp.bfloat16)
    assert p["bridge/proj/kernel"].dtype == jnp.bfloat16
    assert p["llm/layers/0/positions"].dtype == jnp.int32
    h = x @ p["llm/layers/0/mlp/up/lora_a"] @ p["llm/layers/0/mlp/up/lora_b"] + p["bridge/norm/scale"]
    return jnp.mean(jnp.square(h.astype(jnp.float32)))

  grads = jax.jit(jax.grad(loss))(trainable)
  assert all(g.dtype == jnp.float32 for g in grads.values())
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-2), trainable, total_steps=10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
  assert all(u.dtype == jnp.float32 for u in updates.values())
  new = optax.apply_updates(trainable, updates)
  assert all(v.dtype == jnp.float32 for v in new.values())
  assert float(jnp.abs(new["llm/layers/0/mlp/up/lora_a"] - trainable["llm/layers/0/mlp/up/lora_a"]).max()) > 0


def test_abstract_opt_state_follows_param_shardings():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  specs = {"bridge/proj/kernel": P("fsdp", "tensor"), "bridge/proj/bias": P("tensor"), "bridge/q": P(None, "fsdp")}
  shapes = {"bridge/proj/kernel": (4, 6), "bridge/proj/bias": (6,), "bridge/q": (6, 4)}
  abstract = {
      p: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, specs[p])) for p, s in shapes.items()
  }
  tx = make_optimizer(OptimizerConfig(), abstract, total_steps=10)
  state = abstract_opt_state(tx, abstract)
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = next((k.key for k in reversed(keypath) if isinstance(k, jax.tree_util.DictKey)), None)
    want = specs[name] if name in specs else P()
    assert leaf.sharding.spec == want, jax.tree_util.keystr(keypath)
  real = jax.jit(tx.init, out_shardings=jax.tree.map(lambda s: s.sharding, state))(
      {p: jnp.zeros(s.shape) for p, s in abstract.items()}
  )
  assert jax.tree.structure(real) == jax.tree.structure(state)
