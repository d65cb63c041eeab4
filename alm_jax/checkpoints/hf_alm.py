"""Released audio-LLM checkpoints: Hugging Face `Qwen2AudioForConditionalGeneration`,
`AudioFlamingo3ForConditionalGeneration` and `MusicFlamingoForConditionalGeneration` folders ↔ our
`AudioLanguageModel` (MusicFlamingo is AF3 plus a rotary time embedding: `hf_musicflamingo`).

Both families are a Whisper-large-v3-shaped encoder that masks padding frames
and average-pools (our `WhisperConfig(pool=True, mask_padding=True)`), an MLP
projector (one Linear, or Linear → GELU → Linear) and a Qwen2 decoder, so one
`ALMConfig` with the `mlp` bridge describes either. This module turns a
folder's `config.json` into that config (`alm_config_from_hf`) and back
(`alm_config_to_hf`), builds one `NameMap` per family from the Whisper,
projector and LLM maps under the prefixes `save_pretrained` writes
(`audio_tower.`, `multi_modal_projector.`, `language_model.model.`,
`language_model.lm_head.`; the newer `model.audio_tower.` ... layout is read
too), imports tensor by tensor (`import_alm`, every tensor's shape checked
from the safetensors headers first) and exports with LoRA adapters merged
(`export_alm`). Single towers (`qwen2`, `qwen3`, `llama`, `whisper` folders)
go through `import_tower` / `export_tower`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from alm_jax.checkpoints import hf_llm, hf_musicflamingo, hf_omni, mapping
from alm_jax.checkpoints import whisper as whisper_ckpt
from alm_jax.checkpoints.mapping import NameMap, Rule
from alm_jax.checkpoints.qformer_hf import projector_name_map
from alm_jax.checkpoints.safetensors_io import INDEX_NAME, SIDE_FILES, SINGLE_NAME, copy_side_files, read_json
from alm_jax.checkpoints.safetensors_io import write_safetensors
from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models.alm import ALMConfig, AudioConfig, AudioLanguageModel, BridgeConfig
from alm_jax.models.llm import LLMConfig
from alm_jax.models.projector import ProjectorConfig
from alm_jax.models.whisper import WhisperConfig
from alm_jax.params import ParamLayout

Place = Callable[[str, np.ndarray], Any]

MEL_FRAMES_PER_SECOND = 100  # Whisper log-Mel hop 10 ms; two frames per encoder position
OMNI = "qwen2.5-omni"  # its config, names and tensors are `hf_omni`'s


@dataclasses.dataclass(frozen=True)
class Family:
  """One released layout: its Hugging Face identity and the settings our model uses for it.

  Attributes:
    name: our name (`--family`), also the chat template's name.
    model_type / architecture / encoder_type: the HF config's identity.
    projector: the `projector_name_map` layout; projector_layers: its Linear count.
    token_key: the config key holding the audio placeholder id; default_token_id: its HF default.
    max_windows: 30 s windows per clip (the reference processors' limit).
    encoder_keys: HF `audio_config` keys for d_model, layers, heads, FFN width.
    rotary_time: the rotary time embedding on encoder outputs (MusicFlamingo, see `hf_musicflamingo`).
    aliases: other architectures / model types of the family (a whole model around it).
  """

  name: str
  model_type: str
  architecture: str
  encoder_type: str
  projector: str
  projector_layers: int
  token_key: str
  default_token_id: int
  max_windows: int
  encoder_keys: tuple[str, str, str, str]
  rotary_time: bool = False
  aliases: tuple[str, ...] = ()

  @property
  def template(self) -> str:
    return self.name


FAMILIES: dict[str, Family] = {
    "qwen2-audio": Family(
        "qwen2-audio", "qwen2_audio", "Qwen2AudioForConditionalGeneration", "qwen2_audio_encoder", "qwen2_audio", 1,
        "audio_token_index", 151646, 1, ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"),
    ),
    "af3": Family(
        "af3", "audioflamingo3", "AudioFlamingo3ForConditionalGeneration", "audioflamingo3_encoder", "af3", 2,
        "audio_token_id", 151669, 20, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
    ),
    "musicflamingo": Family(
        "musicflamingo", "musicflamingo", "MusicFlamingoForConditionalGeneration", "audioflamingo3_encoder", "af3", 2,
        "audio_token_id", 151669, 40, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
        rotary_time=True,
    ),
    # The thinker of Qwen2.5-Omni (`hf_omni`): chunked tower, its `proj` as a one-layer projector, Qwen2.5.
    "qwen2.5-omni": Family(
        "qwen2.5-omni", "qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen2_5_omni_audio_encoder", "qwen2_audio", 1, "audio_token_index", 151646, 20,
        ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim"),
        aliases=("Qwen2_5OmniForConditionalGeneration", "qwen2_5_omni"),
    ),
}
TOWERS = ("qwen2", "qwen3", "llama", "whisper")
ALL_FAMILIES = tuple(FAMILIES) + TOWERS

# Prefixes of each part in a saved folder: what `save_pretrained` writes (transformers 5.23), and the newer layout.
LAYOUTS: dict[str, dict[str, str]] = {
    "legacy": dict(encoder="audio_tower.", projector="multi_modal_projector.", llm="language_model.model.",
                   lm_head="language_model.lm_head."),
    "modern": dict(encoder="model.audio_tower.", projector="model.multi_modal_projector.",
                   llm="model.language_model.", lm_head="lm_head."),
}

# HF class defaults for keys a released config may leave out.
_ENCODER_DEFAULTS = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                         encoder_ffn_dim=5120, max_source_positions=1500, activation_function="gelu")
_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                       num_attention_heads=32, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, rope_theta=10000.0)
_OUR_ENCODER_KEYS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim")


# ---------------------------------------------------------------------------
# Families and configs.


def detect_family(config: Mapping[str, Any], source: str) -> str:
  """The family of a HF `config.json` dict, from `architectures` / `model_type` (`CheckpointError` if none fits)."""
  architectures = list(config.get("architectures") or [])
  model_type = config.get("model_type")
  for family in FAMILIES.values():
    if {family.architecture, family.model_type, *family.aliases} & {*architectures, model_type}:
      return family.name
  if model_type in TOWERS:
    return model_type
  raise CheckpointError(
      f"{source}: unsupported model (architectures {architectures}, model_type {model_type!r}); "
      f"supported: {', '.join(f.architecture for f in FAMILIES.values())} and {', '.join(TOWERS)} folders"
  )


def _config_error(e: ConfigError, source: str) -> CheckpointError:
  return CheckpointError(f"{source}: {str(e).removeprefix('config error: ')}")


def whisper_config_from_hf(audio: Mapping[str, Any], family: Family, source: str) -> WhisperConfig:
  """Our pooled, padding-masked encoder config from a family's `audio_config` (either key naming)."""
  values = dict(_ENCODER_DEFAULTS)
  for ours, theirs in zip(_OUR_ENCODER_KEYS, family.encoder_keys):
    for key in (ours, theirs):  # AF3 names them like a BERT config; both namings occur
      if key in audio:
        values[ours] = audio[key]
  for key in ("num_mel_bins", "max_source_positions", "activation_function"):
    if key in audio:
      values[key] = audio[key]
  try:
    return whisper_ckpt.config_from_hf({**values, "model_type": family.encoder_type})
  except ConfigError as e:
    raise _config_error(e, f"{source}:audio_config") from None


def alm_config_from_hf(config: Mapping[str, Any], family: str, *, source: str = "config.json",
                       has_lm_head: bool | None = None, max_windows: int | None = None) -> ALMConfig:
  """Our `ALMConfig` for a HF Qwen2-Audio / AF3 `config.json` dict.

  `has_lm_head` (whether the checkpoint stores `lm_head.weight`) decides tied
  embeddings — both HF classes keep a separate head whatever the text config
  says; `max_windows` overrides the family's window limit (1 for Qwen2-Audio,
  whose processor truncates at 30 s; 20 = 600 s for AF3).
  """
  fam = FAMILIES[family]
  if family == OMNI:
    return hf_omni.alm_config_from_hf(config, source=source, has_lm_head=has_lm_head, max_windows=max_windows,
                                      default_windows=fam.max_windows)
  whisper = whisper_config_from_hf(config.get("audio_config") or {}, fam, source)
  text = dict(config.get("text_config") or {})
  if text.get("model_type", "qwen2") == "qwen2":
    text = {**_QWEN2_DEFAULTS, "model_type": "qwen2", **text}
  overrides = {} if has_lm_head is None else {"tie_embeddings": not has_lm_head}
  try:
    llm = hf_llm.llm_config_from_hf(text, source=f"{source}:text_config", **overrides)
  except ConfigError as e:
    raise CheckpointError(str(e).removeprefix("config error: ")) from None
  token_id = config.get(fam.token_key, config.get("audio_token_id", config.get("audio_token_index")))
  try:
    projector = ProjectorConfig(
        in_dim=whisper.d_model, out_dim=llm.hidden_size, num_layers=fam.projector_layers, hidden_dim=0,
        act=config.get("projector_hidden_act", "gelu"), use_bias=bool(config.get("projector_bias", True)),
    )
    return ALMConfig(
        encoders=("whisper",), whisper=whisper, fusion="aligned", encoder_norm=False, trim_padding=True,
        bridge=BridgeConfig(kind="mlp", mlp=projector), llm=llm,
        audio=AudioConfig(sample_rate=16000, window_seconds=2 * whisper.max_positions / MEL_FRAMES_PER_SECOND,
                          max_windows=int(max_windows or fam.max_windows)),
        audio_token_id=int(fam.default_token_id if token_id is None else token_id),
        rotary_time=hf_musicflamingo.rotary_from_hf(config, source) if fam.rotary_time else None,
    )
  except ConfigError as e:
    raise _config_error(e, source) from None


def exportable_problems(cfg: ALMConfig, family: str) -> list[str]:
  """Why `cfg` has no exact `family` counterpart (empty when it has one)."""
  fam = FAMILIES[family]
  if family == OMNI:
    return hf_omni.exportable_problems(cfg)
  problems = []
  if cfg.encoders != ("whisper",):
    problems.append(f"needs a Whisper encoder alone, the model has encoders {list(cfg.encoders)}")
  if cfg.bridge.kind != "mlp":
    problems.append(f"needs an MLP projector bridge, the model has a {cfg.bridge.kind} bridge")
  if problems:
    return problems
  w, mlp = cfg.whisper, cfg.bridge.mlp
  if not (w.pool and w.mask_padding):
    problems.append("needs model.whisper.pool=True and mask_padding=True")
  if cfg.encoder_norm or not cfg.trim_padding:
    problems.append("needs model.encoder_norm=False and trim_padding=True")
  if abs(cfg.audio.window_seconds * MEL_FRAMES_PER_SECOND - 2 * w.max_positions) > 1e-6:
    problems.append(f"needs windows of 2 x whisper.max_positions mel frames ({w.max_positions / 50:g} s), "
                    f"the model uses {cfg.audio.window_seconds:g} s")
  if mlp.num_layers != fam.projector_layers:
    problems.append(f"needs a {fam.projector_layers}-layer projector, the model has {mlp.num_layers}")
  elif fam.projector_layers > 1 and mlp.width != mlp.out_dim:
    problems.append(f"needs projector hidden width == LLM width {mlp.out_dim}, the model has {mlp.width}")
  if family == "qwen2-audio" and not mlp.use_bias:
    problems.append("needs a projector with bias")
  if cfg.audio_token_id < 0:
    problems.append("needs model.audio_token_id set (it is -1)")
  if (cfg.rotary_time is not None) != fam.rotary_time:
    problems.append(f"needs model.rotary_time {'set' if fam.rotary_time else 'None'}")
  if cfg.clip_embeddings:
    problems.append("needs model.clip_embeddings=0 (the family has no clip-number vectors)")
  return problems


def family_of(cfg: ALMConfig, template: str | None = None, hf: Mapping[str, Any] | None = None) -> str:
  """The family to export `cfg` as: the imported one, else the chat template's, else the projector's depth."""
  if hf and hf.get("family") in FAMILIES:
    return hf["family"]
  if template in FAMILIES:
    return template
  if cfg.whisper is not None and cfg.whisper.chunk_frames:
    return OMNI
  if cfg.bridge.kind == "mlp":
    for family in FAMILIES.values():
      if cfg.bridge.mlp.num_layers == family.projector_layers and (cfg.rotary_time is not None) == family.rotary_time:
        return family.name
  return "qwen2-audio"


def alm_config_to_hf(cfg: ALMConfig, family: str, *, base: Mapping[str, Any] | None = None,
                     source: str = "<model>") -> dict[str, Any]:
  """The HF `config.json` dict for `cfg` (float32, separate `lm_head`); keys of `base` we do not set are kept.

  Raises `CheckpointError` naming `source` when the family cannot represent the model.
  """
  if family == OMNI:
    return hf_omni.alm_config_to_hf(cfg, base=base, source=source)
  problems = exportable_problems(cfg, family)
  if problems:
    raise CheckpointError(f"{source}: cannot export as {family}: {'; '.join(problems)}")
  fam = FAMILIES[family]
  w, mlp = cfg.whisper, cfg.bridge.mlp
  audio = {"model_type": fam.encoder_type, "num_mel_bins": w.n_mels, "max_source_positions": w.max_positions,
           "activation_function": w.activation, "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
           "activation_dropout": 0.0}
  audio.update(zip(fam.encoder_keys, (w.d_model, w.num_layers, w.num_heads, w.ffn_dim)))
  try:
    text = hf_llm.llm_config_to_hf(cfg.llm)
  except ConfigError as e:
    raise _config_error(e, source) from None
  text.pop("architectures", None)
  text.pop("torch_dtype", None)
  text["tie_word_embeddings"] = False  # neither HF class ties; the head is written out
  out = dict(base or {}) if (base or {}).get("model_type") == fam.model_type else {}
  out.pop("torch_dtype", None)
  out.update(architectures=[fam.architecture], model_type=fam.model_type, audio_config=audio, text_config=text,
             dtype="float32")
  out[fam.token_key] = cfg.audio_token_id
  if fam.projector == "af3":
    out.update(projector_hidden_act=mlp.act, projector_bias=mlp.use_bias)
  if fam.rotary_time:
    out.update(hf_musicflamingo.rotary_to_hf(cfg.rotary_time, base or {}))
  return out


# ---------------------------------------------------------------------------
# Name maps.


def llm_rules(cfg: LLMConfig, prefixes: Mapping[str, str]) -> list[Rule]:
  """The decoder's rules under a folder's `llm` and `lm_head` prefixes (`LAYOUTS`, or a whole model's)."""
  rules = []
  for rule in hf_llm.hf_name_map(cfg).rules:
    theirs = rule.theirs
    if theirs.startswith("model."):
      theirs = prefixes["llm"] + theirs[len("model."):]
    elif theirs.startswith("lm_head."):
      theirs = prefixes["lm_head"] + theirs[len("lm_head."):]
    rules.append(Rule("llm/" + rule.ours, theirs, rule.transform))
  return rules


def name_map(cfg: ALMConfig, family: str, layout: str = "legacy") -> NameMap:
  """Our `AudioLanguageModel` paths ↔ the family's tensor names (`legacy`: as `save_pretrained` writes them)."""
  fam, prefixes = FAMILIES[family], LAYOUTS[layout]
  encoder = whisper_ckpt.HF_ENCODER.prefixed("encoder/whisper/", prefixes["encoder"])
  projector = projector_name_map(fam.projector, prefixes["projector"]).prefixed("bridge/mlp/")
  llm = NameMap("llm", llm_rules(cfg.llm, LAYOUTS[layout]))
  return NameMap.combine(family, [encoder, projector, llm], ignore=[r"\.rotary_emb\.inv_freq$"])


def detect_layout(names: Any) -> str:
  """`legacy` or `modern`, from where the language model's embedding lives."""
  names = set(names)
  for layout, prefixes in LAYOUTS.items():
    if prefixes["llm"] + "embed_tokens.weight" in names:
      return layout
  return "legacy"


# ---------------------------------------------------------------------------
# Reading.


def tensor_shapes(folder: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """`{name: (file, shape)}` of a safetensors folder, read from the file headers only."""
  index = os.path.join(folder, INDEX_NAME)
  if os.path.isfile(index):
    files = sorted(set(read_json(index).get("weight_map", {}).values()))
  elif os.path.isfile(os.path.join(folder, SINGLE_NAME)):
    files = [SINGLE_NAME]
  else:
    raise CheckpointError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}")
  out = {}
  for filename in files:
    path = os.path.join(folder, filename)
    try:
      with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    out.update({k: (filename, tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
  return out


def check_shapes(targets: Mapping[str, Any], names: NameMap, shapes: Mapping[str, tuple[str, tuple[int, ...]]],
                 folder: str) -> None:
  """Raises one `CheckpointError` naming file and key of every tensor whose stored shape is not the one we need.

  Shapes are compared in the checkpoint's own layout (our shape put through
  the rule's `to_theirs`, traced abstractly), so a transposed or reshaped
  tensor of the right size cannot slip through.
  """
  problems = []
  for path, entry in mapping.layer_view(targets).items():
    mapped = names.theirs_for(path)
    if mapped is None or mapped[0] not in shapes:
      continue  # reported by import_params
    name, transform = mapped
    want = tuple(jax.eval_shape(transform.to_theirs, jax.ShapeDtypeStruct(entry.shape, np.float32)).shape)
    filename, have = shapes[name]
    if have != want:
      problems.append(f"{filename}: tensor {name} has shape {have}, expected {want} (for {path})")
  if problems:
    shown = "; ".join(problems[:4]) + (f"; ... and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise CheckpointError(f"{folder}: {len(problems)} tensor(s) of the wrong shape: {shown}")


def processor_windows(folder: str) -> int | None:
  """Windows per clip the folder's processor allows (`max_audio_len / chunk_length`, AF3), if it says."""
  path = os.path.join(folder, "processor_config.json")
  if not os.path.isfile(path):
    return None
  processor = read_json(path)
  seconds = processor.get("max_audio_len")
  chunk = (processor.get("feature_extractor") or {}).get("chunk_length", 30)
  return int(seconds // chunk) if isinstance(seconds, (int, float)) and chunk else None


@dataclasses.dataclass
class ImportedALM:
  """The result of `import_alm`: our config, flat params and what export needs."""

  config: ALMConfig
  family: str
  params: dict[str, Any]
  hf_config: dict[str, Any]
  layout: str


def model_layout(cfg: ALMConfig) -> ParamLayout:
  """The `ParamLayout` of our model for `cfg` (abstract; nothing allocated)."""
  return ParamLayout(lambda rngs: AudioLanguageModel(cfg, rngs=rngs))


def read_family(folder: str, family: str = "auto") -> tuple[str, dict[str, Any]]:
  """(family, config.json dict) of a folder; an explicit `family` must match what the config says."""
  path = os.path.join(folder, "config.json")
  config = read_json(path)
  detected = detect_family(config, path)
  if family not in ("auto", detected):
    what = config.get("architectures") or config.get("model_type")
    raise CheckpointError(f"{path}: holds a {detected} model ({what}), not {family}")
  return detected, config


def import_alm(folder: str, family: str = "auto", *, make_place: Callable[[ParamLayout], Place] | None = None,
               max_windows: int | None = None) -> ImportedALM:
  """Reads a Qwen2-Audio / AF3 folder tensor by tensor into our flat params.

  `make_place(layout)` may return a `place(path, array)` that puts each
  tensor on devices as it is read (default: float32 numpy). Wrong family,
  wrong shapes, missing or unexpected tensors raise one `CheckpointError`
  naming the file and key.
  """
  family, config = read_family(folder, family)
  if family not in FAMILIES:
    raise CheckpointError(f"{folder}/config.json: a single {family} tower, not an audio-language model "
                          "(use import_tower)")
  if family == OMNI:
    return hf_omni.import_omni(folder, config, make_place=make_place, default_windows=FAMILIES[OMNI].max_windows,
                               max_windows=max_windows or processor_windows(folder))
  shapes = tensor_shapes(folder)
  names_layout = detect_layout(shapes)
  max_windows = max_windows or processor_windows(folder)
  has_head = LAYOUTS[names_layout]["lm_head"] + "weight" in shapes
  cfg = alm_config_from_hf(config, family, source=f"{folder}/config.json", has_lm_head=has_head,
                           max_windows=max_windows)
  params_layout = model_layout(cfg)
  names = name_map(cfg, family, names_layout)
  check_shapes(params_layout.abstract, names, shapes, folder)
  place = make_place(params_layout) if make_place is not None else None
  params = mapping.import_params(params_layout.abstract, names, hf_llm.WideningReader(folder), place=place)
  return ImportedALM(cfg, family, params, config, names_layout)


# ---------------------------------------------------------------------------
# Writing.


def merged_params(cfg: ALMConfig, params: Mapping[str, Any]) -> dict[str, Any]:
  """Our flat params for export: LoRA adapters folded into their kernels, a tied head written out."""
  out = {p: v for p, v in params.items() if not p.endswith(("/lora_a", "/lora_b"))}
  if len(out) != len(params):
    model = model_layout(cfg).model(params)
    out.update({"llm/" + p: v for p, v in hf_llm.export_arrays(model.llm).items()})
  if cfg.llm.tie_embeddings:
    out["llm/lm_head/kernel"] = np.asarray(jax.device_get(params["llm/embed/embedding"])).T
  return out


def _untie(cfg: ALMConfig) -> ALMConfig:
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_embeddings=False, lora_rank=0))


def _float32(items: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  for name, array in items:
    yield name, np.asarray(array, np.float32) if np.issubdtype(array.dtype, np.floating) else array


def export_alm(cfg: ALMConfig, params: Mapping[str, Any], folder: str, *, family: str | None = None,
               base_config: Mapping[str, Any] | None = None, side_files: str | None = None,
               tokenizer: str | None = None, max_shard_bytes: int = 2 * 1024**3, source: str = "<model>") -> list[str]:
  """Writes a HF folder `transformers` loads with `<Family>ForConditionalGeneration.from_pretrained`.

  config.json (from `cfg`, keeping other keys of the imported `base_config`),
  float32 safetensors (sharded with an index above `max_shard_bytes`), the
  side files found in `side_files` (tokenizer/processor configs, chat
  template, generation config) and `tokenizer` (a tokenizer.json). LoRA
  adapters are merged. Returns the weight files.
  """
  family = family or family_of(cfg)
  if family == OMNI:
    return hf_omni.export_omni(cfg, params, folder, base_config=base_config, side_files=side_files,
                               tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, source=source)
  hf_config = alm_config_to_hf(cfg, family, base=base_config, source=source)
  flat = merged_params(cfg, params)
  names = name_map(_untie(cfg), family, "legacy")
  return write_folder(folder, mapping.export_params(flat, names), hf_config, side_files=side_files,
                      tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def write_folder(folder: str, tensors: Iterator[tuple[str, np.ndarray]], hf_config: Mapping[str, Any], *,
                 side_files: str | None, tokenizer: str | None, max_shard_bytes: int) -> list[str]:
  """Writes an exported HF folder: float32 safetensors of `tensors`, the side files, config.json; the weight files."""
  os.makedirs(folder, exist_ok=True)
  files = write_safetensors(folder, _float32(tensors), max_shard_bytes=max_shard_bytes)
  if side_files and os.path.isdir(side_files):
    copy_side_files(side_files, folder, SIDE_FILES, skip=("config.json",))
  if tokenizer and os.path.isfile(tokenizer):
    copy_side_files(os.path.dirname(tokenizer), folder, (os.path.basename(tokenizer),))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return files


# ---------------------------------------------------------------------------
# Single towers (a bare Qwen2/Qwen3/Llama or Whisper folder).


def import_tower(folder: str, family: str = "auto", *, place: Place | None = None) -> tuple[str, Any, dict, dict]:
  """(family, tower config, flat params under `llm/` or `encoder/whisper/`, extra metadata) of a tower folder."""
  family, _ = read_family(folder, family)
  if family in FAMILIES:
    raise CheckpointError(f"{folder}/config.json: a whole {family} model, not a single tower (use import_alm)")
  if family == "whisper":
    prefix = whisper_ckpt.find_encoder_prefix(tensor_shapes(folder), folder)
    cfg, state = whisper_ckpt.load_whisper_hf(folder, prefix=prefix)
    flat = {p: v.get_value() for p, v in mapping.flat_paths(state).items()}
    return family, cfg, {"encoder/whisper/" + p: v for p, v in flat.items()}, {"prefix": prefix}
  cfg = hf_llm.load_config(folder)
  params = hf_llm.load_params(folder, cfg, place=(lambda p, a: place("llm/" + p, a)) if place else None)
  return family, cfg, {"llm/" + p: v for p, v in params.items()}, {}


def export_tower(family: str, cfg: Any, params: Mapping[str, Any], folder: str, *, extra: Mapping[str, Any],
                 side_files: str | None = None, max_shard_bytes: int = 2 * 1024**3) -> list[str]:
  """Writes a tower imported by `import_tower` back as a HF folder."""
  if family == "whisper":
    flat = {p.removeprefix("encoder/whisper/"): v for p, v in params.items()}
    state = whisper_ckpt.fill_state(nnx.split(whisper_ckpt.abstract_model(cfg))[1], flat)
    files = whisper_ckpt.export_whisper_hf(cfg, state, folder, prefix=extra.get("prefix", "model.encoder."),
                                           max_shard_bytes=max_shard_bytes)
  else:
    flat = {p.removeprefix("llm/"): v for p, v in params.items()}
    graphdef, state = nnx.split(hf_llm.abstract_model(cfg))
    leaves = [(k, v.replace(flat["/".join(str(x) for x in k)])) for k, v in nnx.to_flat_state(state)]
    files = hf_llm.export_hf(nnx.merge(graphdef, nnx.from_flat_state(leaves)), folder,
                             max_shard_bytes=max_shard_bytes)
  if side_files and os.path.isdir(side_files):
    copy_side_files(side_files, folder, SIDE_FILES, skip=("config.json",))
  return files
