"""Qwen2.5-Omni-7B thinker: Whisper-large-v3-shaped audio tower on 2 s chunks (conv stem, positions and
attention restart per chunk; padding masked, average-pooled) → its `proj` (1280 → 3584, our one-layer
projector) → Qwen2.5-7B (28 layers, 28/4 heads, θ 1e6). Talker, token2wav and the vision tower are not part of it.

Start from the released weights: `alm-jax import-hf Qwen2.5-Omni-7B W0` (the thinker is read, the rest skipped
with a note), then `alm-jax train --config configs/qwen2_5_omni_7b.py:lora --config.train.init_from=W0
--config.data.path=...`. Sizes follow the released `config.json` (import-hf reads the real values; `init_from`
refuses a mismatch). Clips over 30 s run as 30 s windows of whole chunks (up to 20 = 600 s), which the chunked
tower encodes exactly as one long clip. For text and audio prompts TMRoPE's three position axes are the same
sequential ids, so the decoder runs plain RoPE. Stages: `projector` (the tower's proj), `lora`, `full`.
"""

import ml_collections

OMNI_AUDIO = dict(n_mels=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, max_positions=1500,
                  pool=True, mask_padding=True, chunk_frames=200, remat="full", attention="splash")
LEARNING_RATES = {"projector": 1e-3, "lora": 2e-4, "full": 1e-5}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a stage name (`projector`, `lora`, `full`) preselects it; `lora` adds the adapters."""
  stage = arg or "lora"
  config = ml_collections.ConfigDict()
  config.model = dict(
      encoders=("whisper",),
      whisper=OMNI_AUDIO,
      fusion="aligned",
      encoder_norm=False,
      trim_padding=True,  # only frames of real audio become tokens
      bridge=dict(kind="mlp", mlp=dict(in_dim=1280, out_dim=3584, num_layers=1, act="gelu", use_bias=True)),
      llm=dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
               num_heads=28, num_kv_heads=4, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
               mrope_section=(16, 24, 24),  # TMRoPE bands (time, height, width); text+audio ids are 1-D
               qkv_bias=True, tie_embeddings=False, remat="full", attention="splash",
               lora_rank=8 if stage == "lora" else 0,
               lora_alpha=32.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down")),
      audio=dict(sample_rate=16000, window_seconds=30.0, max_windows=20),
      frontend=dict(method="matmul", examples_per_step=0),
      audio_token_id=151646,  # <|AUDIO|>
      loss_chunk_tokens=512,  # float32 logits over a 152k vocabulary, 512 positions at a time
  )
  config.data = dict(
      path="",  # a manifest, a `data pack` folder or tfds:NAME
      template="qwen2.5-omni",
      batch_size=256,
      length_buckets=(256, 512, 1024, 2048),
      max_clips=4,
      max_clip_seconds=30.0,
      workers=8,
  )
  config.train = dict(
      stage=stage,
      steps=20000,
      log_every=50,
      checkpoint_every=1000,
      eval_every=1000,
      eval_batches=16,
      init_from="",  # an `alm-jax import-hf` output of Qwen/Qwen2.5-Omni-7B, or the previous stage
      compute_dtype="bfloat16",
      optimizer=dict(learning_rate=LEARNING_RATES.get(stage, 1e-5), warmup_steps=500, decay="cosine",
                     end_learning_rate_ratio=0.1, weight_decay=0.01, grad_clip_norm=1.0),
      checkpoint=dict(keep_last=3),
  )
  config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1), sharding_tolerance=0.15)
  return config
