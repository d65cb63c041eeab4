"""MusicFlamingo: Audio Flamingo 3's architecture (`af3_7b.py`: Whisper-large-v3 encoder, 2-layer GELU
projector, Qwen2.5-7B) plus a parameter-free rotary time embedding on the pooled encoder frames
(θ 1200, a fifth of the 1280 channels' frequencies, 40 ms per frame), each clip's `<sound>` span wrapped
in `<|sound_bos|>` / `<|sound_eos|>` (the `musicflamingo` chat template), and clips up to 1200 s
(40 windows of 30 s).

Start from the released weights: `alm-jax import-hf music-flamingo-hf W0`, then
`alm-jax train --config configs/musicflamingo_7b.py:lora --config.train.init_from=W0 ...`.
Stages as in `af3_7b.py`: `projector`, `audio` (encoder + projector), `lora`, `full`.
"""

import os

import ml_collections

from alm_jax.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: a stage name (`projector`, `audio`, `lora`, `full`) preselects it; `lora` adds the adapters."""
  stage = arg or "full"
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"af3_7b.py:{stage}"))
  config.model.rotary_time = dict(theta=1200.0, fraction=0.2, mel_frame_seconds=0.01)
  config.model.audio.max_windows = 40  # up to 1200 s per clip
  config.data.template = "musicflamingo"
  # A 1200 s clip is 40 x 750 = 30000 audio tokens: one more bucket than AF3's.
  config.data.length_buckets = (*config.data.length_buckets, 32768)
  config.train.init_from = ""  # an `alm-jax import-hf` output of nvidia/music-flamingo-hf, or the previous stage
  return config
