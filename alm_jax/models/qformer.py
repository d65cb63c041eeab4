"""Q-former bridge (BLIP-2 style): learned queries read audio frames by cross-attention.

`QFormerTransformer` is exactly `transformers.Blip2QFormerModel` on its
`query_embeds` path (LayerNorm on the queries, then BERT-style post-LN layers:
self-attention, cross-attention to the frames in layers where
`layer % cross_attention_frequency == 0`, feed-forward). `QFormer` is the
bridge around it: optional input LayerNorm on the frames, the learned query
tokens, and the Linear to the LLM width (SALMONN's `speech_llama_proj`), in two
modes:

* `global`: `queries` tokens per clip, attending over all of its frames;
* `window` (SALMONN): the frames cut into consecutive windows of `window`
  frames (the remainder dropped, as SALMONN's `F.unfold`), `queries` tokens per
  window, in time order. A token is valid when its whole window is real audio,
  so the count agrees with `audio_slots.AudioTokenSpec.window_tokens`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from alm_jax.config import require
from alm_jax.models import layers, stack
from alm_jax.models.partitioning import constrain


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Q-former bridge settings (defaults: SALMONN's window Q-former over Whisper-large frames).

  Attributes:
    mode: `global` (queries per clip) or `window` (queries per `window` frames).
    encoder_dim: channels of the input frames (HF `encoder_hidden_size`).
    hidden_size: Q-former width (768 for BERT-base).
    num_layers: Q-former layers.
    num_heads: attention heads (self and cross).
    intermediate_size: feed-forward width.
    cross_attention_frequency: cross-attention in layers with `i % frequency == 0`
      (BLIP-2: 2, SALMONN: 1).
    queries: learned query tokens (per clip or per window).
    window: frames per window in `window` mode (17 ≈ 0.33 s of Whisper frames).
    llm_dim: output width (the LLM's embedding width).
    act: feed-forward activation (BERT: exact `gelu`).
    layer_norm_eps: eps of the Q-former's LayerNorms (BERT: 1e-12).
    input_norm: a LayerNorm over the input frames (SALMONN's `ln_speech` when
      Whisper is the only encoder).
    input_norm_eps: eps of that LayerNorm (torch default 1e-5).
    proj_bias: bias on the output projection.
    remat: rematerialisation policy per layer (`layers.REMAT_POLICIES`).
  """

  mode: Literal["global", "window"] = "window"
  encoder_dim: int = 1280
  hidden_size: int = 768
  num_layers: int = 2
  num_heads: int = 12
  intermediate_size: int = 3072
  cross_attention_frequency: int = 1
  queries: int = 1
  window: int = 17
  llm_dim: int = 4096
  act: str = "gelu"
  layer_norm_eps: float = 1e-12
  input_norm: bool = False
  input_norm_eps: float = 1e-5
  proj_bias: bool = True
  remat: str = "none"

  def __post_init__(self):
    for key in ("encoder_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size", "llm_dim"):
      require(getattr(self, key) > 0, f"bridge.{key}", f"must be positive, got {getattr(self, key)}")
    require(
        self.hidden_size % self.num_heads == 0,
        "bridge.num_heads",
        f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads",
    )
    require(self.cross_attention_frequency >= 1, "bridge.cross_attention_frequency", "must be >= 1")
    require(self.queries >= 1, "bridge.queries", "must be >= 1")
    require(self.window >= 1, "bridge.window", "must be >= 1")
    require(self.layer_norm_eps > 0 and self.input_norm_eps > 0, "bridge.layer_norm_eps", "eps must be positive")
    require(
        self.remat in layers.REMAT_POLICIES,
        "bridge.remat",
        f"unknown policy {self.remat!r} (known: {', '.join(layers.REMAT_POLICIES)})",
    )
    try:
      layers.activation(self.act)
    except ValueError as e:
      require(False, "bridge.act", str(e))

  def has_cross_attention(self, layer: int) -> bool:
    """Whether layer `layer` cross-attends to the frames (HF's rule)."""
    return layer % self.cross_attention_frequency == 0

  def token_spec_fields(self) -> dict:
    """The `AudioTokenSpec` fields this bridge decides (`bridge`, `queries`, `qformer_window`)."""
    bridge = "window_qformer" if self.mode == "window" else "global_qformer"
    return {"bridge": bridge, "queries": self.queries, "qformer_window": self.window}


class QFormerLayer(nnx.Module):
  """One post-LN BERT layer on the queries: self-attn, optional cross-attn, feed-forward."""

  def __init__(self, cfg: QFormerConfig, layer: int, *, rngs: nnx.Rngs | None):
    d, eps = cfg.hidden_size, cfg.layer_norm_eps
    self.self_attn = layers.MultiHeadAttention(d, cfg.num_heads, rngs=rngs)
    self.self_attn_norm = layers.LayerNorm(d, eps=eps, rngs=rngs)
    if cfg.has_cross_attention(layer):
      self.cross_attn = layers.MultiHeadAttention(d, cfg.num_heads, kv_dim=cfg.encoder_dim, rngs=rngs)
      self.cross_attn_norm = layers.LayerNorm(d, eps=eps, rngs=rngs)
    else:
      self.cross_attn = None
      self.cross_attn_norm = None
    self.mlp = layers.MLP(d, cfg.intermediate_size, act=cfg.act, rngs=rngs)
    self.mlp_norm = layers.LayerNorm(d, eps=eps, rngs=rngs)

  def __call__(self, x: jax.Array, frames: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
    """x [B, N, d], frames [B, S, C], frame_mask [B, 1, 1, S] bool or None → [B, N, d]."""
    x = self.self_attn_norm(x + self.self_attn(x))
    if self.cross_attn is not None:
      x = self.cross_attn_norm(x + self.cross_attn(x, frames, mask=frame_mask))
    x = self.mlp_norm(x + self.mlp(x))
    return constrain(x, ("batch", "queries", "embed"))


class QFormerTransformer(nnx.Module):
  """`Blip2QFormerModel` on query embeddings: LayerNorm, then the layers (no text input).

  Parameters: `layernorm`, `layers/{i}/{self_attn,self_attn_norm,cross_attn,
  cross_attn_norm,mlp,mlp_norm}`; HF names in `alm_jax.checkpoints.qformer_hf`.
  """

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs | None):
    self.remat = cfg.remat
    self.layernorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([QFormerLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])

  def __call__(self, queries: jax.Array, frames: jax.Array, frame_valid: jax.Array | None = None) -> jax.Array:
    """queries [B, N, d], frames [B, S, C], frame_valid [B, S] bool (None: all valid) → [B, N, d].

    Masked frames get HF's additive `finfo.min` treatment: a query whose frames
    are all masked averages all of them uniformly (its output is meaningless).
    """
    x = self.layernorm(queries)
    frames = frames.astype(x.dtype)
    mask = None if frame_valid is None else layers.padding_mask_2d(frame_valid.astype(bool))
    x, _ = stack.run(self.layers, lambda layer, x, _: (layer(x, frames, mask), None), x, remat=self.remat)
    return x


def window_frames(
    frames: jax.Array, valid: jax.Array, window: int, segment: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Cuts [B, T, C] frames and [B, T] validity into [B, W, window, C] and [B, W, window].

  With `segment` (frames per encoder window, e.g. 1500 for 30 s of Whisper
  frames), T must be a multiple of it and each segment is cut on its own, so
  no window straddles two encoder windows: W = (T // segment) * (segment //
  window). Without it the whole sequence is one segment. The remainder of each
  segment is dropped (floor), as SALMONN's `F.unfold` does.
  """
  batch, t, channels = frames.shape
  segment = t if segment is None else int(segment)
  if segment <= 0 or t % segment:
    raise ValueError(f"{t} frames are not a whole number of segments of {segment}")
  per_segment = segment // window
  if per_segment == 0:
    raise ValueError(f"a segment of {segment} frames is shorter than one window of {window} frames")
  segments = t // segment
  used = per_segment * window
  frames = frames.reshape(batch, segments, segment, channels)[:, :, :used]
  valid = valid.reshape(batch, segments, segment)[:, :, :used]
  count = segments * per_segment
  return frames.reshape(batch, count, window, channels), valid.reshape(batch, count, window)


class QFormer(nnx.Module):
  """The Q-former bridge: frames [B, T, C] + validity → LLM-width tokens + validity.

  Parameters: `input_norm` (optional), `query_tokens` (1, N, d), `qformer`
  (a `QFormerTransformer`), `proj` (Linear d → llm_dim).
  """

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs | None):
    self.cfg = cfg
    self.input_norm = layers.LayerNorm(cfg.encoder_dim, eps=cfg.input_norm_eps, rngs=rngs) if cfg.input_norm else None
    self.query_tokens = layers.param(
        rngs, layers.default_init, (1, cfg.queries, cfg.hidden_size), (None, "queries", "embed")
    )
    self.qformer = QFormerTransformer(cfg, rngs=rngs)
    self.proj = layers.Linear(
        cfg.hidden_size, cfg.llm_dim, in_axes=("embed",), out_axes=("embed",), use_bias=cfg.proj_bias, rngs=rngs
    )

  def num_tokens(self, num_frames: int, segment: int | None = None) -> int:
    """Output tokens M per row for T = `num_frames` input frames (valid or not)."""
    if self.cfg.mode == "global":
      return self.cfg.queries
    segment = num_frames if segment is None else segment
    return (num_frames // segment) * (segment // self.cfg.window) * self.cfg.queries

  def __call__(
      self, frames: jax.Array, frame_valid: jax.Array, *, segment: int | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """frames [B, T, C], frame_valid [B, T] bool → (tokens [B, M, llm_dim], token_valid [B, M] bool).

    global: M = queries; tokens are valid when the clip has any valid frame.
    window: M = W · queries with W windows (see `window_frames`; `segment` is
    the encoder-window length when several encoder windows are joined); a
    window's tokens are valid when all of its frames are valid, so for a
    prefix-valid mask the count equals `AudioTokenSpec.window_tokens` with
    `trim_padding`. For SALMONN's behaviour (every window counted, padding
    attended) pass `frame_valid` all True. Invalid tokens are zeroed.
    """
    cfg = self.cfg
    batch, t, channels = frames.shape
    if channels != cfg.encoder_dim:
      raise ValueError(f"Q-former expects {cfg.encoder_dim} channels, got frames of shape {frames.shape}")
    if frame_valid.shape != (batch, t):
      raise ValueError(f"frame_valid shape {frame_valid.shape} does not match frames {frames.shape}")
    frame_valid = frame_valid.astype(bool)
    frames = constrain(frames, ("batch", "audio_frames", "embed"))
    if self.input_norm is not None:
      frames = self.input_norm(frames)
    if cfg.mode == "window":
      windows, window_valid = window_frames(frames, frame_valid, cfg.window, segment)
      count = windows.shape[1]
      frames = windows.reshape(batch * count, cfg.window, channels)
      frame_valid = window_valid.reshape(batch * count, cfg.window)
      group_valid = window_valid.all(-1)  # [B, W]
    else:
      count = 1
      group_valid = frame_valid.any(-1, keepdims=True)  # [B, 1]
    queries = self.query_tokens[...]
    queries = jnp.broadcast_to(queries, (frames.shape[0],) + queries.shape[1:])
    hidden = self.qformer(queries, frames, frame_valid)  # [B·W, N, d]
    tokens = self.proj(hidden.reshape(batch, count * cfg.queries, cfg.hidden_size))
    token_valid = jnp.repeat(group_valid, cfg.queries, axis=1)
    tokens = jnp.where(token_valid[..., None], tokens, jnp.zeros((), tokens.dtype))
    return constrain(tokens, ("batch", "length", "embed")), token_valid
