"""Logical axis names: how models describe their dimensions without naming a mesh.

Modules annotate every weight (as `nnx.Param` metadata `out_sharding`) and the
big activations (via `constrain`) with logical names such as `embed` or
`heads`. `alm_jax.sharding` owns the table that maps those names to the mesh
axes `data`, `fsdp`, `tensor` and activates it with `use_rules`; outside that
context `constrain` is a no-op, so the same model runs unsharded on one CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Every logical name a model may use. Sharding rules must cover all of them.
LOGICAL_AXES = (
    "batch",  # examples
    "length",  # token positions
    "kv_length",  # key/value positions (attention, KV cache)
    "embed",  # model width of any tower
    "mlp",  # feed-forward hidden width
    "heads",  # query heads
    "kv_heads",  # key/value heads (GQA)
    "head_dim",
    "vocab",
    "audio_frames",  # encoder time axis
    "mel",  # mel / fbank bins, conv input channels
    "conv_kernel",  # convolution taps
    "queries",  # Q-former query tokens
    "lora_rank",
    "layers",  # stacked (scanned) layers
    "norm",  # norm scales/biases (never sharded)
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "alm_jax_partitioning", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates logical→mesh rules for `constrain` calls made while tracing."""
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec`; a mesh axis is used once at most."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if isinstance(target, str):
      target = (target,)
    if target:
      target = tuple(a for a in target if a not in used)
      used.update(target)
    spec.append(target[0] if target and len(target) == 1 else (target or None))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without rules)."""
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  if x.ndim != len(axes):
    raise ValueError(f"constrain: array of rank {x.ndim} given {len(axes)} axis names {axes}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with mesh axes dropped (last first) from every dimension they do not divide evenly."""
  out = []
  for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = list((entry,) if isinstance(entry, str) else (entry or ()))
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    out.append(axes[0] if len(axes) == 1 else (tuple(axes) or None))
  return PartitionSpec(*out)


def per_shard(fn: Callable[..., jax.Array], args: Sequence[jax.Array], axes: Sequence[Sequence[str | None]],
              out_axes: Sequence[str | None], *, check_vma: bool = True) -> jax.Array:
  """Runs `fn(*args)` on each device's own shard of `args` (logical `axes`), giving an `out_axes` array.

  For computations that are independent along their sharded axes (per example,
  per head): a `shard_map` makes each device compute only its own slice, with
  whatever loops or transforms `fn` uses, where the SPMD partitioner would
  gather a batch split over devices before a `lax.map` over it or an FFT. The
  output takes its sharding from the first argument's axes of the same name.
  Without active rules (one device) this is `fn(*args)`. `fn` must not call
  `constrain`: inside, every array is device-local. `check_vma=False` is for
  bodies whose ops do not declare how their outputs vary over the mesh (Pallas
  kernels such as splash attention), as `jax.shard_map` documents.
  """
  context = _CONTEXT.get()
  if context is None:
    return fn(*args)
  mesh, rules = context
  in_specs = tuple(divisible_spec(a.shape, logical_to_spec(ax, rules), mesh) for a, ax in zip(args, axes))
  by_name = {}
  for spec, ax in zip(in_specs, axes):
    for name, entry in zip(ax, spec):
      if name is not None:
        by_name.setdefault(name, entry)
  out_spec = PartitionSpec(*(by_name.get(name) if name is not None else None for name in out_axes))

  def local(*local_args):
    token = _CONTEXT.set(None)
    try:
      return fn(*local_args)
    finally:
      _CONTEXT.reset(token)

  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=check_vma)(*args)
