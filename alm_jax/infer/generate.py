"""Batched text generation with a KV cache, prefill and decode in one jitted program.

`generate` takes token ids or precomputed input embeddings (the audio-LLM's
spliced prompt) with a padding mask (left, right or mixed padding all work:
positions come from the mask and padded cache slots stay masked), prefills the
cache, then decodes inside a `lax.while_loop` — no Python step per token —
until every row has emitted a stop token or `max_new_tokens` are done. The
prompt length is padded up to a bucket so one compiled program serves many
prompts: compilation happens once per (batch, prompt bucket, max_new_tokens,
sampling settings). `decode` is the same computation on a merged module, for
callers that embed it in their own jitted program.

Given a device `mesh` (and logical `rules`), `generate` runs the same program
sharded: each weight is placed by its logical axes (`embed` over `fsdp`,
heads/FFN/vocab over `tensor` under the default rules), the prompt rows split
over the `batch` axes, and the KV cache follows the `constrain` calls in
`init_cache`, so data- and tensor-parallel decoding give the one-device tokens.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alm_jax import sharding
from alm_jax.infer.sampling import SamplingConfig, sample
from alm_jax.models.llm import LLM, init_cache, positions_from_mask
from alm_jax.models.partitioning import Rules, constrain, logical_to_spec


class GenerateOutput(NamedTuple):
  """Generated ids [B, max_new] (stop token kept, `pad_id` after it) and lengths [B] (stop token counted)."""

  tokens: jax.Array
  lengths: jax.Array


def _last_real_index(mask: jax.Array) -> jax.Array:
  """Index [B] of each row's last real token (0 for an empty row)."""
  length = mask.shape[1]
  return jnp.max(jnp.where(mask, jnp.arange(length)[None, :], 0), axis=1)


def decode(
    model: LLM,
    *,
    tokens: jax.Array | None = None,
    embeddings: jax.Array | None = None,
    mask: jax.Array,
    key: jax.Array,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: jax.Array | None = None,
    pad_id: int = 0,
    cache_dtype=None,
) -> GenerateOutput:
  """Prefill + while-loop decode on a merged module (traceable; call it inside `jax.jit`).

  tokens [B, L] int or embeddings [B, L, D]; mask [B, L] bool (True = real
  token); stop_tokens int32 [N] (may be empty). Only the last real position
  of the prompt goes through the output projection.
  """
  if (tokens is None) == (embeddings is None):
    raise ValueError("pass exactly one of tokens or embeddings")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  x = model.embed(tokens) if embeddings is None else embeddings
  batch, length = mask.shape
  mask = mask.astype(jnp.bool_)
  stop_tokens = jnp.zeros((0,), jnp.int32) if stop_tokens is None else jnp.asarray(stop_tokens, jnp.int32)
  cache = init_cache(model.cfg, batch, length + max_new_tokens - 1, cache_dtype or x.dtype)

  layers = model.decode_layers()  # per-layer weights cut once here, outside the loop, if the config says so

  # Prefill: the whole prompt in one call, logits only at each row's last real token.
  hidden, cache = model(embeddings=x, positions=positions_from_mask(mask), mask=mask, cache=cache, cache_index=0,
                        return_hidden=True, layers=layers)
  last = hidden[jnp.arange(batch), _last_real_index(mask)]
  first = sample(model.logits(last), jax.random.fold_in(key, 0), sampling)
  done = jnp.isin(first, stop_tokens)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  state = (
      jnp.int32(1),  # step: index of the token to produce next
      cache,
      first,
      jnp.sum(mask, axis=1).astype(jnp.int32),  # position of the token fed next
      done,
      out,
      jnp.ones((batch,), jnp.int32),
  )

  def cond(state):
    step, _, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, token, position, done, out, lengths = state
    logits, cache = model(
        token[:, None], positions=position[:, None], mask=jnp.ones((batch, 1), jnp.bool_), cache=cache,
        cache_index=length + step - 1, layers=layers,
    )
    new = sample(logits[:, 0], jax.random.fold_in(key, step), sampling)
    new = jnp.where(done, pad_id, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(new, stop_tokens)
    out = constrain(out, ("batch", "length"))
    return step + 1, cache, new, position + 1, done, out, lengths

  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(state[5], state[6])


_STATIC = ("graphdef", "max_new_tokens", "sampling", "pad_id", "cache_dtype")


def _generate_program(graphdef, state, tokens, embeddings, mask, key, stop_tokens, *, max_new_tokens, sampling,
                      pad_id, cache_dtype):
  """`decode` on the module rebuilt from (graphdef, state): the function `generate` jits."""
  model = nnx.merge(graphdef, state)
  return decode(model, tokens=tokens, embeddings=embeddings, mask=mask, key=key, max_new_tokens=max_new_tokens,
                sampling=sampling, stop_tokens=stop_tokens, pad_id=pad_id, cache_dtype=cache_dtype)


_generate_jit = jax.jit(_generate_program, static_argnames=_STATIC)


@functools.lru_cache(maxsize=16)
def _generate_jit_sharded(mesh: Mesh, rules: Rules):
  """`_generate_jit`'s computation traced with `rules` bound, so `constrain` (the KV cache, activations) shards.

  One jitted function per (mesh, rules): jit caches by function, and a trace
  made without the rules must not serve a sharded call.
  """
  return jax.jit(sharding.bind_rules(_generate_program, mesh, rules), static_argnames=_STATIC)


def _check_split(what: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
  """Raises `ValueError` naming `what` when a mesh axis in `spec` does not divide its dimension."""
  for dim, entry in zip(shape, spec):
    names = (entry,) if isinstance(entry, str) else (entry or ())
    parts = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if dim % parts:
      raise ValueError(f"{what} {shape}: dimension {dim} does not split over mesh axes {entry} ({parts} devices); "
                       f"pass rules that leave it whole or a mesh that divides it")


def place_state(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
  """The model state on `mesh`: each variable sharded by its logical axes (`out_sharding` metadata) under `rules`.

  Variables without axis names (none in the LLM) are replicated. Raises
  `ValueError` for a dimension its mesh axes do not divide (14 heads over 8
  devices), rather than silently replicating it.
  """

  def one(path, variable):
    if not isinstance(variable, nnx.Variable):
      return jax.device_put(variable, NamedSharding(mesh, PartitionSpec()))
    value = variable.get_value()
    axes = variable.get_metadata().get("out_sharding")
    spec = logical_to_spec(tuple(axes), rules) if axes else PartitionSpec()
    _check_split("/".join(str(getattr(k, "key", k)) for k in path), tuple(value.shape), spec, mesh)
    return variable.replace(jax.device_put(value, NamedSharding(mesh, spec)))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def bucket_length(length: int, bucket: int) -> int:
  """`length` rounded up to a multiple of `bucket` (bucket 0 or 1 = exact)."""
  return length if bucket <= 1 else -(-length // bucket) * bucket


def generate(
    model: LLM | tuple[nnx.GraphDef, nnx.State],
    tokens: jax.Array | np.ndarray | None = None,
    *,
    embeddings: jax.Array | None = None,
    mask: jax.Array | np.ndarray | None = None,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] | None = None,
    pad_id: int = 0,
    seed: int | jax.Array = 0,
    length_bucket: int = 64,
    cache_dtype=None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> GenerateOutput:
  """Generates up to `max_new_tokens` per row, compiled once per shape; deterministic given `seed`.

  model: an `LLM`, or `(graphdef, state)` from `nnx.split` (state may be cast
  to bf16 or sharded). tokens [B, L] or embeddings [B, L, D], mask [B, L]
  (default all real). `stop_tokens` default to the model's
  `cfg.eos_token_ids` (pass `()` to run all steps). The prompt is padded on
  the right to a multiple of `length_bucket` (masked). Returns
  `GenerateOutput(tokens [B, max_new] int32, lengths [B] int32)`.

  mesh: run sharded over this (`data`, `fsdp`, `tensor`) mesh
  (`sharding.make_mesh`): the state is placed by its logical axes under
  `rules` (default `sharding.DEFAULT_RULES`), the prompt rows split over the
  `batch` axes (B must divide), and the program is traced with the rules bound
  so the KV cache is sharded too. Greedy tokens equal the unsharded run's.
  A state already placed (`place_state`) is not copied again.
  """
  program, args, static = _prepare(
      model, tokens, embeddings=embeddings, mask=mask, max_new_tokens=max_new_tokens, sampling=sampling,
      stop_tokens=stop_tokens, pad_id=pad_id, seed=seed, length_bucket=length_bucket, cache_dtype=cache_dtype,
      mesh=mesh, rules=rules)
  return program(*args, **static)


def lower(model: LLM | tuple[nnx.GraphDef, nnx.State], tokens: jax.Array | np.ndarray | None = None,
          **options) -> jax.stages.Lowered:
  """The program `generate(model, tokens, **options)` would run, lowered for those arguments.

  For ahead-of-time compiles (`.compile()`), compile-time measurements and
  checks of the partitioned program (its HLO, per-device memory), without
  generating anything.
  """
  bound = inspect.signature(generate).bind(model, tokens, **options)
  bound.apply_defaults()
  program, args, static = _prepare(**bound.arguments)
  return program.lower(*args, **static)


def _prepare(model, tokens, *, embeddings, mask, max_new_tokens, sampling, stop_tokens, pad_id, seed, length_bucket,
             cache_dtype, mesh, rules) -> tuple[Callable, tuple, dict]:
  """The jitted program, its arguments (padded, on the mesh if any) and static options for `generate`."""
  graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
  if stop_tokens is None:
    cfg = model.cfg if isinstance(model, nnx.Module) else nnx.merge(graphdef, state).cfg
    stop_tokens = cfg.eos_token_ids
  if (tokens is None) == (embeddings is None):
    raise ValueError("pass exactly one of tokens or embeddings")
  source = tokens if embeddings is None else embeddings
  batch, length = source.shape[:2]
  mask = jnp.ones((batch, length), jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
  if mask.shape != (batch, length):
    raise ValueError(f"mask shape {mask.shape} does not match the prompt's {(batch, length)}")
  padded = bucket_length(length, length_bucket)
  extra = padded - length
  if extra:
    mask = jnp.pad(mask, ((0, 0), (0, extra)))
    if embeddings is None:
      tokens = jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, extra)), constant_values=pad_id)
    else:
      embeddings = jnp.pad(embeddings, ((0, 0), (0, extra), (0, 0)))
  if tokens is not None:
    tokens = jnp.asarray(tokens, jnp.int32)
  key = jax.random.key(seed) if isinstance(seed, int) else seed
  # Stop ids padded with -1 (never sampled) to a multiple of 8, so changing them rarely recompiles.
  stops = [int(t) for t in stop_tokens]
  stops = jnp.asarray(np.asarray(stops + [-1] * (max(8, bucket_length(len(stops), 8)) - len(stops)), np.int32))
  program = _generate_jit
  if mesh is not None:
    rules = tuple((name, tuple(t) if isinstance(t, list) else t)
                  for name, t in (sharding.make_rules() if rules is None else rules))
    program = _generate_jit_sharded(mesh, rules)
    state = place_state(state, mesh, rules)
    rows = logical_to_spec(("batch",), rules)
    _check_split("prompt batch", (batch,), rows, mesh)
    spread = lambda x: None if x is None else jax.device_put(
        x, NamedSharding(mesh, PartitionSpec(*rows, *(None,) * (x.ndim - 1))))
    tokens, embeddings, mask = spread(tokens), spread(embeddings), spread(mask)
    key, stops = jax.device_put((key, stops), NamedSharding(mesh, PartitionSpec()))
  static = dict(max_new_tokens=int(max_new_tokens), sampling=sampling, pad_id=int(pad_id), cache_dtype=cache_dtype)
  return program, (graphdef, state, tokens, embeddings, mask, key, stops), static
