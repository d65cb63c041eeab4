"""A model's parameters as a flat `{"a/b/0/kernel": array}` dict, and back.

Training, stages, optimizer, checkpoints, inference and `alm-jax compile` all
work on this flat view (hence this module sits at the package top, not under
`alm_jax.train`): the stage masks select by path regex, the optimizer sees only
the trainable subset, Orbax saves plain dicts. `ParamLayout` holds the graph
definition and the logical axes of every path, so it can rebuild the module
inside a jitted function (`model(flat)`) and give each path its
`NamedSharding`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models.partitioning import Rules, logical_to_spec

Flat = dict[str, jax.Array]


class ParamLayout:
  """Paths, shapes, dtypes and logical axes of a model built by `factory(rngs)`.

  The model is only traced (`nnx.eval_shape`), never materialised, so building
  a layout for a 7B model costs nothing.
  """

  def __init__(self, factory: Callable[[nnx.Rngs], nnx.Module]):
    self.factory = factory
    abstract = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract)
    self._keys: dict[str, tuple] = {}
    self.abstract: dict[str, jax.ShapeDtypeStruct] = {}
    self.axes: dict[str, tuple[str | None, ...]] = {}
    for key, variable in nnx.to_flat_state(state):
      path = "/".join(str(k) for k in key)
      value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
      self._keys[path] = key
      self.abstract[path] = jax.ShapeDtypeStruct(value.shape, value.dtype)
      meta = variable.get_metadata() if isinstance(variable, nnx.Variable) else {}
      axes = meta.get("out_sharding")
      self.axes[path] = tuple(axes) if axes is not None else (None,) * len(value.shape)

  @property
  def paths(self) -> list[str]:
    return list(self.abstract)

  def gathered_shapes(self) -> list[tuple[int, ...]]:
    """Shapes a weight collective can carry: every parameter, plus one layer of each stacked one.

    Inside a scan over stacked layers (leading logical axis `layers`) FSDP
    gathers and gradient reductions move one layer's slice per iteration, so
    `aot.parameter_sized_counts` must know those shapes too.
    """
    shapes = [tuple(a.shape) for a in self.abstract.values()]
    shapes += [tuple(self.abstract[p].shape[1:]) for p, axes in self.axes.items() if axes[:1] == ("layers",)]
    return shapes

  def model(self, flat: Mapping[str, jax.Array]) -> nnx.Module:
    """The module with these parameter values (use inside jit)."""
    missing = set(self._keys) - set(flat)
    if missing:
      raise KeyError(f"parameters missing: {sorted(missing)[:5]}")
    state = nnx.from_flat_state([(self._keys[p], flat[p]) for p in self._keys])
    return nnx.merge(self.graphdef, state)

  def spec(self, path: str, rules: Rules) -> PartitionSpec:
    return logical_to_spec(self.axes[path], rules)

  def shardings(self, mesh: Mesh, rules: Rules, paths: Any = None) -> dict[str, NamedSharding]:
    """`NamedSharding` per path (all paths, or those given)."""
    paths = self.paths if paths is None else paths
    return {p: NamedSharding(mesh, self.spec(p, rules)) for p in paths}

  def check_divisible(self, mesh: Mesh, rules: Rules) -> None:
    """Raises `ConfigError` naming the first parameter a mesh axis does not divide."""
    for path, abstract in self.abstract.items():
      for dim, entry in zip(abstract.shape, self.spec(path, rules)):
        names = (entry,) if isinstance(entry, str) else (entry or ())
        parts = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if dim % parts:
          raise ConfigError(
              "config.mesh.shape",
              f"parameter {path} {abstract.shape}: dimension {dim} is not divisible by mesh axes {entry} ({parts})",
          )

  def abstract_sharded(self, mesh: Mesh, rules: Rules, paths: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays carrying their shardings (restore targets, AOT arguments)."""
    shardings = self.shardings(mesh, rules, paths)
    return {p: jax.ShapeDtypeStruct(self.abstract[p].shape, self.abstract[p].dtype, sharding=s)
            for p, s in shardings.items()}

  def init(self, seed: int, mesh: Mesh, rules: Rules) -> Flat:
    """Random initial parameters, created directly in their shards (jit with out_shardings)."""
    self.check_divisible(mesh, rules)
    keys = self._keys

    def init_fn(seed_value):
      model = self.factory(nnx.Rngs(jax.random.key(seed_value)))
      _, state = nnx.split(model)
      return {"/".join(str(k) for k in key): v.get_value() for key, v in nnx.to_flat_state(state)}

    shardings = self.shardings(mesh, rules)
    from alm_jax.sharding import bind_rules  # pylint: disable=import-outside-toplevel

    params = jax.jit(bind_rules(init_fn, mesh, rules), out_shardings=shardings)(np.uint32(seed))
    assert set(params) == set(keys)
    return params

  def place(self, path: str, array: np.ndarray, mesh: Mesh, rules: Rules) -> jax.Array:
    """Puts one host array onto the mesh shard by shard (each device reads its slice)."""
    target = self.abstract[path]
    if tuple(array.shape) != tuple(target.shape):
      raise CheckpointError(f"{path}: checkpoint shape {tuple(array.shape)} != model shape {tuple(target.shape)}")
    sharding = NamedSharding(mesh, self.spec(path, rules))
    return jax.make_array_from_callback(target.shape, sharding,
                                        lambda index: np.asarray(array[index], dtype=target.dtype))


def count(flat: Mapping[str, Any]) -> int:
  """Number of scalars in a flat tree."""
  return int(sum(np.prod(getattr(v, "shape", ())) for v in flat.values()))


def to_numpy(flat: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
  """Gathers a (possibly sharded) flat tree to host numpy arrays (small models, export)."""
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def is_finite(flat: Mapping[str, jax.Array]) -> jax.Array:
  """True when every floating leaf is finite (inside jit)."""
  checks = [jnp.isfinite(v).all() for v in flat.values() if jnp.issubdtype(v.dtype, jnp.floating)]
  return jnp.stack(checks).all() if checks else jnp.array(True)
