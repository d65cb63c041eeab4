"""A tower's repeated layers: stacked on a leading `layers` axis and run by a scan, or kept as a list.

Pod-scale JAX models keep N identical layers as one module whose every
parameter has a leading `layers` dimension (logical axis `layers`), and run
them with `jax.lax.scan`: the compiler sees one layer body instead of N copies,
so compile time and program size stop growing with depth. `build` makes either
form from a one-layer factory (`scan=False` keeps `layers/{i}/...` paths for
code that wants them unrolled), `run` runs either form with the same body and
the tower's remat policy on each layer. Checkpoint maps name layers one by one
(`layers/{i}/...`); `alm_jax.checkpoints.mapping` stacks and unstacks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx

from alm_jax.models import layers

LAYERS_AXIS = "layers"  # the logical axis of the stacked dimension (never sharded by the default rules)

# body(layer, carry, per_layer_input) -> (carry, per_layer_output); either may be None.
Body = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


def build(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs | None, *,
          scan: bool) -> nnx.Module:
  """`num_layers` layers from `make_layer(rngs)`: one stacked module if `scan`, else an `nnx.List`.

  The stacked module is the layer with every parameter widened by a leading
  axis of size `num_layers`, named `layers` in its sharding metadata; each
  layer gets its own random key, so both forms initialise independently.
  No layers is an empty list either way: a stacked module of zero layers would
  hold zero-size parameters, which checkpoints cannot save.
  """
  if not scan or num_layers == 0:
    return nnx.List([make_layer(rngs) for _ in range(num_layers)])
  key = rngs.params() if rngs is not None else jax.random.key(0)
  keys = jax.random.split(key, num_layers)

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def create(layer_key: jax.Array) -> nnx.Module:
    return make_layer(nnx.Rngs(layer_key))

  return create(keys)


def is_stacked(stack: nnx.Module) -> bool:
  """Whether `stack` came from `build(..., scan=True)` (else it is a list of layers)."""
  return not isinstance(stack, nnx.List)


def unstack(stack: nnx.Module) -> nnx.List:
  """The layers of a stacked module as a list of one-layer modules over static slices of its weights.

  Inside a traced function the slices are made where this is called: called
  before a loop (decoding), each layer's weights are cut out once instead of a
  scan's dynamic slice copying them every iteration on backends that cannot
  read a slice in place (XLA:CPU); the cost is one extra copy of the weights
  while the result lives. A list is returned as it is.
  """
  if not is_stacked(stack):
    return stack
  graphdef, state = nnx.split(stack)
  count = jax.tree.leaves(state)[0].shape[0]
  return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(count)])


def _checkpointed(fn: Callable, policy: str, *, in_scan: bool) -> Callable:
  if policy not in layers.REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r} (known: {', '.join(layers.REMAT_POLICIES)})")
  if policy == "none":
    return fn
  # Inside a scan the loop already keeps XLA from merging the recomputation into the forward pass.
  return jax.checkpoint(fn, policy=layers.REMAT_POLICIES[policy], prevent_cse=not in_scan)


def run(stack: nnx.Module, body: Body, carry: Any, *, remat: str = "none", per_layer: Any = None) -> tuple[Any, Any]:
  """Threads `carry` through every layer of `stack` with `body`, under the remat policy.

  `per_layer` holds each layer's own input (a KV cache slot): for a stacked
  module a pytree whose leaves lead with the layer axis, for a list a sequence
  with one entry per layer (None: no per-layer input). The per-layer outputs
  come back in the same form: stacked by the scan, or a list.
  """
  if is_stacked(stack):
    graphdef, state = nnx.split(stack)

    def step(carry, inputs):
      layer_state, layer_input = inputs
      return body(nnx.merge(graphdef, layer_state), carry, layer_input)

    return jax.lax.scan(_checkpointed(step, remat, in_scan=True), carry, (state, per_layer))
  outputs = []
  inputs: Sequence[Any] = per_layer if per_layer is not None else [None] * len(stack)
  for layer, layer_input in zip(stack, inputs):
    graphdef, state = nnx.split(layer)

    def step(state, carry, layer_input, graphdef=graphdef):
      return body(nnx.merge(graphdef, state), carry, layer_input)

    carry, out = _checkpointed(step, remat, in_scan=False)(state, carry, layer_input)
    outputs.append(out)
  return carry, outputs
