"""The demo model: tiny Whisper- and BEATs-style encoders, a window Q-former and a
tiny Qwen2-style decoder, all trained from scratch on the synthetic corpus on a
CPU in minutes.

The Whisper-style tower is its front end only (conv stem, sinusoidal positions,
final LayerNorm; `num_layers=0`): on 2 CPU cores a randomly initialised
attention layer there made tagging pretraining learn several times slower per
second (measured: 7 of 96 validation clips tagged exactly after 55 s with one
layer, 53 of 96 after 44 s with none). The BEATs-style tower keeps one layer.

`alm-jax train --config configs/tiny.py --config.train.stage=projector ...`;
the demo (`alm-jax demo`) chains the stages with this config.
"""

import ml_collections

from alm_jax import sharding

WINDOW_SECONDS = 3.0  # synthetic clips are 1.5-3 s: one window each
WHISPER_WIDTH = 96
BEATS_WIDTH = 32
LLM_WIDTH = 128
VOCAB = 1024  # the demo BPE tokenizer's size (alm_jax.data.tokenizer.train_bpe)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: comma-separated variants: a stage name (`projector`, `lora`, `full`)
  preselects it; `micro` shrinks every tower to one narrow layer (tests)."""
  variants = set((arg or "").split(",")) - {""}
  stage = next((v for v in variants if v in ("projector", "lora", "full")), None)
  frames = int(WINDOW_SECONDS * 100) // 2  # Whisper frames per window (20 ms each)
  config = ml_collections.ConfigDict()

  config.model = dict(
      encoders=("whisper", "beats"),
      fusion="aligned",
      encoder_norm=True,
      trim_padding=True,
      audio=dict(sample_rate=16000, window_seconds=WINDOW_SECONDS, max_windows=2),
      whisper=dict(n_mels=80, d_model=WHISPER_WIDTH, num_layers=0, num_heads=4, ffn_dim=4 * WHISPER_WIDTH,
                   max_positions=frames, attention_block=512),
      beats=dict(n_mels=128, patch_size=16, patch_dim=32, width=BEATS_WIDTH, num_layers=1, num_heads=2,
                 ffn_dim=2 * BEATS_WIDTH, conv_pos=16, conv_pos_groups=2, num_buckets=32, max_distance=64),
      bridge=dict(
          kind="qformer",
          qformer=dict(mode="window", encoder_dim=WHISPER_WIDTH + BEATS_WIDTH, hidden_size=96, num_layers=1,
                       num_heads=4, intermediate_size=192, cross_attention_frequency=1, queries=1, window=10,
                       llm_dim=LLM_WIDTH),
      ),
      llm=dict(family="qwen2", vocab_size=VOCAB, hidden_size=LLM_WIDTH, intermediate_size=384, num_layers=3,
               num_heads=4, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=1024, rms_norm_eps=1e-6,
               qkv_bias=True, tie_embeddings=True, lora_rank=0, lora_alpha=16.0,
               lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
               decode_scan=False),  # CPU choice: decode over per-layer weights cut once, not a scan copying them
      # CPU choices (the demo trains on a CPU): rfft, one window at a time; blocked attention if Whisper has layers.
      frontend=dict(method="fft", examples_per_step=1),
      audio_token_id=-1,
  )

  config.data = dict(
      path="",
      template="tiny",
      batch_size=16,
      length_buckets=(96, 128),
      window_buckets=(1, 2, 4, 6),  # audio windows per row: clips take 1-2 windows, up to 3 clips
      max_clips=3,
      workers=0,
      max_clip_seconds=8.0,
  )

  config.train = dict(
      stage=stage or "full",
      steps=400,
      log_every=20,
      checkpoint_every=200,
      eval_batches=4,
      init_from="",
      seed=0,
      optimizer=dict(learning_rate=2e-3, warmup_steps=50, decay="cosine", end_learning_rate_ratio=0.1,
                     weight_decay=0.01, grad_clip_norm=1.0),
      checkpoint=dict(keep_last=2),
  )
  if stage == "lora":
    config.model.llm.lora_rank = 8
  if "micro" in variants:
    m = config.model
    m.whisper.update(d_model=32, num_layers=1, num_heads=2, ffn_dim=64)
    m.beats.update(patch_dim=16, width=32, num_layers=1, num_heads=2, ffn_dim=64, conv_pos_groups=2)
    m.bridge.qformer.update(encoder_dim=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            llm_dim=32)
    m.llm.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)

  config.mesh = sharding.default_mesh_section()
  # Towers this narrow hold a large share of replicated biases and norms: 3 % above perfect sharding on
  # 8 devices (11 % for `micro`), where a 7B model is at 0.6-2.5 %.
  config.mesh.sharding_tolerance = 0.5 if "micro" in variants else 0.1
  return config
