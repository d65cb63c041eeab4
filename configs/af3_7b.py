"""Audio Flamingo 3: Whisper-large-v3 encoder (padding masked, average-pooled) →
Linear (1280 → 3584) → GELU → Linear (3584 → 3584) → Qwen2.5-7B (28 layers,
28/4 heads, θ 1e6).

Long audio is cut into 30 s windows encoded as a batch, up to 20 windows
(600 s) per clip. Start from the released weights:
`alm-jax import-hf audio-flamingo-3-hf W0`, then
`alm-jax train --config configs/af3_7b.py:audio --config.train.init_from=W0 ...`.
Sizes follow the released `config.json`. Stages: `projector` (alignment),
`audio` (encoder + projector), `lora`, `full` (AF3's last stages train the LLM).
"""

import ml_collections

WHISPER_LARGE_V3 = dict(n_mels=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, max_positions=1500,
                        pool=True, mask_padding=True, remat="full", attention="splash")
LEARNING_RATES = {"projector": 1e-3, "audio": 1e-4, "lora": 2e-4, "full": 2e-5}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a stage name (`projector`, `audio`, `lora`, `full`) preselects it; `lora` adds the adapters."""
  stage = arg or "full"
  config = ml_collections.ConfigDict()
  config.model = dict(
      encoders=("whisper",),
      whisper=WHISPER_LARGE_V3,
      fusion="aligned",
      encoder_norm=False,
      trim_padding=True,
      bridge=dict(kind="mlp", mlp=dict(in_dim=1280, out_dim=3584, num_layers=2, hidden_dim=0, act="gelu",
                                       use_bias=True)),
      llm=dict(family="qwen2", vocab_size=151672, hidden_size=3584, intermediate_size=18944, num_layers=28,
               num_heads=28, num_kv_heads=4, rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
               qkv_bias=True, tie_embeddings=False, remat="full", attention="splash",
               lora_rank=8 if stage == "lora" else 0,
               lora_alpha=16.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down")),
      audio=dict(sample_rate=16000, window_seconds=30.0, max_windows=20),  # up to 600 s per clip
      # TPU choices (config, never detected): the matmul DFT on the MXU over all windows at once; splash attention
      # (the Pallas TPU kernel) in Whisper and the LLM; layers scanned (`scan_layers`, the default).
      frontend=dict(method="matmul", examples_per_step=0),
      audio_token_id=151669,  # <sound>
      # The loss in chunks of 512 positions per row (`chunked_cross_entropy`): float32 logits over this 152k
      # vocabulary are 0.6 MiB per position, 9.3 GiB per 16384-token row (the longest bucket), with the softmax
      # and the logits' gradient as large beside them. A 512-position chunk's arrays are 0.3 GiB per row.
      loss_chunk_tokens=512,
  )
  config.data = dict(
      path="",
      template="af3",
      batch_size=128,
      length_buckets=(512, 1024, 2048, 4096, 8192, 16384),
      max_clips=1,
      workers=8,
  )
  config.train = dict(
      stage=stage,
      stages={"audio": [["^encoder/", True], ["^bridge/", True]]},
      steps=20000,
      log_every=50,
      checkpoint_every=1000,
      eval_every=1000,
      eval_batches=16,
      init_from="",  # an `alm-jax import-hf` output of nvidia/audio-flamingo-3-hf, or the previous stage
      compute_dtype="bfloat16",
      optimizer=dict(learning_rate=LEARNING_RATES.get(stage, 2e-5), warmup_steps=500, decay="cosine",
                     end_learning_rate_ratio=0.1, weight_decay=0.0, grad_clip_norm=1.0),
      checkpoint=dict(keep_last=3),
  )
  # A TPU pod slice (e.g. v5p-128): FSDP over every chip; long clips make big window batches, so keep the
  # batch axis wide. For several slices set dcn_shape=(-1, 1, 1) and a fixed shape such as (1, 64, 1).
  # LoRA adapters on the MLP projections (18944 x 8) split only over `tensor`, so over a pure FSDP mesh they
  # are replicated: 11.6 % above perfect sharding on 64 chips in the `lora` stage (other stages: <1 %).
  config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1), sharding_tolerance=0.15)
  return config
