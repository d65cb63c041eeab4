"""Qwen2-Audio-7B: Whisper-large-v3 encoder (padding masked, average-pooled) → one
Linear (1280 → 4096) → Qwen2-7B (32 layers, 32/32 heads, θ 1e4, eps 1e-5).

Start from the released weights: `alm-jax import-hf Qwen2-Audio-7B-Instruct W0`,
then `alm-jax train --config configs/qwen2_audio_7b.py:lora
--config.train.init_from=W0 --config.data.path=...`. Sizes follow the released
`config.json` (import-hf reads the real values; `init_from` refuses a mismatch).
The processor truncates clips at 30 s, so one window per clip.
Stages: `projector`, `audio` (encoder + projector), `lora`, `full`.
"""

import ml_collections

WHISPER_LARGE_V3 = dict(n_mels=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, max_positions=1500,
                        pool=True, mask_padding=True, remat="full", attention="splash")
LEARNING_RATES = {"projector": 1e-3, "audio": 2e-4, "lora": 2e-4, "full": 1e-5}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a stage name (`projector`, `audio`, `lora`, `full`) preselects it; `lora` adds the adapters."""
  stage = arg or "lora"
  config = ml_collections.ConfigDict()
  config.model = dict(
      encoders=("whisper",),
      whisper=WHISPER_LARGE_V3,
      fusion="aligned",
      encoder_norm=False,
      trim_padding=True,  # only frames of real audio become tokens
      bridge=dict(kind="mlp", mlp=dict(in_dim=1280, out_dim=4096, num_layers=1, act="gelu", use_bias=True)),
      llm=dict(family="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, rope_theta=10000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
               qkv_bias=True, tie_embeddings=False, remat="full", attention="splash",
               lora_rank=8 if stage == "lora" else 0,
               lora_alpha=32.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down")),
      audio=dict(sample_rate=16000, window_seconds=30.0, max_windows=1),
      # TPU choices (config, never detected): the matmul DFT on the MXU over all windows at once; splash attention
      # (the Pallas TPU kernel) in Whisper and the LLM; layers scanned (`scan_layers`, the default).
      frontend=dict(method="matmul", examples_per_step=0),
      audio_token_id=151646,  # <|AUDIO|>
      # The loss in chunks of 512 positions per row (`chunked_cross_entropy`): float32 logits over this 156k
      # vocabulary are 0.6 MiB per position, 1.2 GiB per 2048-token row, 4.8 GiB per array at 4 rows per chip,
      # with the softmax and the logits' gradient as large beside them. In chunks of 512 one chunk's arrays are
      # a quarter of that, in 4 scan steps whose matmuls ([rows x 512, 4096] by [4096, 156k]) stay MXU-sized.
      loss_chunk_tokens=512,
  )
  config.data = dict(
      path="",  # a manifest, a `data pack` folder or tfds:NAME
      template="qwen2-audio",
      batch_size=256,
      length_buckets=(256, 512, 1024, 2048),
      max_clips=4,
      max_clip_seconds=30.0,
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
      init_from="",  # an `alm-jax import-hf` output of Qwen/Qwen2-Audio-7B(-Instruct), or the previous stage
      compute_dtype="bfloat16",
      optimizer=dict(learning_rate=LEARNING_RATES.get(stage, 1e-5), warmup_steps=500, decay="cosine",
                     end_learning_rate_ratio=0.1, weight_decay=0.01, grad_clip_norm=1.0),
      checkpoint=dict(keep_last=3),
  )
  # A TPU pod slice (e.g. v5p-128): FSDP over every chip; for several slices set dcn_shape=(-1, 1, 1) and a
  # fixed shape such as (1, 64, 1).
  # LoRA adapters on the MLP projections (11008 x 8) split only over `tensor`, so over a pure FSDP
  # mesh they are replicated: 10.3 % above perfect sharding on 64 chips (the base weights alone: <1 %).
  config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1), sharding_tolerance=0.15)
  return config
