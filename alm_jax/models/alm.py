"""The audio-language model: encoder(s) → bridge → audio tokens spliced into the
LLM's token embeddings at the placeholder slots → LLM.

Input is the batch contract of `alm_jax.data.pipeline` (PCM windows, token ids
with placeholder spans, masks). Features are computed on device inside the
model, so the same jitted step covers front end, encoders, bridge and LLM.
The number of placeholder tokens per clip comes from `audio_slots` — the one
function the tokenizer side uses too — and `alm_jax.data.batch_checks.check_audio_slots`
verifies a batch against it on the host before it reaches the device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alm_jax.audio import features
from alm_jax.config import require
from alm_jax.models import layers, rotary_time, tagging
from alm_jax.models.audio_slots import AudioTokenSpec
from alm_jax.models.beats import BeatsConfig, BeatsEncoder
from alm_jax.models.llm import LLM, LLMConfig, positions_from_mask, positions_from_segments
from alm_jax.models.partitioning import constrain, per_shard
from alm_jax.models.projector import MLPProjector, ProjectorConfig
from alm_jax.models.qformer import QFormer, QFormerConfig
from alm_jax.models.rotary_time import RotaryTimeConfig
from alm_jax.models.whisper import WhisperConfig, WhisperEncoder

Batch = Mapping[str, jax.Array]

WHISPER_FRAME_MS = 20  # one Whisper encoder frame (after the stride-2 conv)
BEATS_STEP_MS = 160  # one BEATs time patch (16 fbank frames of 10 ms)
BEATS_PATCH = 16  # the patch size the placeholder count assumes (audio_slots)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  """How clips become encoder windows (see `audio_slots.AudioTokenSpec`)."""

  sample_rate: int = 16000
  window_seconds: float = 30.0
  max_windows: int = 1


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
  """How the on-device log-Mel / fbank front end computes (not what: every choice gives the same features).

  Attributes:
    method: `matmul` (real DFT as two matmul stages: the TPU/MXU path) or `fft`
      (rfft: ~2-3x faster on CPU).
    examples_per_step: walk each device's windows this many at a time (1 is
      fastest on CPU), or all at once (0: TPU/GPU).

  Set for the target in the config; nothing asks the backend while tracing, so
  `alm-jax compile --topology` compiles the program that target will run.
  """

  method: Literal["fft", "matmul"] = "matmul"
  examples_per_step: int = 0

  def __post_init__(self):
    require(self.method in ("fft", "matmul"), "model.frontend.method",
            f"must be 'fft' or 'matmul', got {self.method!r}")
    require(self.examples_per_step >= 0, "model.frontend.examples_per_step",
            f"must be >= 0, got {self.examples_per_step}")


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
  """Which bridge maps encoder frames to LLM tokens, and its settings."""

  kind: Literal["mlp", "qformer"] = "mlp"
  mlp: ProjectorConfig | None = None
  qformer: QFormerConfig | None = None

  def __post_init__(self):
    require(self.kind != "mlp" or self.mlp is not None, "model.bridge.mlp", "kind 'mlp' needs this section")
    require(
        self.kind != "qformer" or self.qformer is not None, "model.bridge.qformer", "kind 'qformer' needs this section"
    )

  @property
  def in_dim(self) -> int:
    return self.mlp.in_dim if self.kind == "mlp" else self.qformer.encoder_dim

  @property
  def out_dim(self) -> int:
    return self.mlp.out_dim if self.kind == "mlp" else self.qformer.llm_dim


@dataclasses.dataclass(frozen=True)
class ALMConfig:
  """A whole audio-language model.

  Attributes:
    encoders: `("whisper",)`, `("beats",)` or `("whisper", "beats")`.
    fusion: with both encoders, `aligned` repeats each BEATs time step over the
      Whisper frames it covers (true time alignment); `salmonn` pairs Whisper
      frame i with BEATs patch token i as SALMONN does (for its checkpoints).
    encoder_norm: LayerNorm on each encoder's output before fusion (SALMONN's
      `ln_speech` / `ln_audio`).
    trim_padding: only frames of real audio become tokens (Qwen2-Audio, AF3);
      False turns every frame of every window into tokens (SALMONN).
    audio_token_id: the tokenizer's audio placeholder id (-1: take it from the
      tokenizer at start, see `with_tokenizer`).
    frontend: how the log-Mel / fbank front end runs on the target (`FrontendConfig`).
    loss_chunk_tokens: compute the training loss's logits this many positions (per row) at a
      time (`chunked_cross_entropy`), so the float32 `[batch, length, vocab]` logits never exist
      whole; 0: all at once. Same loss and gradient; it pays off for large vocabularies (float32
      logits over 152k tokens are 0.6 MiB per position): the Qwen2-Audio and AF3 recipes use 512.
      The tagging objective has no LLM logits and ignores it.
    tagging_head: adds `tagger`, the audio-tagging head that pretrains the
      encoders on their own (`train.objective="tagging"`, see `tagging.py`).
    rotary_time: MusicFlamingo's parameter-free rotary time embedding on the
      encoder frames before the bridge (`rotary_time.py`); None: off.
    clip_embeddings: learned clip-number vectors (`bridge/clip_embedding`, [n, llm width]) added to
      the audio tokens of each example's 1st, 2nd, … clip, so a question about "the second clip"
      can find its tokens wherever they sit in the prompt. Clips past the n-th share the last
      vector (`run_config` asks for n >= data.max_clips). 0 (the default, and every released
      family): off.
  """

  encoders: tuple[str, ...] = ("whisper",)
  whisper: WhisperConfig | None = None
  beats: BeatsConfig | None = None
  fusion: Literal["aligned", "salmonn"] = "aligned"
  encoder_norm: bool = False
  trim_padding: bool = True
  bridge: BridgeConfig = BridgeConfig(kind="mlp", mlp=ProjectorConfig())
  llm: LLMConfig = LLMConfig()
  audio: AudioConfig = AudioConfig()
  frontend: FrontendConfig = FrontendConfig()
  audio_token_id: int = -1
  tagging_head: bool = False
  loss_chunk_tokens: int = 0
  rotary_time: None | RotaryTimeConfig = None  # None first: `config.from_dict` tries a union's options in order
  clip_embeddings: int = 0

  def __post_init__(self):
    require(
        self.encoders in (("whisper",), ("beats",), ("whisper", "beats")),
        "model.encoders",
        f"must be ('whisper',), ('beats',) or ('whisper', 'beats'), got {self.encoders}",
    )
    for name in self.encoders:
      require(getattr(self, name) is not None, f"model.{name}", f"encoder {name!r} is used but not configured")
    require(
        self.bridge.in_dim == self.encoder_dim,
        "model.bridge",
        f"bridge input width {self.bridge.in_dim} != encoder output width {self.encoder_dim}",
    )
    require(
        self.bridge.out_dim == self.llm.hidden_size,
        "model.bridge",
        f"bridge output width {self.bridge.out_dim} != llm.hidden_size {self.llm.hidden_size}",
    )
    require(
        -1 <= self.audio_token_id < self.llm.vocab_size,
        "model.audio_token_id",
        f"{self.audio_token_id} is outside the vocabulary of {self.llm.vocab_size}",
    )
    require(self.clip_embeddings >= 0, "model.clip_embeddings", f"must be >= 0, got {self.clip_embeddings}")
    require(self.loss_chunk_tokens >= 0, "model.loss_chunk_tokens", f"must be >= 0, got {self.loss_chunk_tokens}")
    spec = self.token_spec()  # validates the audio section
    if self.whisper is not None:
      frames = (spec.mel_frames - 1) // 2 + 1
      require(
          frames <= self.whisper.max_positions,
          "model.audio.window_seconds",
          f"{self.audio.window_seconds} s windows give {frames} Whisper frames, more than "
          f"model.whisper.max_positions={self.whisper.max_positions}",
      )
      chunk = self.whisper.chunk_frames
      require(not chunk or spec.mel_frames % chunk == 0, "model.whisper.chunk_frames",
              f"{self.audio.window_seconds} s windows ({spec.mel_frames} mel frames) are not whole chunks of {chunk}")
    if self.beats is not None and "beats" in self.encoders:
      require(self.beats.patch_size == BEATS_PATCH, "model.beats.patch_size",
              f"audio placeholder counts assume {BEATS_PATCH}x{BEATS_PATCH} patches")
    if self.whisper is not None and self.encoders == ("whisper", "beats"):
      require(not self.whisper.pool, "model.whisper.pool", "pooling with two encoders is not supported")
    if self.rotary_time is not None:
      require(self.encoders == ("whisper",) and self.whisper.pool, "model.rotary_time",
              "needs a pooled Whisper encoder alone (its frames are 40 ms apart)")
      rotated = self.rotary_time.rotated_channels(self.encoder_dim)
      require(rotated <= self.encoder_dim, "model.rotary_time.fraction",
              f"rotates {rotated} channels, more than the encoder's {self.encoder_dim}")

  @property
  def encoder_dim(self) -> int:
    dims = {"whisper": self.whisper.d_model if self.whisper else 0, "beats": self.beats.width if self.beats else 0}
    return sum(dims[name] for name in self.encoders)

  def token_spec(self) -> AudioTokenSpec:
    """The placeholder-count spec for this model (shared with the tokenizer side)."""
    bridge = {"bridge": "frames"}
    if self.bridge.kind == "qformer":
      bridge = self.bridge.qformer.token_spec_fields()
    return AudioTokenSpec(
        sample_rate=self.audio.sample_rate,
        window_seconds=self.audio.window_seconds,
        max_windows=self.audio.max_windows,
        frame_source="whisper" if "whisper" in self.encoders else "beats",
        pool=bool(self.whisper.pool) if "whisper" in self.encoders else False,
        trim_padding=self.trim_padding,
        **bridge,
    )


class AudioEncoders(nnx.Module):
  """Whisper and/or BEATs on PCM windows, fused into one frame sequence."""

  def __init__(self, cfg: ALMConfig, *, rngs: nnx.Rngs | None):
    self.cfg = cfg
    self.whisper = WhisperEncoder(cfg.whisper, rngs=rngs) if "whisper" in cfg.encoders else None
    self.beats = BeatsEncoder(cfg.beats, rngs=rngs) if "beats" in cfg.encoders else None
    norm = cfg.encoder_norm
    self.whisper_norm = layers.LayerNorm(cfg.whisper.d_model, rngs=rngs) if norm and self.whisper else None
    self.beats_norm = layers.LayerNorm(cfg.beats.width, rngs=rngs) if norm and self.beats else None

  def _features(self, fn, audio: jax.Array, **kwargs) -> jax.Array:
    """A front end on each device's own windows ([W, S] → [W, frames, bins]); see `per_shard`."""
    frontend = self.cfg.frontend
    compute = lambda pcm: fn(pcm, method=frontend.method, examples_per_step=frontend.examples_per_step, **kwargs)
    return per_shard(compute, (audio,), (("batch", None),), ("batch", None, None))

  def _whisper(self, audio: jax.Array, samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    mel = self._features(features.whisper_log_mel, audio, n_mels=self.cfg.whisper.n_mels)
    mel_mask = features.whisper_frame_mask(samples, mel.shape[1])
    hidden, valid = self.whisper(mel, mel_mask)
    if self.whisper_norm is not None:
      hidden = self.whisper_norm(hidden)
    return hidden, valid

  def _beats(self, audio: jax.Array, samples: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    fbank = self._features(features.beats_fbank, audio)
    fbank_mask = features.fbank_frame_mask(samples, fbank.shape[1])
    if self.cfg.fusion == "salmonn":  # SALMONN runs BEATs on the unpadded clip: whole 16-frame patches only
      whole = fbank_mask.sum(-1) // BEATS_PATCH * BEATS_PATCH
      fbank_mask = jnp.arange(fbank.shape[1])[None, :] < whole[:, None]
    tokens, token_valid = self.beats(fbank, fbank_mask)
    if self.beats_norm is not None:
      tokens = self.beats_norm(tokens)
    steps, step_valid = self.beats.time_frames(tokens, token_valid)
    return tokens, token_valid, steps, step_valid

  def __call__(self, audio: jax.Array, samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """audio [W, S] PCM, samples [W] real samples → (frames [W, T, C], valid [W, T])."""
    cfg = self.cfg
    if self.beats is None:
      return self._whisper(audio, samples)
    tokens, token_valid, steps, step_valid = self._beats(audio, samples)
    if self.whisper is None:
      return steps, step_valid
    hidden, valid = self._whisper(audio, samples)
    length = hidden.shape[1]
    if cfg.fusion == "aligned":
      repeat = BEATS_STEP_MS // WHISPER_FRAME_MS
      beats = jnp.repeat(steps, repeat, axis=1)
    else:  # SALMONN: patch-ordered tokens against Whisper frames, index by index, zero past the clip's tokens
      beats = jnp.where(token_valid[..., None], tokens, jnp.zeros((), tokens.dtype))
    beats = _fit_length(beats, length)
    fused = jnp.concatenate([hidden, beats.astype(hidden.dtype)], axis=-1)
    return constrain(fused, ("batch", "audio_frames", "embed")), valid


def _fit_length(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads or truncates axis 1 to `length`."""
  if x.shape[1] >= length:
    return x[:, :length]
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


class Bridge(nnx.Module):
  """MLP projector or Q-former from encoder frames to LLM-width audio tokens."""

  def __init__(self, cfg: ALMConfig, *, rngs: nnx.Rngs | None):
    self.cfg = cfg
    self.mlp = MLPProjector(cfg.bridge.mlp, rngs=rngs) if cfg.bridge.kind == "mlp" else None
    self.qformer = QFormer(cfg.bridge.qformer, rngs=rngs) if cfg.bridge.kind == "qformer" else None
    self.clip_embedding = layers.param(rngs, layers.default_init, (cfg.clip_embeddings, cfg.bridge.out_dim),
                                       (None, "embed")) if cfg.clip_embeddings else None

  def __call__(self, frames: jax.Array, valid: jax.Array, clip: jax.Array) -> tuple[jax.Array, jax.Array]:
    """frames [B·K, T, C] of the windows in each row's K slots, whose clips are `clip` [B, K] →
    (tokens [B, N, D], valid [B, N]), each row's tokens in placeholder order.

    Per-window bridges give K·(tokens per window) per row; the global Q-former
    gives `queries` tokens per clip, K clip slots per row. Invalid tokens are
    skipped when splicing.
    """
    rows, slots = clip.shape
    in_use = (clip >= 0).reshape(-1)
    if not self.cfg.trim_padding:  # SALMONN: every frame of a used window becomes tokens
      valid = jnp.ones_like(valid)
    valid = valid & in_use[:, None]
    if self.mlp is not None:
      tokens, valid = self.mlp(frames), valid
    elif self.qformer.cfg.mode == "window":
      tokens, valid = self.qformer(frames, valid)
    else:
      length, channels = frames.shape[1:]
      group = jax.vmap(group_windows_by_clip, in_axes=(0, 0, 0, None))
      grouped, grouped_valid = group(frames.reshape(rows, slots, length, channels), valid.reshape(rows, slots, length),
                                     clip, self.cfg.audio.max_windows)
      grouped = grouped.reshape(rows * slots, *grouped.shape[2:])
      tokens, valid = self.qformer(grouped, grouped_valid.reshape(rows * slots, -1), segment=length)
    return tokens.reshape(rows, -1, tokens.shape[-1]), valid.reshape(rows, -1)

  def token_clips(self, clip: jax.Array, num_tokens: int) -> jax.Array:
    """The row's clip rank of each of `__call__`'s `num_tokens` tokens per row: [B, N] (-1: padding slot).

    Per-window bridges emit the same number of tokens for each window slot (slot k belongs to clip
    `clip[:, k]`); the global Q-former's slot c holds the row's clip c.
    """
    rows, slots = clip.shape
    if self.qformer is not None and self.qformer.cfg.mode != "window":
      used = jnp.arange(slots) <= clip.max(axis=1, keepdims=True)
      clip = jnp.where(used, jnp.arange(slots), -1)
    return jnp.repeat(clip, num_tokens // slots, axis=1)


def clip_numbers(ranks: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """Each position's 0-based clip number within its example: ranks [B, L] (the row's clip rank at an
  audio position, -1 elsewhere) → [B, L] (-1 elsewhere). A packed row's ranks run on across its examples
  (`segment_ids`), so each example's numbers start again at its first clip."""
  if segment_ids is None:
    return ranks
  length = ranks.shape[1]
  none = jnp.iinfo(jnp.int32).max

  def row(rank, segment):
    first = jax.ops.segment_min(jnp.where(rank >= 0, rank, none), segment, num_segments=length + 1)
    return jnp.where(rank >= 0, rank - first[segment], -1)

  return jax.vmap(row)(ranks, segment_ids)


def group_windows_by_clip(
    frames: jax.Array, valid: jax.Array, clip: jax.Array, max_windows: int
) -> tuple[jax.Array, jax.Array]:
  """One row's [K, T, C] windows → [K, max_windows·T, C] whole clips (slot c = the row's clip c).

  A clip's windows are consecutive slots; padding slots have clip -1.
  """
  num, length, channels = frames.shape
  index = jnp.arange(num)
  safe_clip = jnp.where(clip >= 0, clip, num)  # out of range → dropped
  first = jax.ops.segment_min(index, safe_clip, num_segments=num + 1)[:num]
  within = index - first[jnp.clip(safe_clip, 0, num - 1)]
  grouped = jnp.zeros((num, max_windows, length, channels), frames.dtype)
  grouped = grouped.at[safe_clip, within].set(frames, mode="drop")
  grouped_valid = jnp.zeros((num, max_windows, length), bool).at[safe_clip, within].set(valid, mode="drop")
  return grouped.reshape(num, max_windows * length, channels), grouped_valid.reshape(num, max_windows * length)


def _splice_row(embeddings: jax.Array, tokens: jax.Array, audio: jax.Array, valid: jax.Array,
                placeholder_id: int) -> jax.Array:
  """One row: embeddings [L, D], tokens [L], audio [N, D] (or [N]: one value per audio token), valid [N]."""
  total = valid.shape[0]
  order = jnp.nonzero(valid, size=total, fill_value=total - 1)[0]
  is_slot = tokens == placeholder_id
  rank = jnp.cumsum(is_slot) - 1
  gathered = audio[order[jnp.clip(rank, 0, total - 1)]]
  if embeddings.ndim == 1:
    return jnp.where(is_slot, gathered, embeddings)
  return jnp.where(is_slot[:, None], gathered, embeddings)


def _row_layout(batch: Batch) -> dict[str, jax.Array | None]:
  """The decoder's mask, positions and segment ids for a batch: packed rows (`segment_ids`, see
  `alm_jax.data.pipeline`) restart positions per example and attend within it; otherwise one example per row."""
  mask = batch["token_mask"]
  segments = batch.get("segment_ids")
  if segments is None:
    return {"mask": mask, "positions": positions_from_mask(mask), "segment_ids": None}
  return {"mask": mask, "positions": positions_from_segments(segments), "segment_ids": segments}


def splice_audio(
    embeddings: jax.Array, tokens: jax.Array, audio: jax.Array, audio_valid: jax.Array, placeholder_id: int
) -> jax.Array:
  """Writes each row's valid audio tokens, in order, into that row's placeholder slots.

  embeddings [B, L, D], tokens [B, L]; audio [B, N, D] with audio_valid [B, N] (or embeddings [B, L] and
  audio [B, N]: one value per position, as `input_embeddings` splices each token's clip). The k-th
  placeholder of a row receives the row's k-th valid audio token: the splice is row-local (a vmap over rows), so a row sharded onto a device needs
  nothing from other rows. Counts are checked on the host (`batch_checks.check_audio_slots`).
  """
  splice = jax.vmap(_splice_row, in_axes=(0, 0, 0, 0, None))
  return splice(embeddings, tokens, audio.astype(embeddings.dtype), audio_valid, placeholder_id)


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                          weights: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(Σ weight·cross-entropy, Σ weight·[argmax == target]) over hidden [B, L, D] and targets/weights [B, L].

  `logits_fn` maps hidden states [..., D] to float32 logits [..., V] (the LLM's tied or untied head); the
  log-softmax runs on those float32 logits. `chunk` > 0 computes them `chunk` positions at a time in a
  `lax.scan` whose body is rematerialised (`jax.checkpoint`), so neither the forward nor the backward pass
  holds more than one chunk's `[B, chunk, V]` logits, softmax and logit gradient: the backward pass
  recomputes each chunk's logits from its hidden states instead of keeping every chunk's (a 152k
  vocabulary at 2048 tokens is 1.2 GiB of float32 logits per sequence). A length that `chunk` does not
  divide gets a last chunk padded with positions of weight 0. `chunk` 0 (or >= L) computes all at once.
  The sums, and their gradients, equal the unchunked ones up to float32 summation order.
  """
  def sums(h, t, w):
    logits = logits_fn(h)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, t)
    correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
    return (losses * w).sum(), (correct * w).sum()

  length = hidden.shape[1]
  if chunk <= 0 or chunk >= length:
    return sums(hidden, targets, weights)
  pad = -length % chunk
  if pad:  # padded positions weigh nothing
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  n = (length + pad) // chunk
  split = lambda x: x.reshape(x.shape[0], n, chunk, *x.shape[2:]).swapaxes(0, 1)  # [n, B, chunk, ...]
  body = jax.checkpoint(sums, prevent_cse=False)  # in a scan, CSE cannot merge the recomputation away

  def step(total, xs):
    loss, correct = body(*xs)
    return (total[0] + loss, total[1] + correct), None

  zero = jnp.zeros((), jnp.float32)
  (loss, correct), _ = jax.lax.scan(step, (zero, zero), (split(hidden), split(targets), split(weights)))
  return loss, correct


class AudioLanguageModel(nnx.Module):
  """encoder(s) → bridge → splice → LLM. Submodules: `encoder`, `bridge`, `llm` (+ `tagger`, see `tagging_head`)."""

  def __init__(self, cfg: ALMConfig, *, rngs: nnx.Rngs | None):
    self.cfg = cfg
    self.encoder = AudioEncoders(cfg, rngs=rngs)
    self.bridge = Bridge(cfg, rngs=rngs)
    self.llm = LLM(cfg.llm, rngs=rngs)
    self.tagger = tagging.AudioTagger(cfg.encoder_dim, cfg.llm.vocab_size, rngs=rngs) if cfg.tagging_head else None

  def encode(self, audio: jax.Array, samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's window slots audio [B, K, S], samples [B, K] → frames [B·K, T, C], valid [B·K, T]."""
    rows, slots, width = audio.shape
    audio = constrain(audio.reshape(rows * slots, width), ("batch", None))
    return self.encoder(audio, samples.reshape(rows * slots))

  def audio_tokens(self, audio: jax.Array, samples: jax.Array, clip: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row window slots (audio [B, K, S]) → each row's LLM-width audio tokens [B, N, D] and validity [B, N]."""
    frames, valid = self.encode(audio, samples)
    if self.cfg.rotary_time is not None:
      frames = rotary_time.apply(self.cfg.rotary_time, frames, clip)
    return self.bridge(frames, valid, clip)

  def input_embeddings(self, batch: Batch) -> jax.Array:
    """Token embeddings with the audio tokens spliced in (plus their clip numbers' vectors): [B, L, D]."""
    tokens, clip = batch["tokens"], batch["audio_clip"]
    audio, audio_valid = self.audio_tokens(batch["audio"], batch["audio_samples"], clip)
    embeddings = splice_audio(self.llm.embed(tokens), tokens, audio, audio_valid, self.cfg.audio_token_id)
    table = self.bridge.clip_embedding
    if table is None:
      return embeddings
    ranks = splice_audio(jnp.full(tokens.shape, -1, jnp.int32), tokens,
                         self.bridge.token_clips(clip, audio.shape[1]), audio_valid, self.cfg.audio_token_id)
    numbers = clip_numbers(ranks, batch.get("segment_ids"))
    vectors = table[...][jnp.clip(numbers, 0, table.shape[0] - 1)].astype(embeddings.dtype)
    return embeddings + jnp.where((numbers >= 0)[..., None], vectors, 0)

  def __call__(self, batch: Batch) -> jax.Array:
    """Float32 logits [B, L, V] for a batch of the pipeline's contract."""
    embeddings = self.input_embeddings(batch)
    logits, _ = self.llm(embeddings=embeddings, **_row_layout(batch))
    return logits

  def loss(self, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy on answer tokens only (`loss_mask`), and metrics.

    With `loss_chunk_tokens` > 0 the float32 logits exist one chunk of positions at a time
    (`chunked_cross_entropy`), never as a whole `[batch, length, vocab]` array.
    """
    hidden, _ = self.llm(embeddings=self.input_embeddings(batch), **_row_layout(batch), return_hidden=True)
    targets = batch["tokens"][:, 1:]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["token_mask"][:, 1:]
    if batch.get("segment_ids") is not None:  # a packed row's last token never predicts the next example's first
      segments = batch["segment_ids"]
      weights = weights * (segments[:, 1:] == segments[:, :-1])
    loss_sum, correct_sum = chunked_cross_entropy(self.llm.logits, hidden[:, :-1], targets, weights,
                                                  self.cfg.loss_chunk_tokens)
    count = weights.sum()
    loss = loss_sum / jnp.maximum(count, 1.0)
    metrics = {
        "loss": loss,
        "target_tokens": count,
        "token_accuracy": correct_sum / jnp.maximum(count, 1.0),
        "tokens": batch["token_mask"].astype(jnp.float32).sum(),
    }
    return loss, metrics

  def tagging_loss(self, batch: Batch, ignore_ids: Sequence[int] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encoders + tagging head only: each clip's answer-text tokens as tags (see `tagging.py`)."""
    if self.tagger is None:
      raise ValueError("tagging_loss needs a model built with tagging_head=True")
    frames, valid = self.encode(batch["audio"], batch["audio_samples"])
    clip = batch["audio_clip"]
    frames = frames.reshape(*clip.shape, *frames.shape[1:])
    pooled, has_frames = tagging.pool_rows(frames, valid.reshape(*clip.shape, -1), clip)
    return tagging.tagging_loss(self.tagger(pooled), has_frames, batch, self.cfg.audio_token_id, ignore_ids)
