"""MusicFlamingo's config keys ↔ our `RotaryTimeConfig`.

A `MusicFlamingoForConditionalGeneration` folder is an Audio Flamingo 3 folder
(same encoder, projector and Qwen2 decoder tensors, under the same names) whose
`config.json` adds the parameter-free rotary time embedding (`rope_parameters`:
`rope_theta`, `partial_rotary_factor`, `rope_type`; `audio_frame_step`) and the
ids of `<|sound_bos|>` / `<|sound_eos|>`, which wrap each clip's placeholders.
`hf_alm` handles the rest as for AF3; this module reads and writes those keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models.rotary_time import RotaryTimeConfig

# The reference config class's defaults for keys a folder may leave out.
DEFAULTS = dict(rope_theta=1200.0, partial_rotary_factor=0.2, audio_frame_step=0.01, audio_bos_token_id=151670,
                audio_eos_token_id=151671)


def rotary_from_hf(config: Mapping[str, Any], source: str = "config.json") -> RotaryTimeConfig:
  """Our `RotaryTimeConfig` from a MusicFlamingo `config.json` dict (`CheckpointError` for a kind we do not run)."""
  rope = dict(config.get("rope_parameters") or {})
  kind = rope.get("rope_type", "default")
  if kind != "default":
    raise CheckpointError(f"{source}: rope_parameters.rope_type {kind!r} is not supported (only 'default')")
  try:
    return RotaryTimeConfig(
        theta=float(rope.get("rope_theta", config.get("rope_theta", DEFAULTS["rope_theta"]))),
        fraction=float(rope.get("partial_rotary_factor",
                                config.get("partial_rotary_factor", DEFAULTS["partial_rotary_factor"]))),
        mel_frame_seconds=float(config.get("audio_frame_step", DEFAULTS["audio_frame_step"])),
    )
  except ConfigError as e:
    raise CheckpointError(f"{source}: {str(e).removeprefix('config error: ')}") from None


def rotary_to_hf(cfg: RotaryTimeConfig, base: Mapping[str, Any]) -> dict[str, Any]:
  """The MusicFlamingo keys for `cfg`; the sound bos/eos ids come from `base` (the imported config) if it has them."""
  return {
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.theta, "partial_rotary_factor": cfg.fraction},
      "audio_frame_step": cfg.mel_frame_seconds,
      "audio_bos_token_id": int(base.get("audio_bos_token_id", DEFAULTS["audio_bos_token_id"])),
      "audio_eos_token_id": int(base.get("audio_eos_token_id", DEFAULTS["audio_eos_token_id"])),
  }
