"""SALMONN-7B-style: Whisper-large-v2 + BEATs iter3+ (each LayerNorm'd, patch
tokens paired with Whisper frames index by index as SALMONN does) → window
Q-former (2 layers, 1 query per 17 frames ≈ 0.33 s, cross-attention every
layer) → Linear 768 → 4096 → a Vicuna-7B (Llama-2) decoder with LoRA r 8, α 32.

Trains from the separately released towers: set `config.train.pretrained.*`
to your local copies (below). The default stage `salmonn` trains what SALMONN
trains: Q-former, projection, the two encoder LayerNorms and the LoRA adapters.
Use `fusion="aligned"` for properly time-aligned BEATs features instead.
"""

import ml_collections

# Set these to your local copies of the released towers (they are read only for a fresh run).
PRETRAINED = dict(
    whisper="/path/to/whisper-large-v2",  # Hugging Face folder (openai/whisper-large-v2) or openai-whisper .pt
    beats="/path/to/BEATs_iter3_plus_AS2M.pt",  # official BEATs checkpoint (microsoft/unilm)
    llm="/path/to/vicuna-7b-v1.5",  # Hugging Face Llama-family folder (lmsys/vicuna-7b-v1.5)
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a stage name (`salmonn`, `lora`, `projector`, `full`) preselects it."""
  stage = arg or "salmonn"
  config = ml_collections.ConfigDict()
  config.model = dict(
      encoders=("whisper", "beats"),
      fusion="salmonn",
      encoder_norm=True,  # ln_speech / ln_audio
      trim_padding=False,  # every frame of the 30 s window becomes Q-former input
      whisper=dict(n_mels=80, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120, max_positions=1500,
                   pool=False, mask_padding=False, remat="full", attention="splash"),
      beats=dict(n_mels=128, patch_size=16, patch_dim=512, width=768, num_layers=12, num_heads=12, ffn_dim=3072),
      bridge=dict(kind="qformer", qformer=dict(
          mode="window", encoder_dim=1280 + 768, hidden_size=768, num_layers=2, num_heads=12,
          intermediate_size=3072, cross_attention_frequency=1, queries=1, window=17, llm_dim=4096)),
      llm=dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
               qkv_bias=False, tie_embeddings=False, remat="full", attention="splash", lora_rank=8, lora_alpha=32.0,
               lora_targets=("q", "v")),
      audio=dict(sample_rate=16000, window_seconds=30.0, max_windows=1),
      # TPU choices (config, never detected): the matmul DFT on the MXU over all windows at once; splash attention
      # (the Pallas TPU kernel) in Whisper and the LLM (BEATs' position bias needs xla); layers scanned.
      frontend=dict(method="matmul", examples_per_step=0),
      audio_token_id=-1,  # <unk>, taken from the tokenizer
  )
  config.data = dict(
      path="",
      template="salmonn",
      batch_size=128,
      length_buckets=(256, 512, 1024),
      max_clips=1,
      max_clip_seconds=30.0,
      workers=8,
  )
  config.train = dict(
      stage=stage,
      stages={"salmonn": [["^bridge/", True], ["^encoder/(whisper|beats)_norm/", True], ["(^|/)lora_[ab]$", True]]},
      steps=30000,
      log_every=50,
      checkpoint_every=1000,
      eval_every=1000,
      eval_batches=16,
      init_from="",
      pretrained=PRETRAINED,
      compute_dtype="bfloat16",
      optimizer=dict(learning_rate=3e-5, warmup_steps=3000, decay="cosine", end_learning_rate_ratio=0.33,
                     weight_decay=0.05, grad_clip_norm=1.0),
      checkpoint=dict(keep_last=3),
  )
  # A TPU pod slice: FSDP over every chip (for several slices: dcn_shape=(-1, 1, 1) and a fixed shape).
  # the LoRA adapters' (8, 32, 128) halves split only over `tensor`: 2.5 % above perfect sharding on
  # 64 chips with FSDP alone.
  config.mesh = dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1), sharding_tolerance=0.05)
  return config
