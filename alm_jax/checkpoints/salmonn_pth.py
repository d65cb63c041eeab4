"""SALMONN's released checkpoint (`.pth`) plus its separately released towers → our model.

SALMONN saves only what it trains: `torch.save({"model": state_dict, ...})`
where `state_dict` keeps the trainable parameters (and the buffers) of its
`SALMONN` module:

* `speech_query_tokens` (1, queries, 768) and `speech_Qformer.bert.*`, the
  LAVIS BERT Q-former with the text-only parts removed (`embeddings.LayerNorm`,
  `encoder.layer.N.attention.self.*`, `.crossattention.self.*`,
  `.intermediate_query.dense`, `.output_query.*`; buffer `embeddings.position_ids`);
* `speech_llama_proj.{weight,bias}` (Q-former width → LLM width);
* `ln_speech.*` (Whisper frames) and `ln_audio.*` (BEATs tokens);
* the LLM's peft LoRA factors, e.g.
  `llama_model.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight`
  (older peft: without `.default`); peft's default targets for Llama are q and v.

Whisper (a Hugging Face folder), BEATs (an official `.pt`) and the LLM (a
Hugging Face Llama/Vicuna folder) come from their own files. The model shape
is read from the tensors: Q-former layers, width, feed-forward width, queries,
which layers cross-attend, LoRA rank and targets. What the tensors cannot
say takes SALMONN's values unless given: 64-wide Q-former heads (BERT), 17
frames per window (0.333 s of Whisper frames), LoRA alpha 32 (or the value
in the checkpoint's `config.model.lora_alpha`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from alm_jax.checkpoints import beats_pt, hf_llm, mapping
from alm_jax.checkpoints import whisper as whisper_ckpt
from alm_jax.checkpoints.mapping import LINEAR, LINEAR_IN2, NameMap, Rule
from alm_jax.checkpoints.qformer_hf import qformer_name_map
from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models import lora
from alm_jax.models.alm import ALMConfig, AudioConfig, AudioLanguageModel, BridgeConfig
from alm_jax.models.llm import LORA_TARGETS
from alm_jax.models.qformer import QFormerConfig
from alm_jax.params import ParamLayout

Place = Callable[[str, np.ndarray], Any]

PEFT_LAYERS = "llama_model.base_model.model.model.layers"
QFORMER = "speech_Qformer.bert"
DEFAULT_LORA_ALPHA = 32.0
DEFAULT_WINDOW = 17  # round(1500 frames · 0.333333 s / 30 s)
BERT_HEAD_DIM = 64
REQUIRED = ("speech_query_tokens", "speech_llama_proj.weight", "ln_speech.weight", "ln_audio.weight")

# Buffers and text-only Q-former parts a SALMONN state dict may hold that the audio path never uses.
IGNORED = (
    r"\.rotary_emb\.inv_freq$",
    rf"^{re.escape(QFORMER)}\.embeddings\.(position_ids|word_embeddings\.|position_embeddings\.)",
    rf"^{re.escape(QFORMER)}\.encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^speech_Qformer\.cls\.",
)

_LORA_KEY = re.compile(
    rf"^{re.escape(PEFT_LAYERS)}\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.lora_([AB])(\.default)?\.weight$")
_QFORMER_LAYER = re.compile(rf"^{re.escape(QFORMER)}\.encoder\.layer\.(\d+)\.")
_SHORT = {proj.split("/")[1].removesuffix("_proj"): short for short, proj in lora.PROJECTIONS.items()}


def _lora_rules() -> list[Rule]:
  """Our adapter leaves ↔ peft's `lora_A` (r, in) / `lora_B` (out, r) factors."""
  rules = []
  for short, proj in lora.PROJECTIONS.items():
    group, name = proj.split("/")
    theirs = f"{PEFT_LAYERS}.{{i}}.{'self_attn' if group == 'attn' else 'mlp'}.{name}"
    a_transform = LINEAR_IN2 if short == "o" else LINEAR  # o_proj's input is (heads, head_dim)
    rules.append(Rule(f"llm/layers/{{i}}/{proj}/lora_a", f"{theirs}.lora_A.default.weight", a_transform))
    rules.append(Rule(f"llm/layers/{{i}}/{proj}/lora_b", f"{theirs}.lora_B.default.weight", LINEAR))
  return rules


def name_map() -> NameMap:
  """Our `AudioLanguageModel` paths (bridge, encoder norms, LoRA) ↔ the names in SALMONN's `model` dict."""
  rules = [Rule("bridge/qformer/query_tokens", "speech_query_tokens")]
  rules += qformer_name_map("lavis").prefixed("bridge/qformer/qformer/", QFORMER + ".").rules
  rules += [Rule("bridge/qformer/proj/kernel", "speech_llama_proj.weight", LINEAR),
            Rule("bridge/qformer/proj/bias", "speech_llama_proj.bias")]
  for ours, theirs in (("encoder/whisper_norm", "ln_speech"), ("encoder/beats_norm", "ln_audio")):
    rules += [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]
  return NameMap("salmonn", rules + _lora_rules(), IGNORED)


class PeftReader:
  """A `TensorReader` over SALMONN's `model` dict that shows older peft names (`lora_A.weight`) as
  the adapter-named ones (`lora_A.default.weight`)."""

  def __init__(self, tensors: Mapping[str, Any], source: str):
    self._inner = mapping.DictReader(tensors, source)
    self.source = source
    self._names = {re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): k for k in tensors}

  def keys(self) -> Iterable[str]:
    return self._names.keys()

  def get(self, name: str) -> np.ndarray:
    return self._inner.get(self._names[name])


@dataclasses.dataclass(frozen=True)
class SalmonnShape:
  """What SALMONN's `model` dict says about the architecture."""

  queries: int
  hidden_size: int
  num_layers: int
  intermediate_size: int
  cross_attention_frequency: int
  encoder_dim: int
  llm_dim: int
  lora_rank: int
  lora_targets: tuple[str, ...]


def _shape(tensors: Mapping[str, Any], name: str) -> tuple[int, ...]:
  return tuple(int(d) for d in tensors[name].shape)


def read_shape(tensors: Mapping[str, Any], source: str) -> SalmonnShape:
  """The architecture read off the tensors' names and shapes; a missing part raises one `CheckpointError`."""
  missing = [k for k in REQUIRED if k not in tensors]
  layers = sorted({int(m.group(1)) for k in tensors if (m := _QFORMER_LAYER.match(k))})
  if not layers:
    missing.append(f"{QFORMER}.encoder.layer.*")
  if missing:
    raise CheckpointError(f"{source}: not a SALMONN checkpoint: 'model' lacks {', '.join(missing)}")
  cross = [i for i in layers if f"{QFORMER}.encoder.layer.{i}.crossattention.self.key.weight" in tensors]
  if not cross or cross[0] != 0:
    raise CheckpointError(f"{source}: {QFORMER}.encoder.layer.0.crossattention.self.key.weight missing "
                          "(the Q-former must cross-attend in layer 0)")
  frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
  if cross != list(range(0, len(layers), frequency)):
    raise CheckpointError(f"{source}: cross-attention in Q-former layers {cross} follows no fixed frequency")
  ffn = f"{QFORMER}.encoder.layer.0.intermediate_query.dense.weight"
  if ffn not in tensors:
    raise CheckpointError(f"{source}: not a SALMONN checkpoint: 'model' lacks {ffn}")
  adapters: dict[str, set[int]] = {}
  ranks = set()
  for key in tensors:
    m = _LORA_KEY.match(key)
    if m is None:
      continue
    proj = _SHORT.get(m.group(3))
    if proj is None:
      raise CheckpointError(f"{source}: {key}: LoRA on an unknown projection {m.group(3)}_proj")
    adapters.setdefault(proj, set()).add(int(m.group(1)))
    if m.group(4) == "A":
      ranks.add(_shape(tensors, key)[0])
  if len(ranks) > 1:
    raise CheckpointError(f"{source}: LoRA factors of different ranks {sorted(ranks)}")
  _, queries, hidden = _shape(tensors, "speech_query_tokens")
  return SalmonnShape(
      queries=queries, hidden_size=hidden, num_layers=len(layers),
      intermediate_size=_shape(tensors, ffn)[0], cross_attention_frequency=frequency,
      encoder_dim=_shape(tensors, f"{QFORMER}.encoder.layer.0.crossattention.self.key.weight")[1],
      llm_dim=_shape(tensors, "speech_llama_proj.weight")[0],
      lora_rank=ranks.pop() if ranks else 0,
      lora_targets=tuple(t for t in LORA_TARGETS if t in adapters),
  )


def read_pth(path: str, *, trust_pickle: bool = False) -> tuple[dict[str, Any], float | None]:
  """(`model` dict, LoRA alpha recorded in the checkpoint's `config.model`, if any) of a SALMONN `.pth`."""
  checkpoint = whisper_ckpt.read_torch_checkpoint(path, trust_pickle=trust_pickle)
  if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
    raise CheckpointError(f"{path}: not a SALMONN checkpoint (expected a dict with a 'model' state dict)")
  config = checkpoint.get("config")
  model_config = config.get("model") if isinstance(config, Mapping) else None
  alpha = model_config.get("lora_alpha") if isinstance(model_config, Mapping) else None
  return dict(checkpoint["model"]), (float(alpha) if isinstance(alpha, (int, float)) else None)


@dataclasses.dataclass
class ImportedSalmonn:
  """Our config and flat params for a SALMONN release."""

  config: ALMConfig
  params: dict[str, Any]
  shape: SalmonnShape


def salmonn_config(whisper: Any, beats: Any, llm: Any, shape: SalmonnShape, *, qformer_heads: int = 0,
                   window: int = DEFAULT_WINDOW) -> ALMConfig:
  """The `ALMConfig` SALMONN's forward pass is: Whisper + BEATs (patch tokens paired with frames), each
  LayerNorm'd, a window Q-former over every frame of one 30 s window, the LLM with its LoRA adapters."""
  heads = qformer_heads or max(1, shape.hidden_size // BERT_HEAD_DIM)
  qformer = QFormerConfig(
      mode="window", encoder_dim=shape.encoder_dim, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
      num_heads=heads, intermediate_size=shape.intermediate_size,
      cross_attention_frequency=shape.cross_attention_frequency, queries=shape.queries, window=window,
      llm_dim=shape.llm_dim)
  return ALMConfig(encoders=("whisper", "beats"), whisper=whisper, beats=beats, fusion="salmonn", encoder_norm=True,
                   trim_padding=False, bridge=BridgeConfig(kind="qformer", qformer=qformer), llm=llm,
                   audio=AudioConfig(sample_rate=16000, window_seconds=30.0, max_windows=1))


def import_salmonn(ckpt: str, whisper: str, beats: str, llm: str, *, lora_alpha: float | None = None,
                   qformer_heads: int = 0, window: int = DEFAULT_WINDOW, trust_pickle: bool = False,
                   make_place: Callable[[ParamLayout], Place] | None = None) -> ImportedSalmonn:
  """Reads a SALMONN `.pth` and its three towers into our flat params (see the module docstring).

  `make_place(layout)` may return a `place(path, array)` that puts each tensor on devices as it is read.
  Missing, unexpected or mis-shaped tensors of the `.pth` raise one `CheckpointError` naming them.
  """
  tensors, stored_alpha = read_pth(ckpt, trust_pickle=trust_pickle)
  shape = read_shape(tensors, ckpt)
  whisper_cfg, whisper_state = whisper_ckpt.load_whisper_hf(whisper)
  beats_cfg, beats_state = beats_pt.load_beats(beats, trust_pickle=trust_pickle)
  alpha = lora_alpha if lora_alpha is not None else stored_alpha if stored_alpha is not None else DEFAULT_LORA_ALPHA
  llm_cfg = hf_llm.load_config(llm, lora_rank=shape.lora_rank, lora_alpha=float(alpha),
                               lora_targets=shape.lora_targets or ("q", "v"))
  if whisper_cfg.d_model + beats_cfg.width != shape.encoder_dim:
    raise CheckpointError(f"{ckpt}: the Q-former reads {shape.encoder_dim} channels but Whisper ({whisper}) and "
                          f"BEATs ({beats}) give {whisper_cfg.d_model} + {beats_cfg.width}")
  if shape.llm_dim != llm_cfg.hidden_size:
    raise CheckpointError(f"{ckpt}: speech_llama_proj.weight maps to {shape.llm_dim} but the LLM ({llm}) is "
                          f"{llm_cfg.hidden_size} wide")
  try:
    cfg = salmonn_config(whisper_cfg, beats_cfg, llm_cfg, shape, qformer_heads=qformer_heads, window=window)
  except ConfigError as e:
    raise CheckpointError(f"{ckpt}: {e}") from None
  layout = ParamLayout(lambda rngs: AudioLanguageModel(cfg, rngs=rngs))
  place = make_place(layout) if make_place is not None else (lambda path, array: array)
  params: dict[str, Any] = {}
  for prefix, state in (("encoder/whisper/", whisper_state), ("encoder/beats/", beats_state)):
    for path, leaf in mapping.flat_paths(state).items():
      params[prefix + path] = place(prefix + path, np.asarray(leaf.get_value()))
  base = dataclasses.replace(llm_cfg, lora_rank=0)
  params.update({"llm/" + p: a for p, a in
                 hf_llm.load_params(llm, base, place=lambda p, a: place("llm/" + p, a)).items()})
  rest = {p: a for p, a in layout.abstract.items() if p not in params}
  params.update(mapping.import_params(rest, name_map(), PeftReader(tensors, ckpt), place=place))
  return ImportedSalmonn(cfg, params, shape)
