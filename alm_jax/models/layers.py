"""Layers shared by every model: linear maps (with optional LoRA), norms,
embeddings, MLPs and attention.

Every weight carries logical axis names (`out_sharding` metadata, see
`partitioning.py`), created with `eager_sharding=False` so building a model
never needs a mesh. Parameters are stored in float32; a caller that wants bf16
compute casts the parameter tree before merging it (see `alm_jax.train`), and
norms and softmax always run in float32.
"""

from __future__ import annotations

import math
import string
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.models.attention import xla_attention
from alm_jax.models.partitioning import constrain

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

default_init = nnx.initializers.normal(stddev=0.02)  # embeddings, learned queries and tables


def fan_in_init(fan_in: int) -> Initializer:
  """Normal with std 1/sqrt(fan_in) (LeCun): unit-scale outputs for kernels trained from scratch.

  A fixed 0.02 suits wide pretrained-style models but shrinks a narrow
  model's conv stem below its position table, so weights start near blind
  to the input; imported checkpoints overwrite the init either way.
  """
  return nnx.initializers.normal(stddev=float(fan_in) ** -0.5)


class LoRAParam(nnx.Param):
  """A LoRA adapter weight: a separate leaf type so stages can select adapters."""


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    axes: Axes,
    dtype=jnp.float32,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
  """Creates a parameter annotated with logical axes (one name per dimension)."""
  shape = tuple(int(s) for s in shape)
  if len(axes) != len(shape):
    raise ValueError(f"param of shape {shape} given {len(axes)} axis names {axes}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return kind(init(key, shape, dtype), eager_sharding=False, out_sharding=tuple(axes))


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (int(x),) if isinstance(x, int) else tuple(int(v) for v in x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Activation by name, matching the PyTorch/HF definitions exactly."""
  table = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "relu": jax.nn.relu,
      "tanh": jnp.tanh,
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r} (known: {', '.join(sorted(table))})")
  return table[name]


class Linear(nnx.Module):
  """y = x·W (+ b) over the last `len(in_features)` dims, with optional LoRA.

  `in_features`/`out_features` may be tuples (e.g. `(heads, head_dim)`), so the
  kernel keeps head structure for sharding; `in_axes`/`out_axes` name each
  dimension. With `lora_rank > 0` two extra leaves `lora_a` (in, r) and
  `lora_b` (r, out, zero-initialised) add `alpha / r · x·A·B`, so a fresh
  adapter leaves the output unchanged.
  """

  def __init__(
      self,
      in_features: int | Sequence[int],
      out_features: int | Sequence[int],
      *,
      in_axes: Axes,
      out_axes: Axes,
      use_bias: bool = True,
      kernel_init: Initializer | None = None,
      lora_rank: int = 0,
      lora_alpha: float = 1.0,
      rngs: nnx.Rngs | None,
  ):
    self.in_shape = _as_tuple(in_features)
    self.out_shape = _as_tuple(out_features)
    self.in_axes = tuple(in_axes)
    self.out_axes = tuple(out_axes)
    kernel_init = kernel_init or fan_in_init(math.prod(self.in_shape))
    self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape, self.in_axes + self.out_axes)
    self.bias = param(rngs, nnx.initializers.zeros, self.out_shape, self.out_axes) if use_bias else None
    self.lora_rank = int(lora_rank)
    self.lora_alpha = float(lora_alpha)
    if self.lora_rank > 0:
      self.add_lora(self.lora_rank, self.lora_alpha, rngs)
    else:
      self.lora_a = nnx.data(None)  # data slots, so adapters can be added later
      self.lora_b = nnx.data(None)

  def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs | None) -> None:
    """Adds zero-effect LoRA adapters (A random, B zero) of the given rank.

    On a stacked layer (kernel `[N, *in, *out]`, see `models/stack.py`) each
    layer gets its own adapter: both leaves carry the same leading axis.
    """
    fan_in = math.prod(self.in_shape)
    a_init = nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    lead, lead_axes = self._stacked_dims()
    self.lora_rank, self.lora_alpha = int(rank), float(alpha)
    self.lora_a = param(rngs, a_init, lead + self.in_shape + (rank,), lead_axes + self.in_axes + ("lora_rank",),
                        kind=LoRAParam)
    self.lora_b = param(rngs, nnx.initializers.zeros, lead + (rank,) + self.out_shape,
                        lead_axes + ("lora_rank",) + self.out_axes, kind=LoRAParam)

  def _stacked_dims(self) -> tuple[tuple[int, ...], Axes]:
    """Leading dimensions (and their axis names) the kernel has beyond `in + out`: () for one layer."""
    extra = self.kernel.ndim - len(self.in_shape) - len(self.out_shape)
    axes = self.kernel.get_metadata().get("out_sharding") or (None,) * self.kernel.ndim
    return tuple(self.kernel.shape[:extra]), tuple(axes[:extra])

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def _equations(self) -> tuple[str, str, str]:
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    letters = string.ascii_lowercase
    ins, outs = letters[:n_in], letters[n_in : n_in + n_out]
    return f"...{ins},{ins}{outs}->...{outs}", f"...{ins},{ins}r->...r", f"...r,r{outs}->...{outs}"

  def merged_kernel(self) -> jax.Array:
    """The kernel with the LoRA update folded in (the kernel itself if no LoRA); stacked layers too."""
    if self.lora_a is None:
      return self.kernel[...]
    lead, _ = self._stacked_dims()
    a = self.lora_a[...].reshape(lead + (-1, self.lora_rank))
    b = self.lora_b[...].reshape(lead + (self.lora_rank, -1))
    delta = (a @ b).reshape(self.kernel.shape) * self.lora_scale
    return self.kernel[...] + delta.astype(self.kernel.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    main, down, up = self._equations()
    kernel = self.kernel[...]
    y = jnp.einsum(main, x, kernel.astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora_a is not None:
      h = jnp.einsum(down, x, self.lora_a[...].astype(x.dtype))
      y = y + self.lora_scale * jnp.einsum(up, h, self.lora_b[...].astype(x.dtype))
    return y


class LayerNorm(nnx.Module):
  """LayerNorm in float32 with scale and (optional) bias, as torch.nn.LayerNorm."""

  def __init__(self, dim: int, *, eps: float = 1e-5, use_bias: bool = True, rngs: nnx.Rngs | None = None):
    self.eps = float(eps)
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm as Qwen/Llama define it: normalise in float32, cast, then scale."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
    self.eps = float(eps)
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table (vocab, embed); `attend` is the tied output projection."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs | None):
    self.embedding = param(rngs, default_init, (vocab_size, dim), ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(x.dtype))


class MLP(nnx.Module):
  """fc1 → activation → fc2, both with bias (Whisper, BEATs, BERT)."""

  def __init__(self, dim: int, hidden: int, *, act: str = "gelu", use_bias: bool = True, rngs: nnx.Rngs | None):
    self.act = act
    self.fc1 = Linear(dim, hidden, in_axes=("embed",), out_axes=("mlp",), use_bias=use_bias, rngs=rngs)
    self.fc2 = Linear(hidden, dim, in_axes=("mlp",), out_axes=("embed",), use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = activation(self.act)(self.fc1(x))
    h = constrain(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
    return self.fc2(h)


# Softmax attention in float32 logits with grouped-query heads and mask/bias (`attention.xla_attention`), under
# the name the encoders and the Q-former call; config-selected implementations go through `attention.attention`.
dot_product_attention = xla_attention


class MultiHeadAttention(nnx.Module):
  """Multi-head (self- or cross-) attention with per-projection bias switches.

  Used by the audio encoders and the Q-former. `kv_dim` differs from `dim` for
  cross-attention to another tower's features.
  """

  def __init__(
      self,
      dim: int,
      num_heads: int,
      *,
      kv_dim: int | None = None,
      head_dim: int | None = None,
      q_bias: bool = True,
      k_bias: bool = True,
      v_bias: bool = True,
      out_bias: bool = True,
      rngs: nnx.Rngs | None,
  ):
    kv_dim = dim if kv_dim is None else kv_dim
    if head_dim is None:
      if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
      head_dim = dim // num_heads
    self.num_heads, self.head_dim = num_heads, head_dim
    hd = (num_heads, head_dim)
    self.q_proj = Linear(dim, hd, in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=q_bias, rngs=rngs)
    self.k_proj = Linear(kv_dim, hd, in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=k_bias, rngs=rngs)
    self.v_proj = Linear(kv_dim, hd, in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=v_bias, rngs=rngs)
    self.out_proj = Linear(hd, dim, in_axes=("heads", "head_dim"), out_axes=("embed",), use_bias=out_bias, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      kv: jax.Array | None = None,
      *,
      mask: jax.Array | None = None,
      bias: jax.Array | None = None,
  ) -> jax.Array:
    kv = x if kv is None else kv
    q, k, v = self.q_proj(x), self.k_proj(kv), self.v_proj(kv)
    out = dot_product_attention(q, k, v, mask=mask, bias=bias)
    return self.out_proj(out)


def padding_mask_2d(valid: jax.Array) -> jax.Array:
  """[B, S] bool validity → [B, 1, 1, S] key mask for `dot_product_attention`."""
  return valid[:, None, None, :]


# Rematerialisation policies selectable from config (what the backward pass may keep).
REMAT_POLICIES = {
    "none": None,  # keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}

