"""One attention entry point; the implementation is named by the caller (model config), never guessed.

`attention(q, k, v, impl=...)` computes softmax attention with grouped-query
heads (q `[B, T, H, D]`, k/v `[B, S, K, D]`, H a multiple of K) and one set of
masking semantics for every implementation:

* `xla`: einsum math with float32 logits and softmax (the CPU path and the
  reference); `head_block > 0` loops over (example, head, query block), which
  is about 3x faster on CPU, on each device's own shard.
* `splash`: the Pallas TPU splash-attention kernel shipped with jax, per
  device under a mesh; `interpret=True` runs it on CPU for tests.
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU,
  fp16/bf16 only).

Model code passes the choice down from its config; nothing here asks JAX which
backend or devices it runs on, so the program compiled ahead of time for a TPU
on a CPU host is the one the TPU runs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from alm_jax.models.partitioning import per_shard

IMPLEMENTATIONS = ("xla", "splash", "cudnn")

# Splash tiles: query and key/value blocks (forward and backward) are the largest of these that divides the
# sequence padded to a multiple of 128 (the TPU lane width, the kernel's smallest block): long sequences get
# 512-row tiles (better MXU use, fewer grid steps), short ones no more padding than 128-multiples need.
SPLASH_BLOCKS = (512, 256, 128)
SPLASH_ALIGN = 128


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "xla",
    causal: bool = False,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    head_block: int = 0,
    interpret: bool = False,
) -> jax.Array:
  """Softmax attention `[B, T, H, D]` of q `[B, T, H, D]` over k/v `[B, S, K, D]` by the named implementation.

  Query i may attend key j iff all given conditions hold: `causal` → j <= i
  (self-attention, S == T); `key_valid[b, j]` (`[B, S]` bool: key padding);
  `segment_ids[b, i] == segment_ids[b, j]` (`[B, T]` int, packed rows,
  self-attention); `mask[..., i, j]` (bool, broadcastable to `[B, H, T, S]`).
  `bias` (broadcastable to `[B, H, T, S]`) is added to the logits; `scale`
  defaults to D**-0.5. A query row with no key to attend to is undefined
  (xla: the uniform average of all values); callers zero such rows.

  `head_block > 0` (xla only) computes one example, head and `head_block`
  query rows at a time. `interpret` runs the splash kernel in Pallas
  interpret mode (CPU tests). Splash takes neither `mask` nor `bias`.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r} (known: {', '.join(IMPLEMENTATIONS)})")
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  key_valid = None if key_valid is None else jnp.asarray(key_valid, jnp.bool_)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  _check_shapes(q, k, v, causal=causal, key_valid=key_valid, segment_ids=segment_ids)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if head_block < 0:
    raise ValueError(f"head_block must be >= 0, got {head_block}")
  if head_block and impl != "xla":
    raise ValueError(f"head_block={head_block} is an option of the xla implementation, not of {impl!r}")
  if impl == "splash":
    if mask is not None or bias is not None:
      given = " and ".join(n for n, x in (("mask", mask), ("bias", bias)) if x is not None)
      raise ValueError(f"attention implementation 'splash' cannot take a dense {given}: "
                       "express masking as causal, key_valid and segment_ids, or use impl='xla'")
    return splash_attention(q, k, v, causal=causal, key_valid=key_valid, segment_ids=segment_ids, scale=scale,
                            interpret=interpret)
  if impl == "cudnn":
    if q.dtype not in (jnp.float16, jnp.bfloat16):
      raise ValueError(f"attention implementation 'cudnn' needs float16 or bfloat16 q/k/v, got {q.dtype}")
    args = cudnn_arguments(q, k, v, causal=causal, key_valid=key_valid, segment_ids=segment_ids, mask=mask,
                           bias=bias, scale=scale)
    return jax.nn.dot_product_attention(**args, implementation="cudnn")
  if head_block:
    return blocked_attention(q, k, v, causal=causal, key_valid=key_valid, segment_ids=segment_ids, mask=mask,
                             bias=bias, scale=scale, block=head_block)
  dense = combined_mask(q.shape[1], k.shape[1], causal=causal, key_valid=key_valid, segment_ids=segment_ids,
                        mask=mask)
  return xla_attention(q, k, v, mask=dense, bias=bias, scale=scale)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, key_valid: jax.Array | None,
                  segment_ids: jax.Array | None) -> None:
  """Raises ValueError for shapes the semantics do not cover (rank, GQA ratio, causal or packed cross-attention)."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"attention takes q [B, T, H, D] and k, v [B, S, K, D], got {q.shape}, {k.shape}, {v.shape}")
  (batch, t, heads, dim), (_, s, kv_heads, _) = q.shape, k.shape
  if k.shape[0] != batch or k.shape[3] != dim:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
  if (causal or segment_ids is not None) and s != t:
    what = "causal" if causal else "segment_ids"
    raise ValueError(f"{what} attention is self-attention: needs as many keys as queries, got {s} and {t}")
  if key_valid is not None and key_valid.shape != (batch, s):
    raise ValueError(f"key_valid must be [B, S] = {(batch, s)}, got {key_valid.shape}")
  if segment_ids is not None and segment_ids.shape != (batch, t):
    raise ValueError(f"segment_ids must be [B, T] = {(batch, t)}, got {segment_ids.shape}")


def _as_4d(x: jax.Array) -> jax.Array:
  return x.reshape((1,) * (4 - x.ndim) + x.shape)


def combined_mask(t: int, s: int, *, causal: bool = False, key_valid: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array | None:
  """The boolean mask (True = attend) `[B|1, H|1, T|1, S]` the conditions describe, None when none are given.

  A lone `mask` is returned as given (reshaped to 4-D), so callers passing one
  get bitwise the results they had before.
  """
  parts = []
  if mask is not None:
    parts.append(_as_4d(jnp.asarray(mask, jnp.bool_)))
  if causal:
    parts.append((jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None])  # iota, not a [T, S] constant
  if key_valid is not None:
    parts.append(key_valid.astype(jnp.bool_)[:, None, None, :])
  if segment_ids is not None:
    parts.append((segment_ids[:, :, None] == segment_ids[:, None, :])[:, None])
  return functools.reduce(jnp.logical_and, parts) if parts else None


# ---------------------------------------------------------------------------
# xla: einsum math, one fused computation or a blocked loop.


def _split_heads_of(x: jax.Array, kv_heads: int, groups: int) -> jax.Array:
  """[..., H|1, T, S] → [..., K|1, G|1, T, S] for grouped-query broadcasting."""
  h = x.shape[-3]
  if h == 1:
    return x[..., None, :, :]
  return x.reshape(x.shape[:-3] + (kv_heads, groups) + x.shape[-2:])


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Softmax attention with grouped-query support in float32 logits (what `layers.dot_product_attention` computes).

  `mask` is boolean (True = attend) and `bias` additive, each broadcastable to
  [B, H, T, S]. Masked logits become `finfo(float32).min`, so fully masked rows
  give a uniform average (as PyTorch's additive mask does).
  """
  batch, t, heads, dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
  groups = heads // kv_heads
  scale = dim**-0.5 if scale is None else scale
  qg = q.reshape(batch, t, kv_heads, groups, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias = _as_4d(jnp.asarray(bias, jnp.float32))
    logits = logits + _split_heads_of(bias, kv_heads, groups)
  if mask is not None:
    mask = _as_4d(mask)
    logits = jnp.where(_split_heads_of(mask, kv_heads, groups), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, t, heads, dim)


def _key_padding(mask: jax.Array, batch: int, s: int) -> jax.Array:
  """A key-only mask `[B|1, 1, 1, S]` as `[B, S]`; ValueError for masks that vary with head or query."""
  mask = _as_4d(jnp.asarray(mask, jnp.bool_))
  if mask.shape[1:3] != (1, 1):
    raise ValueError(f"head_block attention takes only a key-padding mask [B, 1, 1, S], got {mask.shape}; "
                     "pass causal, key_valid and segment_ids instead")
  return jnp.broadcast_to(mask[:, 0, 0, :], (batch, s))


def _grouped_per_shard(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
                       key_valid: jax.Array | None, segment_ids: jax.Array | None, *,
                       check_vma: bool = True) -> jax.Array:
  """Runs `fn(q, k, v, key_valid, segment_ids)` on each device's own examples and heads.

  q is viewed as `[B, T, K, G, D]` so the query heads of one kv head always
  sit on the same device as that kv head: q and k/v split over the same
  K-sized axis (`heads` for plain multi-head attention, `kv_heads` for GQA),
  whatever the mesh.
  """
  batch, t, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  name = "heads" if groups == 1 else "kv_heads"
  grouped = ("batch", None, name, None, None)
  kv_axes = ("batch", None, name, None)
  optional = {key: x for key, x in (("key_valid", key_valid), ("segment_ids", segment_ids)) if x is not None}
  args = [q.reshape(batch, t, kv_heads, groups, dim), k, v, *optional.values()]
  axes = [grouped, kv_axes, kv_axes] + [("batch", None)] * len(optional)

  def local(q, k, v, *rest):
    given = dict(zip(optional, rest))
    b, t_, kv, g, d = q.shape
    out = fn(q.reshape(b, t_, kv * g, d), k, v, given.get("key_valid"), given.get("segment_ids"))
    return out.reshape(q.shape)

  return per_shard(local, args, axes, grouped, check_vma=check_vma).reshape(batch, t, heads, dim)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    block: int,
) -> jax.Array:
  """xla attention one example, head and at most `block` query rows at a time, on each device's own shard.

  Looping over (example·head, query block) turns attention into plain 2-D
  matmuls on cache-sized logits, about 3x faster than one batched einsum on
  CPU; masks are built per block, never as a `[B, H, T, S]` array. Takes
  `mask` only as key padding `[B|1, 1, 1, S]`, and no `bias`.
  """
  if bias is not None:
    raise ValueError("head_block attention takes no bias; use head_block=0")
  batch, t, _, dim = q.shape
  if mask is not None:
    padding = _key_padding(mask, batch, k.shape[1])
    key_valid = padding if key_valid is None else key_valid & padding
  scale = dim**-0.5 if scale is None else scale
  fn = functools.partial(_blocked_local, causal=causal, scale=scale, block=block)
  return _grouped_per_shard(fn, q, k, v, key_valid, segment_ids)


def _blocked_local(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None,
                   segment_ids: jax.Array | None, *, causal: bool, scale: float, block: int) -> jax.Array:
  """The blocked loop on device-local arrays (see `blocked_attention`)."""
  batch, length, heads, dim = q.shape
  keys, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  n = -(-length // block)
  block = -(-length // n)  # as even as possible: 1500 rows → 3 blocks of 500, no padding
  padded = n * block
  q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, D]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, padded - length), (0, 0))).reshape(batch * heads * n, block, dim)
  k = k.transpose(0, 2, 1, 3).reshape(batch * kv_heads, keys, dim)
  v = v.transpose(0, 2, 1, 3).reshape(batch * kv_heads, keys, dim)
  if segment_ids is not None:
    q_segments = jnp.pad(segment_ids, ((0, 0), (0, padded - length))).reshape(batch, n, block)

  def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    index, qb = args
    row, i = index // n, index % n  # row = example · heads + head
    b, kv = row // heads, (row // heads) * kv_heads + (row % heads) // groups
    logits = jnp.einsum("td,sd->ts", qb, k[kv], preferred_element_type=jnp.float32)
    allowed = []
    if key_valid is not None:
      allowed.append(key_valid[b][None, :])
    if causal:
      allowed.append(jnp.arange(keys)[None, :] <= (i * block + jnp.arange(block))[:, None])
    if segment_ids is not None:
      allowed.append(q_segments[b, i][:, None] == segment_ids[b][None, :])
    if allowed:
      logits = jnp.where(functools.reduce(jnp.logical_and, allowed), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return probs @ v[kv]

  out = jax.lax.map(one, (jnp.arange(batch * heads * n), q))  # [B·H·n, block, D]
  out = out.reshape(batch, heads, padded, dim)[:, :, :length]
  return out.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------
# splash: the Pallas TPU kernel.


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_block(length: int) -> int:
  """The splash tile for a sequence padded to `length` (a multiple of 128): the largest of SPLASH_BLOCKS dividing it."""
  return next(b for b in SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool) -> Any:
  """The splash kernel for `heads` query heads over padded lengths `t`, `s`.

  Built once per shape: the kernel analyses its mask block by block in numpy.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  one = mask_lib.CausalMask((t, s)) if causal else mask_lib.FullMask((t, s))
  bq, bkv = splash_block(t), splash_block(s)
  blocks = kernel_lib.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():  # concrete mask tables, never tracers of the trace that first asked
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_segment_ids(t: int, s: int, key_valid: jax.Array | None, segment_ids: jax.Array | None,
                       batch: int) -> tuple[jax.Array, jax.Array]:
  """Query and key segment ids `[B, T']`, `[B, S']` (lengths padded to 128-multiples) for the splash kernel.

  Queries keep their segment (0 when unpacked); invalid and padding keys get
  an id below every query's, so nothing attends to them, and padding queries
  share it (their rows are dropped).
  """
  base = jnp.zeros((batch, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  none = jnp.min(base) - 1 if segment_ids is not None else jnp.int32(-1)
  keys = base if segment_ids is not None else jnp.zeros((batch, s), jnp.int32)
  if key_valid is not None:
    keys = jnp.where(key_valid, keys, none)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=none)
  return pad(base, _round_up(t, SPLASH_ALIGN)), pad(keys, _round_up(s, SPLASH_ALIGN))


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Attention by the splash kernel, per device (batch and heads split as the mesh rules say).

  Pads T and S to multiples of 128 (segment ids keep padding out), maps
  `key_valid` and `segment_ids` to the kernel's SegmentIds, scales q before
  the kernel and vmaps it over examples; GQA is the kernel's own (k/v heads
  `[K, S, D]` shared by H / K query heads each).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  fn = functools.partial(_splash_local, causal=causal, scale=scale, interpret=interpret)
  # The kernel's pallas_calls do not declare how their outputs vary over the mesh, which shard_map's
  # varying-manual-axes check requires; each output is per device by construction.
  return _grouped_per_shard(fn, q, k, v, key_valid, segment_ids, check_vma=False)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None,
                  segment_ids: jax.Array | None, *, causal: bool, scale: float, interpret: bool) -> jax.Array:
  """The splash kernel on device-local arrays (see `splash_attention`)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

  batch, t, heads, _ = q.shape
  s = k.shape[1]
  q_ids, kv_ids = splash_segment_ids(t, s, key_valid, segment_ids, batch)
  tp, sp = q_ids.shape[1], kv_ids.shape[1]
  heads_major = lambda x, n: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))
  q = heads_major(q * jnp.asarray(scale, q.dtype), tp)
  k, v = heads_major(k, sp), heads_major(v, sp)
  kernel = jax.vmap(_splash_kernel(heads, tp, sp, causal, interpret))
  if q.dtype != jnp.float32:
    kernel = _traced_at_default_precision(kernel)
  out = kernel(q, k, v, kernel_lib.SegmentIds(q=q_ids, kv=kv_ids))  # [B, H, T', D]
  return out[:, :, :t].transpose(0, 2, 1, 3)


def _traced_at_default_precision(fn):
  """`fn` with its forward and backward traced at the default matmul precision.

  Mosaic refuses fp32 contract precision on bf16/fp16 operands ("Bad lhs
  type"), which `jax_default_matmul_precision="highest"` asks of every kernel
  dot; the backward kernels are traced when JAX differentiates, outside any
  context the caller sets, hence the custom VJP.
  """

  @jax.custom_vjp
  def call(*args):
    with jax.default_matmul_precision("default"):
      return fn(*args)

  def forward(*args):
    with jax.default_matmul_precision("default"):
      return jax.vjp(fn, *args)

  def backward(vjp, cotangent):
    with jax.default_matmul_precision("default"):
      return vjp(cotangent)

  call.defvjp(forward, backward)
  return call


# ---------------------------------------------------------------------------
# cudnn: jax.nn.dot_product_attention's cuDNN flash attention.


def cudnn_arguments(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    key_valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> dict[str, Any]:
  """Keyword arguments of `jax.nn.dot_product_attention` for these semantics (add `implementation=`).

  Causality goes to `is_causal` (cuDNN skips the masked blocks); key padding,
  packing and a dense mask become one boolean mask, and mask and bias are
  broadcast to full `[.., .., T, S]` extents as cuDNN requires.
  """
  t, s = q.shape[1], k.shape[1]
  dense = combined_mask(t, s, key_valid=key_valid, segment_ids=segment_ids, mask=mask)
  full = lambda x: jnp.broadcast_to(x, x.shape[:2] + (t, s))
  return dict(
      query=q, key=k, value=v, scale=q.shape[-1] ** -0.5 if scale is None else scale, is_causal=causal,
      mask=None if dense is None else full(dense), bias=None if bias is None else full(_as_4d(jnp.asarray(bias))))
