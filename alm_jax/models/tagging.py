"""Audio tagging head: pretrains the audio encoders on their own, before any LLM.

Released encoders come pretrained (Whisper on speech recognition, BEATs on
AudioSet tagging); a model trained from scratch needs a stand-in. The tagger
pools each clip's encoder frames (masked mean and max) and predicts, as
independent sigmoids over the tokenizer vocabulary, which tokens occur in the
example's answer text: its transcript or caption as a bag of words. The loss
reaches the encoders through one linear map, so they learn what a clip contains
far faster than through a randomly initialised bridge and decoder; the LLM
stages then start from encoders that already tell the sounds apart.

Tagging batches hold one clip per example (checked on the host by
`alm_jax.data.batch_checks.check_one_clip_per_example`): a row's windows all
belong to its one clip, so pooling a row's windows pools its clip, with no
lookup across rows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alm_jax.models import layers


class AudioTagger(nnx.Module):
  """Clip-pooled encoder frames → one logit per tag (vocabulary token)."""

  def __init__(self, encoder_dim: int, num_tags: int, *, rngs: nnx.Rngs | None):
    self.proj = layers.Linear(2 * encoder_dim, num_tags, in_axes=("embed",), out_axes=("vocab",), rngs=rngs)

  def __call__(self, pooled: jax.Array) -> jax.Array:
    """pooled [N, 2·C] (mean ‖ max) → logits [N, num_tags] in float32."""
    return self.proj(pooled).astype(jnp.float32)


def pool_rows(frames: jax.Array, valid: jax.Array, clip: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked mean ‖ max over every valid frame of each row's windows: frames [B, K, T, C], clip [B, K] →
  ([B, 2C], has_frames [B]). Padding windows (clip -1) are left out."""
  frames = frames.astype(jnp.float32)
  weight = (valid & (clip >= 0)[..., None]).astype(jnp.float32)[..., None]  # [B, K, T, 1]
  sums = (frames * weight).sum((1, 2))
  counts = weight.sum((1, 2))
  lowest = jnp.finfo(jnp.float32).min
  maxes = jnp.where(weight > 0, frames, lowest).max((1, 2))
  has_frames = counts[:, 0] > 0
  mean = sums / jnp.maximum(counts, 1.0)
  maxes = jnp.where(has_frames[:, None], maxes, 0.0)
  return jnp.concatenate([mean, maxes], axis=-1), has_frames


def bag_of_words(tokens: jax.Array, loss_mask: jax.Array, num_tags: int, ignore_ids: Sequence[int]) -> jax.Array:
  """Multi-hot [B, num_tags]: which ids occur among each row's answer tokens (`loss_mask`), minus `ignore_ids`."""
  answer = (loss_mask > 0) & (tokens >= 0) & (tokens < num_tags)
  for i in ignore_ids:
    answer = answer & (tokens != i)
  rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
  hot = jnp.zeros((tokens.shape[0], num_tags), jnp.float32)
  return hot.at[rows, jnp.where(answer, tokens, 0)].max(answer.astype(jnp.float32))


def tagging_loss(logits: jax.Array, has_frames: jax.Array, batch: Mapping[str, jax.Array], placeholder_id: int,
                 ignore_ids: Sequence[int]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sigmoid cross-entropy summed over tags, averaged over clips; metrics include tag precision and recall.

  logits [B, num_tags] and has_frames [B] are per row (one clip per row).
  """
  num_tags = logits.shape[-1]
  targets = bag_of_words(batch["tokens"], batch["loss_mask"], num_tags, ignore_ids)
  used = has_frames & (batch["tokens"] == placeholder_id).any(-1)
  clip_targets = jnp.where(used[:, None], targets, 0.0)
  weight = used.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  per_clip = optax.sigmoid_binary_cross_entropy(logits, clip_targets).sum(-1)
  loss = (per_clip * weight).sum() / count
  predicted = (logits > 0) & used[:, None]
  hits = (predicted & (clip_targets > 0)).sum()
  exact = ((predicted == (clip_targets > 0)).all(-1) & used).sum()
  metrics = {
      "loss": loss,
      "tag_precision": hits / jnp.maximum(predicted.sum(), 1),
      "tag_recall": hits / jnp.maximum((clip_targets > 0).sum(), 1),
      "token_accuracy": exact / count,  # clips whose whole tag set is right (the loop logs this key)
      "target_tokens": weight.sum(),
      "tokens": batch["token_mask"].astype(jnp.float32).sum(),
  }
  return loss, metrics
