"""Qwen2.5-Omni's thinker: Hugging Face `Qwen2_5OmniThinkerForConditionalGeneration` (and the thinker inside a
whole `Qwen2_5OmniForConditionalGeneration` folder) ↔ our `AudioLanguageModel`.

The thinker's audio path is a Whisper-large-v3-shaped tower that works on
2 s chunks (`n_window` = 100 → 200 mel frames: conv stem, positions and
attention restart in each chunk; our `WhisperConfig(chunk_frames=200)`),
average-pools, applies `ln_post` and a Linear `proj` (our one-layer MLP bridge),
then a Qwen2.5 decoder whose TMRoPE positions (`get_rope_index`) are, for
prompts of text and audio only, the same sequential ids on all three axes,
i.e. plain 1-D RoPE (`rope_index` below computes them; `LLMConfig.mrope_section`
turns 3-D positions into TMRoPE tables, `llm.rope_tables`).

Import reads the thinker and skips the talker, token2wav and the vision
tower with a printed note; export writes a thinker folder (the vision tower
is left out: transformers initialises it afresh, and it never touches
text+audio logits). The audio tower's unused `audio_bos_eos_token` table is
written as zeros, its sinusoid position table (not stored by HF) is rebuilt.
`hf_alm` dispatches here for the family `qwen2.5-omni`.

Clips over 30 s: the tower is chunk-local, so 30 s windows (whole chunks) give
exactly what one long clip gives for the same log-Mel frames; but our front end
computes log-Mel per 30 s window (as for AF3), while HF's extractor on a whole
long clip (`truncation=False`) differs at the window seams and in its per-clip
clamp floor (2e-2 of the logits' scale on a 45 s test clip). HF's processor
truncates at 30 s by default; `import-hf --max-windows 1` does the same.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from alm_jax.checkpoints import hf_llm, mapping
from alm_jax.checkpoints import whisper as whisper_ckpt
from alm_jax.checkpoints.mapping import NameMap, Rule
from alm_jax.checkpoints.qformer_hf import projector_name_map
from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models.alm import ALMConfig, AudioConfig, BridgeConfig
from alm_jax.models.projector import ProjectorConfig
from alm_jax.models.whisper import WhisperConfig, sinusoids

FAMILY = "qwen2.5-omni"
THINKER_TYPE, WHOLE_TYPE = "qwen2_5_omni_thinker", "qwen2_5_omni"
THINKER_ARCH, WHOLE_ARCH = "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration"
MEL_FRAMES_PER_SECOND = 100
POSITIONS = "encoder/whisper/embed_positions"  # ours only: HF rebuilds the table instead of storing it
SKIPPED = r"^(thinker\.)?(model\.)?visual\.|^talker\.|^token2wav\.|audio_bos_eos_token\.weight$|\.inv_freq$"
BOS_EOS_TABLE = "audio_bos_eos_token.weight"

# HF class defaults for keys a released config may leave out.
_AUDIO_DEFAULTS = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                       encoder_ffn_dim=5120, max_source_positions=1500, activation_function="gelu", n_window=100,
                       output_dim=3584)
_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                      rms_norm_eps=1e-6, rope_theta=1000000.0)
_THINKER_DEFAULTS = dict(audio_token_index=151646, image_token_index=151655, video_token_index=151656,
                         audio_start_token_id=151647, audio_end_token_id=151648, vision_start_token_id=151652,
                         vision_end_token_id=151653, position_id_per_seconds=25,
                         seconds_per_chunk=2, user_token_id=872)
MROPE_SECTION = [16, 24, 24]  # the released thinker's split of head_dim / 2 over (time, height, width)

# Where each part lives in a saved folder, below an optional `thinker.` (whole model): what `save_pretrained`
# writes (transformers 5.23+), and the layout of the modules themselves.
LAYOUTS: dict[str, dict[str, str]] = {
    "legacy": dict(encoder="audio_tower.", llm="model.", lm_head="lm_head."),
    "modern": dict(encoder="model.audio_tower.", llm="model.language_model.", lm_head="lm_head."),
}


def thinker_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """The thinker's config dict of a thinker or whole-model `config.json`."""
  if config.get("model_type") == WHOLE_TYPE or "thinker_config" in config:
    return dict(config.get("thinker_config") or {})
  return dict(config)


# ---------------------------------------------------------------------------
# Configs.


def alm_config_from_hf(config: Mapping[str, Any], *, source: str = "config.json", has_lm_head: bool | None = None,
                       max_windows: int | None = None, default_windows: int = 20) -> ALMConfig:
  """Our `ALMConfig` for a Qwen2.5-Omni thinker (or whole-model) `config.json` dict."""
  thinker = thinker_config(config)
  audio = {**_AUDIO_DEFAULTS, **(thinker.get("audio_config") or {})}
  if audio.get("scale_embedding"):
    raise CheckpointError(f"{source}: audio_config.scale_embedding=true is not supported")
  text = {**_TEXT_DEFAULTS, **(thinker.get("text_config") or {}), "model_type": "qwen2"}
  overrides = {} if has_lm_head is None else {"tie_embeddings": not has_lm_head}
  section = (text.get("rope_parameters") or text.get("rope_scaling") or {}).get("mrope_section")
  half = (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]) // 2
  overrides["mrope_section"] = tuple(section or (MROPE_SECTION if sum(MROPE_SECTION) == half else ()))
  try:
    llm = hf_llm.llm_config_from_hf(text, source=f"{source}:text_config", **overrides)
    whisper = WhisperConfig(
        n_mels=int(audio["num_mel_bins"]), d_model=int(audio["d_model"]), num_layers=int(audio["encoder_layers"]),
        num_heads=int(audio["encoder_attention_heads"]), ffn_dim=int(audio["encoder_ffn_dim"]),
        max_positions=int(audio["max_source_positions"]), activation=audio["activation_function"], pool=True,
        mask_padding=True, chunk_frames=2 * int(audio["n_window"]),
    )
    window_frames = 2 * whisper.max_positions
    if window_frames % whisper.chunk_frames:
      raise CheckpointError(f"{source}: audio_config.n_window {audio['n_window']} does not divide a window of "
                            f"{window_frames} mel frames (2 x max_source_positions)")
    projector = ProjectorConfig(in_dim=whisper.d_model, out_dim=int(audio["output_dim"]), num_layers=1, hidden_dim=0,
                                act="gelu", use_bias=True)
    token_id = thinker.get("audio_token_index", thinker.get("audio_token_id", _THINKER_DEFAULTS["audio_token_index"]))
    return ALMConfig(
        encoders=("whisper",), whisper=whisper, fusion="aligned", encoder_norm=False, trim_padding=True,
        bridge=BridgeConfig(kind="mlp", mlp=projector), llm=llm,
        audio=AudioConfig(sample_rate=16000, window_seconds=window_frames / MEL_FRAMES_PER_SECOND,
                          max_windows=int(max_windows or default_windows)),
        audio_token_id=int(token_id),
    )
  except ConfigError as e:
    raise CheckpointError(f"{source}: {str(e).removeprefix('config error: ')}") from None


def exportable_problems(cfg: ALMConfig) -> list[str]:
  """Why `cfg` has no exact Qwen2.5-Omni thinker counterpart (empty when it has one)."""
  if cfg.encoders != ("whisper",) or cfg.bridge.kind != "mlp":
    return [f"needs a Whisper encoder and an MLP projector, the model has encoders {list(cfg.encoders)} "
            f"and a {cfg.bridge.kind} bridge"]
  w, mlp, problems = cfg.whisper, cfg.bridge.mlp, []
  if not (w.pool and w.mask_padding and w.chunk_frames):
    problems.append("needs model.whisper.pool=True, mask_padding=True and chunk_frames > 0 (2 x n_window)")
  if cfg.encoder_norm or not cfg.trim_padding:
    problems.append("needs model.encoder_norm=False and trim_padding=True")
  if mlp.num_layers != 1 or not mlp.use_bias:
    problems.append(f"needs a one-layer projector with bias (the tower's proj), the model has {mlp.num_layers}")
  if cfg.llm.mrope_section and sum(cfg.llm.mrope_section) != cfg.llm.head_dim // 2:
    problems.append(f"needs llm.mrope_section summing to head_dim / 2, the model has {list(cfg.llm.mrope_section)}")
  if cfg.llm.family != "qwen2" or cfg.llm.rope_type != "default":
    problems.append(f"needs a qwen2 decoder with default RoPE, the model has {cfg.llm.family} / {cfg.llm.rope_type}")
  if cfg.audio_token_id < 0:
    problems.append("needs model.audio_token_id set (it is -1)")
  if cfg.clip_embeddings:
    problems.append("needs model.clip_embeddings=0 (the family has no clip-number vectors)")
  return problems


def alm_config_to_hf(cfg: ALMConfig, *, base: Mapping[str, Any] | None = None,
                     source: str = "<model>") -> dict[str, Any]:
  """The thinker `config.json` dict for `cfg` (float32, separate `lm_head`); other keys of `base` are kept."""
  problems = exportable_problems(cfg)
  if problems:
    raise CheckpointError(f"{source}: cannot export as {FAMILY}: {'; '.join(problems)}")
  base = thinker_config(base or {}) if (base or {}).get("model_type") in (THINKER_TYPE, WHOLE_TYPE) else {}
  w = cfg.whisper
  audio = {**(base.get("audio_config") or {}), "model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": w.n_mels,
           "d_model": w.d_model, "encoder_layers": w.num_layers, "encoder_attention_heads": w.num_heads,
           "encoder_ffn_dim": w.ffn_dim, "max_source_positions": w.max_positions, "activation_function": w.activation,
           "n_window": w.chunk_frames // 2, "output_dim": cfg.bridge.mlp.out_dim, "scale_embedding": False}
  try:
    text = hf_llm.llm_config_to_hf(cfg.llm)
  except ConfigError as e:
    raise CheckpointError(f"{source}: {str(e).removeprefix('config error: ')}") from None
  for key in ("architectures", "torch_dtype", "rope_theta", "rope_scaling"):
    text.pop(key, None)
  section = list(cfg.llm.mrope_section or MROPE_SECTION)
  text.update(model_type="qwen2_5_omni_text", tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.llm.rope_theta, "mrope_section": section})
  out = {**_THINKER_DEFAULTS, **base}
  out.pop("torch_dtype", None)
  out.update(architectures=[THINKER_ARCH], model_type=THINKER_TYPE, audio_config=audio, text_config=text,
             audio_token_index=cfg.audio_token_id, tie_word_embeddings=False, dtype="float32")
  return out


# ---------------------------------------------------------------------------
# Name maps.


def _encoder_rules(prefix: str) -> list[Rule]:
  rules = []
  for rule in whisper_ckpt.HF_ENCODER.rules:
    if rule.ours == "embed_positions":
      continue  # rebuilt, not stored
    theirs = rule.theirs.replace("layer_norm.", "ln_post.") if rule.theirs.startswith("layer_norm.") else rule.theirs
    rules.append(Rule("encoder/whisper/" + rule.ours, prefix + theirs, rule.transform))
  for rule in projector_name_map("qwen2_audio", prefix).prefixed("bridge/mlp/").rules:
    rules.append(Rule(rule.ours, rule.theirs.replace(prefix + "linear.", prefix + "proj."), rule.transform))
  return rules


def name_map(cfg: ALMConfig, layout: str = "legacy", root: str = "") -> NameMap:
  """Our paths ↔ the thinker's tensor names under `root` (`thinker.` in a whole-model folder)."""
  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel

  prefixes = {k: root + v for k, v in LAYOUTS[layout].items()}
  rules = _encoder_rules(prefixes["encoder"]) + hf_alm.llm_rules(cfg.llm, prefixes)
  return NameMap(FAMILY, rules, ignore=[SKIPPED])


def detect_layout(names: Any) -> tuple[str, str]:
  """(layout, root) of a folder's tensor names, from where the decoder's embedding lives."""
  names = set(names)
  for root in ("", "thinker."):
    for layout, prefixes in LAYOUTS.items():
      if root + prefixes["llm"] + "embed_tokens.weight" in names:
        return layout, root
  return "legacy", "thinker." if any(n.startswith("thinker.") for n in names) else ""


# ---------------------------------------------------------------------------
# Import and export.


def import_omni(folder: str, config: Mapping[str, Any], *, make_place: Callable | None = None,
                max_windows: int | None = None, default_windows: int = 20):
  """Reads the thinker of a Qwen2.5-Omni folder into our flat params (`hf_alm.ImportedALM`)."""
  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel

  shapes = hf_alm.tensor_shapes(folder)
  layout, root = detect_layout(shapes)
  has_head = root + LAYOUTS[layout]["lm_head"] + "weight" in shapes
  cfg = alm_config_from_hf(config, source=f"{folder}/config.json", has_lm_head=has_head, max_windows=max_windows,
                           default_windows=default_windows)
  params_layout = hf_alm.model_layout(cfg)
  names = name_map(cfg, layout, root)
  hf_alm.check_shapes(params_layout.abstract, names, shapes, folder)
  skipped = [n for n in shapes if re.search(r"^(thinker\.)?(model\.)?visual\.|^talker\.|^token2wav\.", n)]
  if skipped:
    parts = sorted({"vision tower" if "visual." in n else n.split(".")[0] for n in skipped})
    print(f"note: {folder}: skipped {len(skipped)} tensors of {', '.join(parts)} (only the thinker's text+audio "
          "path is imported)")
  place = make_place(params_layout) if make_place is not None else None
  params = mapping.import_params(params_layout.abstract, names, hf_llm.WideningReader(folder), place=place,
                                 allow_missing=lambda path: path == POSITIONS)
  table = np.asarray(sinusoids(cfg.whisper.max_positions, cfg.whisper.d_model))
  params[POSITIONS] = place(POSITIONS, table) if place is not None else table
  return hf_alm.ImportedALM(cfg, FAMILY, params, dict(config), layout)


def export_omni(cfg: ALMConfig, params: Mapping[str, Any], folder: str, *, base_config: Mapping[str, Any] | None,
                side_files: str | None, tokenizer: str | None, max_shard_bytes: int, source: str) -> list[str]:
  """Writes a thinker folder `Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained` loads (LoRA merged)."""
  from alm_jax.checkpoints import hf_alm  # pylint: disable=import-outside-toplevel

  hf_config = alm_config_to_hf(cfg, base=base_config, source=source)
  flat = {p: v for p, v in hf_alm.merged_params(cfg, params).items() if p != POSITIONS}
  names = name_map(hf_alm._untie(cfg), "legacy")  # pylint: disable=protected-access
  table = np.zeros((2, cfg.bridge.mlp.out_dim), np.float32)  # unused by the thinker's forward

  def tensors():
    yield from mapping.export_params(flat, names)
    yield LAYOUTS["legacy"]["encoder"] + BOS_EOS_TABLE, table

  return hf_alm.write_folder(folder, tensors(), hf_config, side_files=side_files, tokenizer=tokenizer,
                             max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------
# TMRoPE positions.


def rope_index(tokens: np.ndarray, mask: np.ndarray | None = None, *, image_token_id: int = 151655,
               video_token_id: int = 151656) -> tuple[np.ndarray, np.ndarray]:
  """`get_rope_index` for prompts of text and audio: (positions [3, B, L] int, deltas [B, 1]).

  Audio tokens take one id per 40 ms (`position_id_per_seconds` 25), which is
  one id per token, so every axis counts real tokens in order (padding gets
  1, as in the reference); the delta is max + 1 - real tokens (0 here).
  An image or video placeholder raises a one-line `CheckpointError`: the vision
  tower is not imported.
  """
  tokens = np.asarray(tokens)
  mask = np.ones_like(tokens, bool) if mask is None else np.asarray(mask).astype(bool)
  found = [name for name, tid in (("image", image_token_id), ("video", video_token_id)) if (tokens[mask] == tid).any()]
  if found:
    raise CheckpointError(f"a prompt holds {' and '.join(found)} placeholders; the {FAMILY} import has no vision "
                          "tower (text and audio only)")
  positions = np.where(mask, np.cumsum(mask, axis=-1) - 1, 1)
  deltas = positions.max(-1, keepdims=True) + 1 - mask.sum(-1, keepdims=True)
  return np.broadcast_to(positions[None], (3,) + positions.shape).copy(), deltas
