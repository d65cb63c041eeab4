"""Decoder-only LLM covering the Qwen2/Qwen2.5, Qwen3 and Llama 3 families.

One implementation with config switches (q/k/v bias, q/k RMSNorm, head_dim,
RoPE θ and Llama 3 frequency scaling, tied or untied output embeddings). The
model takes token ids or precomputed input embeddings (the audio-LLM splices
audio embeddings into `embed(tokens)`), a padding mask and explicit positions,
and optionally a functional KV cache (an explicit pytree passed in and
returned) for jitted generation (`alm_jax.infer.generate`).

Parameter paths are stable, since training stages and checkpoint maps select
by them: `embed`, `layers/attn/{q,k,v,o}_proj`, `layers/attn/{q,k}_norm`
(Qwen3), `layers/mlp/{gate,up,down}_proj`, `layers/{input,post_attention}_norm`,
`final_norm`, `lm_head` (absent when tied). The decoder layers are stacked on
a leading `layers` axis and run by a scan (`models/stack.py`); with
`scan_layers=False` they are a list and paths read `layers/{i}/...`, the names
checkpoint maps use either way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alm_jax.config import require
from alm_jax.models import attention, layers, stack
from alm_jax.models.partitioning import constrain

Family = Literal["qwen2", "qwen3", "llama"]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ROPE_TYPES = ("default", "linear", "llama3")

# A KV cache: {"layers": {"k": [N, B, S, K, Dh], "v": ...}, "valid": [B, S] bool} for N scanned layers
# ({"layers": [{"k": [B, S, K, Dh], "v": ...}, ...]} with one dict per layer when `scan_layers` is off).
Cache = dict[str, Any]

FAMILIES = ("qwen2", "qwen3", "llama")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Sizes and family switches of the decoder (defaults: Qwen2.5-0.5B).

  Attributes:
    family: `qwen2` (also Qwen2.5), `qwen3` or `llama`; names the released
      family (checkpoint names and config translation live in
      `alm_jax.checkpoints.hf_llm`), the switches below decide the math.
    head_dim: per-head width; 0 means `hidden_size // num_heads`.
    rope_type: `default`, `linear` (positions divided by `rope_factor`) or
      `llama3` (Llama 3.1 frequency-dependent scaling with the `rope_*` fields).
    qkv_bias / o_bias / mlp_bias: biases on q/k/v, on o_proj, on the MLP.
    qk_norm: Qwen3's per-head RMSNorm on queries and keys before RoPE.
    tie_embeddings: the output projection is the input embedding (no `lm_head`).
    remat: rematerialisation policy per decoder layer (`layers.REMAT_POLICIES`).
    scan_layers: stack the layers and run them with a scan (one compiled body
      for all layers; the pod-scale form); False keeps a Python loop.
    decode_scan: with stacked layers, generation runs them with the scan
      too; False cuts the stacked weights into per-layer arrays once per
      generate call, before the decode loop, and runs the step unrolled
      (`stack.unstack`). A target choice: XLA:CPU copies a scanned layer's
      weights out of the stack every step, a TPU reads them in place; the
      unrolled step compiles N layer bodies and holds a second copy of the
      decoder weights while generating.
    attention: implementation of training and prefill attention
      (`attention.IMPLEMENTATIONS`: `xla` for CPU and as the reference,
      `splash` for TPU, `cudnn` for GPU). Decoding with a KV cache takes a
      dense mask, which splash cannot: it runs `xla` there.
    lora_rank / lora_alpha / lora_targets: LoRA adapters built with the model
      (rank 0 = none) on the named projections (q, k, v, o, gate, up, down).
    mrope_section: Qwen2.5-Omni's TMRoPE: frequency bands (summing to
      head_dim / 2) turned by the time, height and width position axes in
      turn; positions may then be `[3, B, L]`. Empty (default): 1-D RoPE only.
      `[B, L]` positions are the same ids on every axis, which is plain RoPE.
  """

  family: Family = "qwen2"
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  head_dim: int = 0
  rope_theta: float = 1000000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  remat: str = "none"
  scan_layers: bool = True
  decode_scan: bool = True
  attention: str = "xla"
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o")
  mrope_section: tuple[int, ...] = ()

  def __post_init__(self):
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      require(getattr(self, key) > 0, f"llm.{key}", f"must be positive, got {getattr(self, key)}")
    require(self.family in FAMILIES, "llm.family", f"must be one of {list(FAMILIES)}, got {self.family!r}")
    require(
        self.num_heads % self.num_kv_heads == 0,
        "llm.num_kv_heads",
        f"{self.num_kv_heads} kv heads do not divide {self.num_heads} heads",
    )
    if self.head_dim == 0:
      require(
          self.hidden_size % self.num_heads == 0,
          "llm.head_dim",
          f"0 (derived) needs hidden_size {self.hidden_size} divisible by num_heads {self.num_heads}",
      )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    require(self.head_dim > 0 and self.head_dim % 2 == 0, "llm.head_dim", f"must be even and > 0, got {self.head_dim}")
    require(self.rope_theta > 0, "llm.rope_theta", f"must be positive, got {self.rope_theta}")
    require(self.rope_type in ROPE_TYPES, "llm.rope_type", f"must be one of {list(ROPE_TYPES)}, got {self.rope_type!r}")
    require(self.rope_factor > 0, "llm.rope_factor", f"must be positive, got {self.rope_factor}")
    if self.rope_type == "llama3":
      require(
          self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
          "llm.rope_high_freq_factor",
          f"must exceed rope_low_freq_factor ({self.rope_high_freq_factor} <= {self.rope_low_freq_factor})",
      )
      require(self.rope_original_max_positions > 0, "llm.rope_original_max_positions", "must be positive")
    require(self.rms_norm_eps > 0, "llm.rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
    require(
        self.remat in layers.REMAT_POLICIES,
        "llm.remat",
        f"must be one of {list(layers.REMAT_POLICIES)}, got {self.remat!r}",
    )
    require(
        self.attention in attention.IMPLEMENTATIONS,
        "llm.attention",
        f"must be one of {list(attention.IMPLEMENTATIONS)}, got {self.attention!r}",
    )
    require(self.lora_rank >= 0, "llm.lora_rank", f"must be >= 0, got {self.lora_rank}")
    require(self.lora_alpha > 0, "llm.lora_alpha", f"must be positive, got {self.lora_alpha}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
    object.__setattr__(self, "mrope_section", tuple(int(n) for n in self.mrope_section))
    require(not self.mrope_section or sum(self.mrope_section) == self.head_dim // 2, "llm.mrope_section",
            f"{list(self.mrope_section)} must sum to head_dim / 2 = {self.head_dim // 2}")
    bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
    require(not bad, "llm.lora_targets", f"unknown {bad} (known: {', '.join(LORA_TARGETS)})")

  @property
  def kv_groups(self) -> int:
    """Query heads per key/value head (the GQA ratio)."""
    return self.num_heads // self.num_kv_heads


# ---------------------------------------------------------------------------
# Rotary position embeddings.


def rope_inv_freq(cfg: LLMConfig) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] (float32) with the config's scaling, as transformers computes them."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  inv_freq = inv_freq.astype(np.float32).astype(np.float64)  # torch builds it in float32
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(cfg: LLMConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, head_dim] (float32) for integer positions [B, L] (rotate-half layout), or for TMRoPE
  positions [3, B, L] (`mrope_section`): frequency band i takes its angle from position axis i % 3."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  if positions.ndim == 3:
    if not cfg.mrope_section:
      raise ValueError(f"positions of shape {positions.shape} need llm.mrope_section (TMRoPE); it is empty")
    axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(cfg.mrope_section)])
    chosen = jnp.take(positions.astype(jnp.float32), jnp.asarray(axis), axis=0)  # [head_dim / 2, B, L]
    freqs = jnp.moveaxis(chosen, 0, -1) * inv_freq
  else:
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, N, D] by the tables [B, L, D] (HF `rotate_half` convention)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Positions [B, L] int32 counting only real tokens (works for left, right or any padding).

  Real token j of a row gets position j (0-based among real tokens); padding
  gets the position of the previous real token (0 before the first), which is
  harmless because padded keys are masked.
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0).astype(jnp.int32)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions [B, L] int32 that restart at 0 where each segment of a packed row starts.

  `segment_ids` [B, L] numbers a row's examples 1, 2, … (0 = padding) and each
  segment is contiguous, so a packed example sees exactly the positions it
  would see alone in a right-padded row (padding counts on from the last segment).
  """
  index = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
  previous = jnp.pad(segment_ids[..., :-1], [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)], constant_values=-1)
  starts = jnp.where((segment_ids != previous) & (segment_ids > 0), index, 0)
  return index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)


# ---------------------------------------------------------------------------
# Modules.


def _linear(cfg: LLMConfig, target: str, in_f, out_f, in_axes, out_axes, use_bias: bool, rngs) -> layers.Linear:
  rank = cfg.lora_rank if target in cfg.lora_targets else 0
  return layers.Linear(
      in_f, out_f, in_axes=in_axes, out_axes=out_axes, use_bias=use_bias, lora_rank=rank, lora_alpha=cfg.lora_alpha,
      rngs=rngs,
  )


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k RMSNorm and a functional KV cache."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs | None):
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Splash takes no dense mask, so decoding with a cache (which needs one) runs the xla implementation.
    self.impl = cfg.attention
    self.cached_impl = "xla" if cfg.attention == "splash" else cfg.attention
    self.q_proj = _linear(cfg, "q", d, (h, hd), ("embed",), ("heads", "head_dim"), cfg.qkv_bias, rngs)
    self.k_proj = _linear(cfg, "k", d, (k, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, rngs)
    self.v_proj = _linear(cfg, "v", d, (k, hd), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, rngs)
    self.o_proj = _linear(cfg, "o", (h, hd), d, ("heads", "head_dim"), ("embed",), cfg.o_bias, rngs)
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, rngs=rngs)
      self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, rngs=rngs)
    else:
      self.q_norm = None
      self.k_norm = None

  def __call__(
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      mask: jax.Array,
      kv: dict[str, jax.Array] | None = None,
      cache_index: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """x [B, T, D] → ([B, T, D], updated kv or None).

    Without `kv`, causal self-attention over the T tokens and `mask` [B, T]
    marks real keys (`segment_ids` [B, T]: a query sees only keys of its own
    packed example); with `kv`, `mask` [B, 1, T, S] says which cache slots each
    query sees (causal and valid).
    """
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_kv = None
    if kv is not None:
      new_kv, k, v = write_cache(kv, k, v, cache_index)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    if kv is None:
      out = attention.attention(q, k, v, impl=self.impl, causal=True, key_valid=mask, segment_ids=segment_ids)
    else:
      out = attention.attention(q, k, v, impl=self.cached_impl, mask=mask)
    return self.o_proj(out), new_kv


_KV_AXES = ("batch", "kv_length", "kv_heads", "head_dim")


def write_cache(
    kv: dict[str, jax.Array], k: jax.Array, v: jax.Array, cache_index: jax.Array
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """Writes new keys/values k, v [B, L, K, Dh] at slot `cache_index` → (updated kv, all keys, all values).

  `kv` is one layer's `{"k", "v"}` [B, S, K, Dh], or the whole stacked cache
  `{"k", "v"}` [N, B, S, K, Dh] with `"layer"` (a scalar) naming this layer:
  then only the L new positions of that layer are written, in place in the
  scan's carry, instead of the scan copying each layer's whole cache slice in
  and out every decode step (which made the step read and write the cache
  about three times instead of reading it once).
  """
  if "layer" not in kv:
    start = (0, cache_index, 0, 0)
    new_k = constrain(jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start), _KV_AXES)
    new_v = constrain(jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start), _KV_AXES)
    return {"k": new_k, "v": new_v}, new_k, new_v
  layer = kv["layer"]
  start = (layer, 0, cache_index, 0, 0)
  stacked_axes = (stack.LAYERS_AXIS,) + _KV_AXES
  new_k = constrain(jax.lax.dynamic_update_slice(kv["k"], k[None].astype(kv["k"].dtype), start), stacked_axes)
  new_v = constrain(jax.lax.dynamic_update_slice(kv["v"], v[None].astype(kv["v"].dtype), start), stacked_axes)
  read = lambda a: constrain(jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), _KV_AXES)
  return {"k": new_k, "v": new_v, "layer": layer}, read(new_k), read(new_v)


class GatedMLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs | None):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, "gate", d, f, ("embed",), ("mlp",), cfg.mlp_bias, rngs)
    self.up_proj = _linear(cfg, "up", d, f, ("embed",), ("mlp",), cfg.mlp_bias, rngs)
    self.down_proj = _linear(cfg, "down", f, d, ("mlp",), ("embed",), cfg.mlp_bias, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = constrain(h, ("batch", "length", "mlp"))
    return self.down_proj(h)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs | None):
    self.input_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
    self.mlp = GatedMLP(cfg, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      mask: jax.Array,
      kv: dict[str, jax.Array] | None = None,
      cache_index: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """x [B, T, D] → ([B, T, D], updated kv or None); see `Attention.__call__`."""
    h, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv, cache_index, segment_ids)
    x = x + h
    x = x + self.mlp(self.post_attention_norm(x))
    return constrain(x, ("batch", "length", "embed")), new_kv


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype: Any = jnp.float32) -> Cache:
  """An empty KV cache for `length` positions: k/v zeros for every layer and `valid` [B, S] False.

  Stacked `[N, B, S, K, Dh]` for scanned layers, else one `[B, S, K, Dh]` pair per layer.
  """
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  axes = ("batch", "kv_length", "kv_heads", "head_dim")
  if cfg.scan_layers:
    zeros = lambda: constrain(jnp.zeros((cfg.num_layers,) + shape, dtype), (stack.LAYERS_AXIS,) + axes)
    per_layer = {"k": zeros(), "v": zeros()}
  else:
    zeros = lambda: constrain(jnp.zeros(shape, dtype), axes)
    per_layer = [{"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers)]
  return {"layers": per_layer, "valid": constrain(jnp.zeros((batch, length), jnp.bool_), ("batch", "kv_length"))}


class LLM(nnx.Module):
  """The decoder: embeddings → N pre-norm layers → final RMSNorm → logits (tied or `lm_head`)."""

  def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs | None):
    self.cfg = cfg
    # `embed(tokens [B, L]) -> [B, L, D]` is the input embedding (the ALM splices audio into its output).
    self.embed = layers.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layers = stack.build(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs, scan=cfg.scan_layers)
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.Linear(
          cfg.hidden_size, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",), use_bias=False, rngs=rngs
      )

  def decode_layers(self) -> nnx.List | None:
    """The layers generation passes as `layers=` (made once, before its decode loop), or None for `self.layers`.

    Per-layer modules cut from the stacked weights when `decode_scan` is off
    (see `LLMConfig.decode_scan`), else None.
    """
    if self.cfg.decode_scan or not stack.is_stacked(self.layers):
      return None
    return stack.unstack(self.layers)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states [..., D] → float32 logits [..., V]."""
    if self.lm_head is None:
      out = self.embed.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(
      self,
      tokens: jax.Array | None = None,
      *,
      embeddings: jax.Array | None = None,
      positions: jax.Array | None = None,
      mask: jax.Array | None = None,
      cache: Cache | None = None,
      cache_index: jax.Array | int | None = None,
      return_hidden: bool = False,
      layers: nnx.List | None = None,
      segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Runs the decoder on tokens [B, L] or embeddings [B, L, D].

    `mask` [B, L] bool marks real tokens (default all); `positions` [B, L]
    int32 default to `positions_from_mask(mask)` (required with a cache;
    TMRoPE's [3, B, L] with `LLMConfig.mrope_section`).
    With `cache` (from `init_cache`) the L new keys/values are written at slots
    `cache_index ... cache_index + L - 1` and each query attends to valid slots
    up to its own; the updated cache is returned. Returns (float32 logits
    [B, L, V], or the final-normed hidden states [B, L, D] if `return_hidden`,
    new cache or None). `layers` runs these decoder layers instead of
    `self.layers`: the same layers cut apart by `decode_layers` once, outside
    a decode loop.
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens or embeddings")
    x = self.embed(tokens) if embeddings is None else embeddings
    batch, length = x.shape[:2]
    if mask is None:
      mask = jnp.ones((batch, length), jnp.bool_)
    mask = mask.astype(jnp.bool_)
    if positions is None:
      if cache is not None:
        raise ValueError("positions are required with a cache")
      positions = positions_from_mask(mask) if segment_ids is None else positions_from_segments(segment_ids)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) are for training and scoring, not for decoding with a cache")
    x = constrain(x, ("batch", "length", "embed"))
    cos, sin = rope_tables(self.cfg, positions)

    if cache is None:
      attn_mask = mask  # causal self-attention with these keys (see `Attention.__call__`)
      kvs = None
    else:
      if cache_index is None:
        raise ValueError("cache_index is required with a cache")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, cache_index))
      slots = jnp.arange(valid.shape[1])
      causal = slots[None, :] <= (cache_index + jnp.arange(length))[:, None]
      attn_mask = causal[None, None] & valid[:, None, None, :]
      kvs = cache["layers"]

    layers = self.layers if layers is None else layers
    if isinstance(kvs, dict):
      # The stacked cache rides in the carry and each layer writes only its new positions (`write_cache`);
      # as a scanned input/output every layer would copy its whole cache slice in and out each step.
      def carried(layer: DecoderLayer, carry: tuple, _):
        x, kv = carry
        x, kv = layer(x, cos, sin, attn_mask, kv, cache_index)
        return (x, dict(kv, layer=kv["layer"] + 1)), None

      (x, kv), _ = stack.run(layers, carried, (x, dict(kvs, layer=jnp.int32(0))), remat=self.cfg.remat)
      new_kvs = {"k": kv["k"], "v": kv["v"]}
    else:
      def body(layer: DecoderLayer, x: jax.Array, kv: dict[str, jax.Array] | None):
        return layer(x, cos, sin, attn_mask, kv, cache_index, segment_ids)

      x, new_kvs = stack.run(layers, body, x, remat=self.cfg.remat, per_layer=kvs)
    new_cache = None if cache is None else {"layers": new_kvs, "valid": valid}
    x = self.final_norm(x)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache

