"""BEATs audio encoder in Flax NNX, following the official microsoft/unilm code.

Normalised Kaldi fbank `[B, T, 128]` → 16×16 patches (Conv2d 1→512, no bias),
flattened time-major (token 8·t + f) → LayerNorm → `post_extract_proj` →
+ GELU(weight-normed grouped conv positions) → LayerNorm → post-LN DeepNorm
layers whose attention adds a T5-style relative position bias (one table, shared
by all layers) gated per layer from the query (`grep_linear`, `grep_a`).

The encoder returns patch tokens `[B, Tp·8, D]`; `time_frames` averages the 8
frequency patches of each 160 ms step into `[B, Tp, D]` for time-aligned use.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.config import require
from alm_jax.models import layers, stack
from alm_jax.models.partitioning import constrain

# Feed-forward activations of the BEATs encoders (`layers.activation` names).
ACTIVATIONS = ("gelu", "gelu_new", "relu", "tanh")


@dataclasses.dataclass(frozen=True)
class BeatsConfig:
  """Shape and behaviour of a BEATs encoder (defaults: the released iter3 / iter3+ models).

  Attributes:
    n_mels: fbank bins of the input (128).
    patch_size: square patch side in frames and bins (16).
    patch_dim: patch embedding width (`embed_dim`, 512).
    patch_bias: whether the patch convolution has a bias (`conv_bias`).
    width: encoder width (`encoder_embed_dim`, 768).
    num_layers: transformer layers.
    num_heads: attention heads.
    ffn_dim: feed-forward hidden width.
    activation: feed-forward activation (`layers.activation` name).
    deep_norm: residual scaled by α = (2·layers)^¼ before each post-LN.
    conv_pos: kernel of the convolutional position embedding.
    conv_pos_groups: groups of that convolution.
    relative_position_embedding: add the T5-style bucketed relative position bias.
    num_buckets: relative position buckets (both directions together).
    max_distance: distance mapped to the last bucket.
    gru_rel_pos: gate the bias per layer from the query (`grep_linear`, `grep_a`).
    layer_norm_eps: epsilon of every LayerNorm.
    remat: rematerialisation policy of each layer (`layers.REMAT_POLICIES`).
    scan_layers: stack the layers and run them with a scan (`models/stack.py`);
      False keeps a Python loop over `layers/{i}`.
  """

  n_mels: int = 128
  patch_size: int = 16
  patch_dim: int = 512
  patch_bias: bool = False
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  ffn_dim: int = 3072
  activation: str = "gelu"
  deep_norm: bool = True
  conv_pos: int = 128
  conv_pos_groups: int = 16
  relative_position_embedding: bool = True
  num_buckets: int = 320
  max_distance: int = 800
  gru_rel_pos: bool = True
  layer_norm_eps: float = 1e-5
  remat: str = "none"
  scan_layers: bool = True

  def __post_init__(self):
    require(self.patch_size > 0, "beats.patch_size", f"must be positive, got {self.patch_size}")
    require(
        self.n_mels % self.patch_size == 0,
        "beats.n_mels",
        f"{self.n_mels} bins are not a whole number of {self.patch_size}-bin patches",
    )
    require(
        self.width % self.num_heads == 0, "beats.num_heads", f"width {self.width} not divisible by {self.num_heads}"
    )
    require(
        self.width % self.conv_pos_groups == 0,
        "beats.conv_pos_groups",
        f"width {self.width} not divisible into {self.conv_pos_groups} groups",
    )
    require(self.num_layers >= 1, "beats.num_layers", "must be >= 1")
    require(self.conv_pos > 0, "beats.conv_pos", "must be positive")
    require(self.num_buckets >= 4, "beats.num_buckets", "must be >= 4")
    require(self.max_distance > self.num_buckets // 4, "beats.max_distance", "must exceed num_buckets / 4")
    require(
        self.activation in ACTIVATIONS,
        "beats.activation",
        f"unknown activation {self.activation!r} (known: {', '.join(sorted(ACTIVATIONS))})",
    )
    require(
        self.remat in layers.REMAT_POLICIES,
        "beats.remat",
        f"unknown policy {self.remat!r} (known: {', '.join(layers.REMAT_POLICIES)})",
    )

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def freq_patches(self) -> int:
    """Frequency patches per time step (8 for 128 bins)."""
    return self.n_mels // self.patch_size

  @property
  def deep_norm_alpha(self) -> float:
    return math.pow(2 * self.num_layers, 0.25) if self.deep_norm else 1.0


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
  """Bidirectional T5 buckets `[length, length]` of key − query offsets, as BEATs computes them.

  Half the buckets per direction; offsets below a quarter of `num_buckets` get
  their own bucket, larger ones share log-spaced buckets up to `max_distance`.
  """
  half = num_buckets // 2
  exact = half // 2
  offsets = jnp.arange(-(length - 1), length, dtype=jnp.int32)  # every key - query offset
  distance = jnp.abs(offsets)
  scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
  large = jnp.minimum(exact + (scaled * (half - exact)).astype(jnp.int32), half - 1)
  buckets = jnp.where(offsets > 0, half, 0) + jnp.where(distance < exact, distance, large)
  index = jnp.arange(length)[None, :] - jnp.arange(length)[:, None] + (length - 1)
  return buckets[index]


def grouped_conv1d(x: jax.Array, kernel: jax.Array, groups: int, padding: tuple[int, int]) -> jax.Array:
  """`conv_general_dilated(x, kernel, feature_group_count=groups)` in NWC/WIO, as one dense conv per group.

  `x` is `(batch, time, in)`, `kernel` `(taps, in / groups, out)`; group `g`
  maps input channels `[g·in/G, (g+1)·in/G)` to output channels
  `[g·out/G, (g+1)·out/G)`, exactly as the grouped conv does (same values, same
  FLOPs, no im2col). Why not the grouped conv itself: its kernel gradient is a
  `batch_group_count` conv, which XLA's SPMD partitioner gets wrong when the
  batch is split over only part of the mesh (e.g. `batch → (data, fsdp)` with
  `tensor > 1`): it all-reduces the per-shard sums over every device, so the
  gradient comes out multiplied by the replication factor. Dense convs
  partition like any batch-sharded op. See docs/grouped_conv_sharding.md.
  """
  if x.shape[-1] % groups or kernel.shape[-1] % groups or kernel.shape[1] * groups != x.shape[-1]:
    raise ValueError(f"grouped_conv1d: input {x.shape} and kernel {kernel.shape} do not fit {groups} groups")
  step_in, step_out = x.shape[-1] // groups, kernel.shape[-1] // groups
  outputs = [
      jax.lax.conv_general_dilated(
          x[..., g * step_in : (g + 1) * step_in],
          kernel[..., g * step_out : (g + 1) * step_out],
          window_strides=(1,),
          padding=[padding],
          dimension_numbers=("NWC", "WIO", "NWC"),
      )
      for g in range(groups)
  ]
  return outputs[0] if groups == 1 else jnp.concatenate(outputs, axis=-1)


class PosConv(nnx.Module):
  """Weight-normed grouped Conv1d (`g`·v/‖v‖ per tap) → drop the last frame → GELU.

  Stored as `weight_g` `(k,)` and `weight_v` `(k, width / groups, width)` (the
  CONV1D layout of the official `weight_v`), so a fine-tune keeps weight norm.
  """

  def __init__(self, width: int, kernel: int, groups: int, *, rngs: nnx.Rngs | None):
    self.kernel_size, self.groups = int(kernel), int(groups)
    std = math.sqrt(4.0 / (kernel * width))
    self.weight_v = layers.param(
        rngs, nnx.initializers.normal(std), (kernel, width // groups, width), ("conv_kernel", "mel", "embed")
    )
    self.weight_g = layers.param(
        rngs, lambda key, shape, dtype: jnp.full(shape, std * math.sqrt(width * width // groups), dtype),
        (kernel,), ("conv_kernel",),
    )
    self.bias = layers.param(rngs, nnx.initializers.zeros, (width,), ("embed",))

  def weight(self) -> jax.Array:
    """The effective (k, in/groups, out) kernel."""
    v = self.weight_v[...]
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    return v * (self.weight_g[...][:, None, None] / norm)

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.kernel_size // 2
    y = grouped_conv1d(x, self.weight().astype(x.dtype), self.groups, (pad, pad))
    y = y + self.bias[...].astype(y.dtype)
    if self.kernel_size % 2 == 0:  # `SamePad`: an even kernel gives one frame too many
      y = y[:, :-1]
    return jax.nn.gelu(y, approximate=False)


class BeatsAttention(nnx.Module):
  """Self-attention with the (optionally query-gated) relative position bias of BEATs."""

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs | None):
    d, h, hd = config.width, config.num_heads, config.head_dim
    proj = dict(in_axes=("embed",), out_axes=("heads", "head_dim"), rngs=rngs)
    self.q_proj = layers.Linear(d, (h, hd), **proj)
    self.k_proj = layers.Linear(d, (h, hd), **proj)
    self.v_proj = layers.Linear(d, (h, hd), **proj)
    self.out_proj = layers.Linear((h, hd), d, in_axes=("heads", "head_dim"), out_axes=("embed",), rngs=rngs)
    if config.gru_rel_pos:
      self.grep_linear = layers.Linear(hd, 8, in_axes=("head_dim",), out_axes=(None,), rngs=rngs)
      self.grep_a = layers.param(rngs, nnx.initializers.ones, (h,), ("heads",))
    else:
      self.grep_linear = None
      self.grep_a = None

  def __call__(self, x: jax.Array, position_bias: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H, D]
    bias = None
    if position_bias is not None:  # [H, T, S]
      bias = position_bias[None]
      if self.grep_linear is not None:
        gates = self.grep_linear(q.astype(jnp.float32))  # from the unscaled query: [B, T, H, 8]
        gates = jax.nn.sigmoid(gates.reshape(gates.shape[:-1] + (2, 4)).sum(-1))
        gate_a, gate_b = gates[..., 0], gates[..., 1]
        gate = gate_a * (gate_b * self.grep_a[...] - 1.0) + 2.0  # [B, T, H]
        bias = gate.transpose(0, 2, 1)[..., None] * position_bias[None]
    out = layers.dot_product_attention(q, k, v, mask=mask, bias=bias)
    return self.out_proj(out)


class BeatsLayer(nnx.Module):
  """Post-LN (DeepNorm) block: x = LN(α·x + attn(x)); x = LN(α·x + FFN(x))."""

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs | None):
    eps = config.layer_norm_eps
    self.alpha = config.deep_norm_alpha
    self.self_attn = BeatsAttention(config, rngs=rngs)
    self.self_attn_layer_norm = layers.LayerNorm(config.width, eps=eps, rngs=rngs)
    self.mlp = layers.MLP(config.width, config.ffn_dim, act=config.activation, rngs=rngs)
    self.final_layer_norm = layers.LayerNorm(config.width, eps=eps, rngs=rngs)

  def __call__(self, x: jax.Array, position_bias: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, position_bias, mask))
    x = constrain(x, ("batch", "audio_frames", "embed"))
    x = self.final_layer_norm(x * self.alpha + self.mlp(x))
    return constrain(x, ("batch", "audio_frames", "embed"))


class BeatsEncoder(nnx.Module):
  """BEATs: `(fbank [B, T, n_mels], frame mask [B, T]) → (tokens [B, Tp·F, D], valid [B, Tp·F])`.

  Tp = T // patch_size time steps, F = n_mels // patch_size frequency patches,
  tokens ordered F·t + f. The optional mask marks real fbank frames (True).
  Attention masking reproduces the official reduction of the frame mask to
  tokens (contiguous chunks of frames per token index), so outputs match the
  reference; `valid` marks the tokens of time steps whose whole patch is real
  audio — floor(L / 16) steps for L valid frames, as
  `audio_slots.AudioTokenSpec(frame_source='beats')` counts.
  """

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs | None):
    self.config = config
    p, e, d = config.patch_size, config.patch_dim, config.width
    self.patch_embedding = layers.param(rngs, layers.fan_in_init(p * p), (p, p, 1, e),
                                        ("conv_kernel", "mel", None, "embed"))
    self.patch_bias = layers.param(rngs, nnx.initializers.zeros, (e,), ("embed",)) if config.patch_bias else None
    self.layer_norm = layers.LayerNorm(e, eps=config.layer_norm_eps, rngs=rngs)
    if e != d:
      self.post_extract_proj = layers.Linear(e, d, in_axes=("mel",), out_axes=("embed",), rngs=rngs)
    else:
      self.post_extract_proj = None
    self.pos_conv = PosConv(d, config.conv_pos, config.conv_pos_groups, rngs=rngs)
    self.encoder_layer_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, rngs=rngs)
    if config.relative_position_embedding:
      self.relative_attention_bias = layers.param(
          rngs, layers.default_init, (config.num_buckets, config.num_heads), (None, "heads")
      )
    else:
      self.relative_attention_bias = None
    self.layers = stack.build(lambda r: BeatsLayer(config, rngs=r), config.num_layers, rngs,
                              scan=config.scan_layers)

  def num_steps(self, fbank_frames: int) -> int:
    """Time steps Tp for `fbank_frames` input frames (187 for 30 s)."""
    return fbank_frames // self.config.patch_size

  def _patches(self, fbank: jax.Array) -> jax.Array:
    """16×16 patch embedding, time-major: `[B, T, n_mels] → [B, Tp·F, patch_dim]`."""
    batch = fbank.shape[0]
    p, f = self.config.patch_size, self.config.freq_patches
    steps = fbank.shape[1] // p
    x = fbank[:, : steps * p].reshape(batch, steps, p, f, p)
    kernel = self.patch_embedding[...][:, :, 0, :].astype(x.dtype)
    out = jnp.einsum("btpfq,pqe->btfe", x, kernel)
    if self.patch_bias is not None:
      out = out + self.patch_bias[...].astype(out.dtype)
    return out.reshape(batch, steps * f, -1)

  def __call__(self, fbank: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    config = self.config
    batch, num_frames, n_mels = fbank.shape
    if n_mels != config.n_mels:
      raise ValueError(f"BEATs expects {config.n_mels} fbank bins, got input of shape {fbank.shape}")
    steps = self.num_steps(num_frames)
    if steps < 1:
      raise ValueError(f"BEATs needs at least {config.patch_size} fbank frames, got {num_frames}")
    if mask is not None and mask.shape != (batch, num_frames):
      raise ValueError(f"frame mask of shape {mask.shape} does not match fbank frames {(batch, num_frames)}")
    tokens = steps * config.freq_patches

    x = self.layer_norm(self._patches(fbank))
    if self.post_extract_proj is not None:
      x = self.post_extract_proj(x)
    x = constrain(x, ("batch", "audio_frames", "embed"))

    if mask is None:
      attn_mask = None
      valid = jnp.ones((batch, tokens), bool)
    else:
      mask = mask.astype(bool)
      # The official reduction: drop T % tokens trailing frames, chunk the rest per token index.
      usable = num_frames - num_frames % tokens
      token_real = mask[:, :usable].reshape(batch, tokens, -1).any(-1)
      x = jnp.where(token_real[..., None], x, 0.0).astype(x.dtype)
      attn_mask = layers.padding_mask_2d(token_real)
      step_real = mask[:, : steps * config.patch_size].reshape(batch, steps, -1).all(-1)
      valid = jnp.repeat(step_real, config.freq_patches, axis=1)

    x = x + self.pos_conv(x)
    x = self.encoder_layer_norm(x)

    position_bias = None
    if self.relative_attention_bias is not None:
      buckets = relative_position_buckets(tokens, config.num_buckets, config.max_distance)
      position_bias = jnp.take(self.relative_attention_bias[...], buckets, axis=0).transpose(2, 0, 1)  # [H, T, S]

    x, _ = stack.run(self.layers, lambda layer, x, _: (layer(x, position_bias, attn_mask), None), x,
                     remat=config.remat)
    return x, valid

  def time_frames(self, tokens: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean over each time step's frequency patches: `[B, Tp·F, D] → [B, Tp, D]`, valid `[B, Tp]`."""
    return time_frames(tokens, valid, self.config.freq_patches)


def time_frames(tokens: jax.Array, valid: jax.Array, freq_patches: int = 8) -> tuple[jax.Array, jax.Array]:
  """`BeatsEncoder.time_frames` as a function (for callers holding only the arrays)."""
  batch, length, dim = tokens.shape
  if length % freq_patches:
    raise ValueError(f"{length} tokens are not a whole number of {freq_patches}-patch time steps")
  steps = length // freq_patches
  frames = tokens.reshape(batch, steps, freq_patches, dim).mean(axis=2)
  return frames, valid.reshape(batch, steps, freq_patches).all(-1)
