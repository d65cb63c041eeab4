"""Whisper audio encoder in Flax NNX, with the Qwen2-Audio / Audio Flamingo 3 variant.

Log-Mel frames (time-major `[B, T, n_mels]`) → two 1-D convs (GELU, stride 2 on
the second) → + stored position table → pre-LN transformer layers → final
LayerNorm. `pool=True` adds the AvgPool1d(2, 2) that Qwen2-Audio and AF3 put
between the last layer and the final LayerNorm, and `mask_padding=True` keeps
padding frames out of self-attention as those models do (plain Whisper attends
to everything). Windows shorter than 30 s use the first rows of the position
table, so tiny test models and short clips need no padding to 3000 frames.
`chunk_frames > 0` is the Qwen2.5-Omni audio tower: each window is cut into
chunks of that many mel frames, convolved, positioned (from row 0) and
attended within the chunk only, then pooled (see `WhisperEncoder._chunked`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import from_dict, require
from alm_jax.models import attention, layers, stack
from alm_jax.models.partitioning import constrain

# Encoder shapes of the released checkpoints (openai names); `WhisperConfig.preset(name)`.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_mels=80, d_model=384, num_layers=4, num_heads=6, ffn_dim=1536),
    "base": dict(n_mels=80, d_model=512, num_layers=6, num_heads=8, ffn_dim=2048),
    "small": dict(n_mels=80, d_model=768, num_layers=12, num_heads=12, ffn_dim=3072),
    "medium": dict(n_mels=80, d_model=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "large-v2": dict(n_mels=80, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120),
    "large-v3": dict(n_mels=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120),
}

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
  """Shape and behaviour of a Whisper encoder.

  Attributes:
    n_mels: log-Mel bins of the input (80, or 128 for large-v3 / Qwen2-Audio / AF3).
    d_model: model width.
    num_layers: transformer layers.
    num_heads: attention heads (`d_model` must divide evenly).
    ffn_dim: feed-forward hidden width.
    max_positions: rows of the position table = most frames after the stride-2
      conv (1500 for 30 s windows).
    activation: feed-forward activation (HF `activation_function`).
    pool: average-pool stride 2 after the layers, before the final LayerNorm.
    mask_padding: mask padding frames (from the input frame mask) out of attention.
    layer_norm_eps: epsilon of every LayerNorm.
    attention: implementation (`attention.IMPLEMENTATIONS`: `xla`, `splash`
      on TPU, `cudnn` on GPU). Config, never guessed from the backend.
    attention_block: with `xla`, query rows per attention block (see
      `attention.blocked_attention`): 0 is one fused attention (TPU/GPU);
      per-head blocks of ~512 rows are about 3x faster on CPU.
    remat: rematerialisation policy of each layer (`layers.REMAT_POLICIES`).
    scan_layers: stack the layers and run them with a scan (`models/stack.py`);
      False keeps a Python loop over `layers/{i}`.
    chunk_frames: 0 (Whisper, Qwen2-Audio, AF3), or the mel frames per chunk
      of the Qwen2.5-Omni tower (`2 * n_window`, 200 = 2 s): conv stem,
      positions and attention restart in every chunk; needs `pool`.
  """

  n_mels: int = 80
  d_model: int = 384
  num_layers: int = 4
  num_heads: int = 6
  ffn_dim: int = 1536
  max_positions: int = 1500
  activation: str = "gelu"
  pool: bool = False
  mask_padding: bool = False
  layer_norm_eps: float = 1e-5
  attention: str = "xla"
  attention_block: int = 0
  remat: str = "none"
  scan_layers: bool = True
  chunk_frames: int = 0

  def __post_init__(self):
    if self.attention_block is None:  # configs saved before the field was explicit: "auto" is gone
      object.__setattr__(self, "attention_block", 0)
    require(self.n_mels > 0, "whisper.n_mels", f"must be positive, got {self.n_mels}")
    require(self.d_model > 0, "whisper.d_model", f"must be positive, got {self.d_model}")
    require(self.num_layers >= 0, "whisper.num_layers", f"must be >= 0, got {self.num_layers}")
    require(self.num_heads > 0, "whisper.num_heads", f"must be positive, got {self.num_heads}")
    require(
        self.d_model % self.num_heads == 0,
        "whisper.num_heads",
        f"d_model {self.d_model} is not divisible by {self.num_heads} heads",
    )
    require(self.ffn_dim > 0, "whisper.ffn_dim", f"must be positive, got {self.ffn_dim}")
    require(self.max_positions > 0, "whisper.max_positions", f"must be positive, got {self.max_positions}")
    require(self.activation in _ACTIVATIONS, "whisper.activation", f"unknown activation {self.activation!r}")
    require(self.layer_norm_eps > 0, "whisper.layer_norm_eps", "must be positive")
    require(
        self.attention in attention.IMPLEMENTATIONS,
        "whisper.attention",
        f"must be one of {list(attention.IMPLEMENTATIONS)}, got {self.attention!r}",
    )
    require(
        self.attention == "xla" or self.attention_block == 0,
        "whisper.attention_block",
        f"blocks are an xla choice; {self.attention!r} attention needs 0, got {self.attention_block}",
    )
    require(
        self.attention_block >= 0,
        "whisper.attention_block",
        f"must be >= 0, got {self.attention_block}",
    )
    require(
        self.remat in layers.REMAT_POLICIES,
        "whisper.remat",
        f"unknown policy {self.remat!r} (known: {', '.join(layers.REMAT_POLICIES)})",
    )
    require(self.chunk_frames >= 0 and self.chunk_frames % 4 == 0, "whisper.chunk_frames",
            f"must be a multiple of 4 (whole pooled pairs per chunk), got {self.chunk_frames}")
    require(not self.chunk_frames or self.pool, "whisper.chunk_frames", "chunked attention needs pool=True")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "WhisperConfig":
    """A released size by name (`tiny` ... `large-v3`), with optional overrides."""
    require(name in PRESETS, "whisper.preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return from_dict(cls, {**PRESETS[name], **overrides}, "whisper")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
  """Whisper's position table `[length, channels]`: sin of `channels / 2` timescales, then cos.

  Computed in float64 and rounded once, so it sits within float32 rounding of
  the reference tables (which round the timescales before multiplying).
  """
  if channels % 2:
    raise ValueError(f"sinusoidal positions need an even width, got {channels}")
  increment = math.log(max_timescale) / (channels // 2 - 1)
  inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float64))
  t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
  return jnp.asarray(np.concatenate([np.sin(t), np.cos(t)], axis=1), jnp.float32)


class Conv1d(nnx.Module):
  """Time-major 1-D convolution `[B, T, in] → [B, T', out]`; kernel stored (k, in, out)."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      *,
      stride: int = 1,
      padding: int = 0,
      rngs: nnx.Rngs | None,
  ):
    self.stride, self.padding = int(stride), int(padding)
    self.kernel = layers.param(
        rngs, layers.fan_in_init(kernel_size * in_features), (kernel_size, in_features, out_features),
        ("conv_kernel", "mel", "embed")
    )
    self.bias = layers.param(rngs, nnx.initializers.zeros, (out_features,), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x,
        self.kernel[...].astype(x.dtype),
        window_strides=(self.stride,),
        padding=[(self.padding, self.padding)],
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    return y + self.bias[...].astype(y.dtype)


CPU_ATTENTION_BLOCK = 512  # a good `attention_block` on CPU (configs for CPU runs set it)


class WhisperLayer(nnx.Module):
  """Pre-LN block: x + attn(LN(x)); x + MLP(LN(x)). k_proj has no bias, as in Whisper."""

  def __init__(self, config: WhisperConfig, *, rngs: nnx.Rngs | None):
    eps = config.layer_norm_eps
    self.impl, self.attention_block = config.attention, config.attention_block
    self.self_attn_layer_norm = layers.LayerNorm(config.d_model, eps=eps, rngs=rngs)
    self.self_attn = layers.MultiHeadAttention(config.d_model, config.num_heads, k_bias=False, rngs=rngs)
    self.final_layer_norm = layers.LayerNorm(config.d_model, eps=eps, rngs=rngs)
    self.mlp = layers.MLP(config.d_model, config.ffn_dim, act=config.activation, rngs=rngs)

  def __call__(self, x: jax.Array, key_valid: jax.Array | None) -> jax.Array:
    """x [B, T, d]; `key_valid` [B, T] masks padding frames out of attention (None: attend to all)."""
    attn, h = self.self_attn, self.self_attn_layer_norm(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    out = attention.attention(q, k, v, impl=self.impl, key_valid=key_valid, head_block=self.attention_block)
    x = x + attn.out_proj(out)
    x = constrain(x, ("batch", "audio_frames", "embed"))
    x = x + self.mlp(self.final_layer_norm(x))
    return constrain(x, ("batch", "audio_frames", "embed"))


def conv_frames(mel_frames: jax.Array | int) -> jax.Array | int:
  """Frames after the stride-2 conv for `mel_frames` input frames: ceil(n / 2), 0 for 0."""
  if isinstance(mel_frames, int):
    return (mel_frames - 1) // 2 + 1 if mel_frames > 0 else 0
  return jnp.where(mel_frames > 0, (mel_frames - 1) // 2 + 1, 0)


class WhisperEncoder(nnx.Module):
  """Whisper encoder: `(mel [B, T, n_mels], frame mask [B, T]) → (hidden [B, T', d], valid [B, T'])`.

  T' = ceil(T / 2) (halved again with `pool`). `valid` marks frames computed from
  real audio: the first ceil(L / 2) frames (then // 2 when pooled) for L valid
  input frames, matching `audio_slots.AudioTokenSpec(frame_source='whisper')`.
  Hidden states of padding frames are left as computed (as the reference does).
  """

  def __init__(self, config: WhisperConfig, *, rngs: nnx.Rngs | None):
    self.config = config
    d = config.d_model
    self.conv1 = Conv1d(config.n_mels, d, 3, padding=1, rngs=rngs)
    self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, rngs=rngs)
    self.embed_positions = layers.param(
        rngs, lambda key, shape, dtype: sinusoids(*shape).astype(dtype), (config.max_positions, d),
        ("audio_frames", "embed"),
    )
    self.layers = stack.build(lambda r: WhisperLayer(config, rngs=r), config.num_layers, rngs,
                              scan=config.scan_layers)
    self.layer_norm = layers.LayerNorm(d, eps=config.layer_norm_eps, rngs=rngs)

  def output_frames(self, mel_frames: int) -> int:
    """Output length for a `mel_frames`-frame window (1500, or 750 pooled, for 30 s)."""
    frames = conv_frames(mel_frames)
    return frames // 2 if self.config.pool else frames

  def __call__(self, mel: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    config = self.config
    batch, num_frames, n_mels = mel.shape
    if n_mels != config.n_mels:
      raise ValueError(f"Whisper encoder expects {config.n_mels} mel bins, got input of shape {mel.shape}")
    frames = conv_frames(num_frames)
    if frames > config.max_positions:
      raise ValueError(
          f"{num_frames} mel frames give {frames} encoder frames, more than the {config.max_positions} positions"
      )
    if mask is not None and mask.shape != (batch, num_frames):
      raise ValueError(f"frame mask of shape {mask.shape} does not match mel frames {(batch, num_frames)}")
    if config.chunk_frames:
      return self._chunked(mel, mask)

    # The encoder computes in its weights' dtype: bf16 weights take the (float32) features rounded to bf16, as
    # transformers' `input_features.to(conv1.weight.dtype)` does (a no-op for float32 weights).
    mel = mel.astype(self.conv1.kernel.dtype)
    x = jax.nn.gelu(self.conv1(mel), approximate=False)
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    x = x + self.embed_positions[:frames].astype(x.dtype)
    x = constrain(x, ("batch", "audio_frames", "embed"))

    if mask is None:
      lengths = jnp.full((batch,), frames, jnp.int32)
    else:
      lengths = conv_frames(mask.astype(jnp.int32).sum(-1))
    valid = jnp.arange(frames)[None, :] < lengths[:, None]
    key_valid = valid if (config.mask_padding and mask is not None) else None

    x, _ = stack.run(self.layers, lambda layer, x, _: (layer(x, key_valid), None), x, remat=config.remat)

    if config.pool:
      pooled = frames // 2
      x = x[:, : 2 * pooled].reshape(batch, pooled, 2, config.d_model).mean(axis=2)
      valid = jnp.arange(pooled)[None, :] < (lengths // 2)[:, None]
    x = self.layer_norm(x)
    return constrain(x, ("batch", "audio_frames", "embed")), valid

  def _chunked(self, mel: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The Qwen2.5-Omni tower on windows `[B, T, n_mels]` whose T is a multiple of `chunk_frames`.

    Each chunk is encoded as if alone: its mel frames past the real audio are
    zero, the first conv's outputs there are zeroed too (so the stride-2 conv
    sees the chunk's own zero padding), positions restart at row 0, and
    attention sees only the chunk's real frames. Pairs never straddle chunks
    (chunks hold an even number of conv frames), so pooling is per chunk as well.
    """
    config = self.config
    batch, num_frames, n_mels = mel.shape
    size = config.chunk_frames
    if num_frames % size:
      raise ValueError(f"{num_frames} mel frames are not whole chunks of {size} (whisper.chunk_frames)")
    chunks = num_frames // size
    mel_len = jnp.full((batch,), num_frames, jnp.int32) if mask is None else mask.astype(jnp.int32).sum(-1)
    chunk_len = jnp.clip(mel_len[:, None] - size * jnp.arange(chunks)[None, :], 0, size).reshape(-1)  # [B·n]
    in_chunk = (jnp.arange(size)[None, :] < chunk_len[:, None])[..., None]
    x = jnp.where(in_chunk, mel.astype(self.conv1.kernel.dtype).reshape(batch * chunks, size, n_mels), 0)
    x = jax.nn.gelu(self.conv1(x), approximate=False) * in_chunk.astype(x.dtype)
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    frames = conv_frames(size)
    x = x + self.embed_positions[:frames].astype(x.dtype)
    key_valid = jnp.arange(frames)[None, :] < conv_frames(chunk_len)[:, None]
    x, _ = stack.run(self.layers, lambda layer, x, _: (layer(x, key_valid), None), x, remat=config.remat)
    pooled = chunks * (frames // 2)
    x = x.reshape(batch, pooled, 2, config.d_model).mean(axis=2)
    valid = jnp.arange(pooled)[None, :] < (conv_frames(mel_len) // 2)[:, None]
    x = self.layer_norm(x)
    return constrain(x, ("batch", "audio_frames", "embed")), valid
