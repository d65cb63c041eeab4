"""MusicFlamingo: a small random `MusicFlamingoForConditionalGeneration` saved by transformers, imported with
`alm-jax import-hf`, gives the same logits (one clip, two clips, a 45 s clip) and the same greedy generation;
`export-hf` loads back in transformers with the same logits; a partial or mislabelled folder gives a one-line
error; the 7B recipe is the released layout.

The rotary time embedding has no weights, so only outputs can show it is right: the rotation alone matches the
reference module over 40 windows (1200 s), and the reference without it misses our logits by far more than the
tolerance. Our `musicflamingo` template gives MusicFlamingoProcessor's ids. Tokenizer, audio and helpers come
from `test_hf_alm.py` (the AF3 / Qwen2-Audio parity tests); 30 s windows, tiny widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.models.musicflamingo import modeling_musicflamingo

from alm_jax.checkpoints import hf_alm
from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.cli import main as cli_main
from alm_jax.errors import CheckpointError
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt
from alm_jax.models import rotary_time
from alm_jax.run_config import load_run_config
from helpers import REPO
from test_hf_alm import REL, SR, SYSTEM, VOCAB, WINDOW, _randomize, clips_of, hf_logits, make_tokenizer, max_rel_error

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>")
MAX_WINDOWS = 40  # the processor's max_audio_len 1200 s over 30 s chunks


def reference(folder: str, seed: int = 2) -> tuple[torch.nn.Module, tokenizers.Tokenizer]:
  """A random float32 MusicFlamingo saved in `folder` with its tokenizer (the AF3 widths of test_hf_alm)."""
  tok = make_tokenizer(folder, SPECIALS)
  encoder = dict(model_type="audioflamingo3_encoder", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, num_mel_bins=128, max_source_positions=1500)
  text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
  config = transformers.MusicFlamingoConfig(
      audio_config=encoder, text_config=text, audio_token_id=tok.token_to_id("<sound>"),
      audio_bos_token_id=tok.token_to_id("<|sound_bos|>"), audio_eos_token_id=tok.token_to_id("<|sound_eos|>"))
  torch.manual_seed(seed)
  model = transformers.MusicFlamingoForConditionalGeneration(config).eval()
  _randomize(model, seed)
  model.save_pretrained(folder)
  return model, tok


def hf_inputs(tok: tokenizers.Tokenizer, clips: list[np.ndarray], text: str) -> dict:
  """What MusicFlamingoProcessor produces, by hand: 30 s windows (up to 40 per clip), each clip's
  `<sound>` run between `<|sound_bos|>` and `<|sound_eos|>`."""
  windows, owner = [], []
  for k, c in enumerate(clips):
    for start in range(0, min(c.size, MAX_WINDOWS * WINDOW), WINDOW):
      windows.append(c[start:start + WINDOW])
      owner.append(k)
  extractor = transformers.WhisperFeatureExtractor(feature_size=128)
  feats = extractor(windows, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
  frames = feats["attention_mask"].sum(-1)
  counts = []
  for k in range(len(clips)):  # conv stride 2, then the pooling, over all the clip's frames
    length = int(sum(f for f, o in zip(frames, owner) if o == k))
    counts.append(((length - 1) // 2 + 1 - 2) // 2 + 1)
  audio = "".join(f"<|sound_bos|>{'<sound>' * n}<|sound_eos|>" for n in counts)
  prompt = f"{SYSTEM}<|im_start|>user\n{audio}{text}<|im_end|>\n<|im_start|>assistant\n"
  ids = tok.encode(prompt, add_special_tokens=False).ids
  return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
          "input_features": torch.from_numpy(feats["input_features"]),
          "input_features_mask": torch.from_numpy(feats["attention_mask"]).long(), "counts": counts}


PROMPTS = ("one clip", "two clips", "45 s clip")


@dataclasses.dataclass
class Setup:
  """The reference model and its folder, the imported run, and our logits for every prompt (one batch)."""

  src: str
  run: str
  ref: torch.nn.Module
  tok: tokenizers.Tokenizer
  bundle: object
  generator: ALMGenerator
  ours: dict[str, tuple[np.ndarray, np.ndarray]]


def our_logits(bundle, prompts: dict[str, tuple[list[np.ndarray], str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (token ids, logits)} of our imported model, all prompts in one padded batch (one compile)."""
  names = list(prompts)
  generator = ALMGenerator(bundle, batch_size=len(names), length_bucket=128)
  batch = generator.encode([user_prompt(text, clips) for clips, text in prompts.values()])
  arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "example_id"}
  logits = np.asarray(jax.jit(lambda params, b: bundle.layout.model(params)(b))(bundle.params, arrays))
  out = {}
  for row, name in enumerate(names):
    n = int(batch["token_mask"][row].sum())
    out[name] = batch["tokens"][row, :n], logits[row, :n]
  return out


@pytest.fixture(scope="module")
def mf(tmp_path_factory) -> Setup:
  root = tmp_path_factory.mktemp("musicflamingo")
  src, run = str(root / "hf"), str(root / "run")
  ref, tok = reference(src)
  assert cli_main(["import-hf", src, run]) == 0  # family detected from config.json
  bundle = load_bundle(run)
  generator = ALMGenerator(bundle, max_new_tokens=32, batch_size=1, length_bucket=128)
  return Setup(src, run, ref, tok, bundle, generator, our_logits(bundle, {p: clips_of(p) for p in PROMPTS}))


# ---------------------------------------------------------------------------
# The time embedding alone.


def test_rotation_matches_the_reference_over_1200_s():
  """Our rotation of 40 windows of one clip (the longest the processor allows) against the reference module's."""
  width, frames, windows = 80, 750, MAX_WINDOWS
  config = transformers.MusicFlamingoConfig(audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=width),
                                            text_config=dict(model_type="qwen2"))
  embedding = modeling_musicflamingo.MusicFlamingoRotaryEmbedding(config)
  step = config.audio_frame_step * 4
  seconds = torch.arange(windows)[:, None] * frames * step + torch.arange(frames, dtype=torch.float32) * step
  cos, sin = embedding(seconds, seq_len=frames)
  x = torch.randn(windows, frames, width, generator=torch.Generator().manual_seed(0))
  want = modeling_musicflamingo.apply_rotary_time_emb(x, cos, sin).numpy()
  cfg = rotary_time.RotaryTimeConfig()
  assert cfg.rotated_channels(width) == cos.shape[-1] == 32 and cfg.rotated_channels(1280) == 512
  got = jax.jit(lambda v, c: rotary_time.apply(cfg, v, c))(x.numpy(), np.zeros((1, windows), np.int32))
  err = max_rel_error(np.asarray(got), want)
  print(f"rotary time embedding over {windows} windows: max relative error {err:.2e}")
  assert err <= 2e-6
  # Window indices restart per clip, also across a packed row's examples; padding slots (-1) are harmless.
  clip = np.array([[0, 0, 1, 2, 2, 2, -1, -1], [0, 0, 0, 1, -1, -1, -1, -1]])
  index = np.asarray(rotary_time.window_index(clip)).reshape(clip.shape)
  assert index[0, :6].tolist() == [0, 1, 0, 0, 1, 2] and index[1, :4].tolist() == [0, 1, 2, 0]


# ---------------------------------------------------------------------------
# Import and parity.


def test_template_ids_match_the_hf_processor(mf):
  """Our `musicflamingo` template and counts give MusicFlamingoProcessor's ids (a 35 s clip: two windows; the
  processor takes one clip per prompt)."""
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=mf.tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
  proc = transformers.MusicFlamingoProcessor(feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128),
                                             tokenizer=hf_tok)
  rng = np.random.default_rng(3)
  pcms = [rng.normal(0, 0.1, SR * 35 + 77).astype(np.float32)]
  prompt = f"{SYSTEM}<|im_start|>user\n<sound>What can you hear?<|im_end|>\n<|im_start|>assistant\n"
  want = proc(text=prompt, audio=pcms, sampling_rate=SR)["input_ids"][0].tolist()
  batch = mf.generator.encode([user_prompt("What can you hear?", pcms)])
  n = int(batch["token_mask"][0].sum())
  assert batch["tokens"][0, :n].tolist() == want


def test_imported_config(mf, tmp_path):
  cfg = mf.bundle.config
  assert mf.bundle.template == "musicflamingo" and mf.bundle.tokenizer.audio_id == mf.tok.token_to_id("<sound>")
  assert cfg.rotary_time is not None and (cfg.rotary_time.theta, cfg.rotary_time.fraction) == (1200.0, 0.2)
  assert cfg.rotary_time.rotated_channels(64) == 24  # int(64 * 0.2) = 12 → 6 frequencies, each on two pairs
  assert cfg.audio.max_windows == MAX_WINDOWS and cfg.bridge.mlp.num_layers == 2 and cfg.whisper.pool
  # The family named explicitly gives the same model; AF3 is refused in one line.
  assert cli_main(["import-hf", mf.src, str(tmp_path / "named"), "--family", "musicflamingo"]) == 0
  assert load_bundle(str(tmp_path / "named")).config == cfg
  with pytest.raises(CheckpointError) as info:
    hf_alm.import_alm(mf.src, "af3")
  assert "\n" not in str(info.value) and "musicflamingo" in str(info.value) and "config.json" in str(info.value)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(mf, prompt):
  clips, text = clips_of(prompt)
  inputs = hf_inputs(mf.tok, clips, text)
  ids, ours = mf.ours[prompt]
  assert ids.tolist() == inputs["input_ids"][0].tolist()  # template, sound bos/eos and counts as the processor
  if prompt == "45 s clip":
    assert inputs["input_features"].shape[0] == 2 and inputs["counts"] == [1125]
  ref = hf_logits(mf.ref, inputs)
  err = max_rel_error(ours, ref)
  print(f"musicflamingo {prompt}: {len(ids)} tokens, max relative logits error {err:.2e}")
  assert err <= REL, f"max error {err:.3g} of the logits' scale"


def test_the_time_embedding_matters(mf, monkeypatch):
  """The reference with its rotary time embedding left out misses our logits by far more than the tolerance,
  so a model that dropped it (or turned a window's frames by the wrong angles) could not pass."""
  clips, text = clips_of("45 s clip")
  monkeypatch.setattr(modeling_musicflamingo, "apply_rotary_time_emb", lambda hidden, cos, sin: hidden)
  err = max_rel_error(mf.ours["45 s clip"][1], hf_logits(mf.ref, hf_inputs(mf.tok, clips, text)))
  print(f"musicflamingo reference without its time embedding: max relative logits error {err:.2e}")
  assert err > 100 * REL


def test_greedy_generation_matches_transformers(mf):
  clips, text = clips_of("one clip")
  inputs = hf_inputs(mf.tok, clips, text)
  ours = mf.generator.generate_ids([user_prompt(text, clips)])[0]
  stops = mf.generator.stop_tokens
  with torch.inference_mode():
    out = mf.ref.generate(**{k: v for k, v in inputs.items() if k != "counts"}, max_new_tokens=32, do_sample=False,
                          eos_token_id=stops, pad_token_id=mf.tok.token_to_id("<|endoftext|>"))
  theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
  if theirs and theirs[-1] in stops:
    theirs = theirs[:-1]
  print(f"musicflamingo: generated {len(ours)} tokens")
  assert len(ours) >= 8 and ours == theirs


def test_export_loads_in_transformers_with_the_same_logits(mf, tmp_path):
  out = str(tmp_path / "export")
  assert cli_main(["export-hf", mf.run, out]) == 0
  loaded = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(out).eval()
  assert type(loaded) is type(mf.ref) and loaded.dtype == torch.float32
  for key in ("audio_token_id", "audio_bos_token_id", "audio_eos_token_id", "audio_frame_step", "rope_parameters"):
    assert getattr(loaded.config, key) == getattr(mf.ref.config, key), key
  clips, text = clips_of("45 s clip")
  err = max_rel_error(mf.ours["45 s clip"][1], hf_logits(loaded, hf_inputs(mf.tok, clips, text)))
  print(f"musicflamingo export: max relative logits error {err:.2e}")
  assert err <= REL
  assert set(load_file(os.path.join(out, "model.safetensors"))) == set(load_file(os.path.join(mf.src,
                                                                                              "model.safetensors")))
  # A model exported without the imported config.json still names the family and its keys.
  fresh = str(tmp_path / "fresh")
  hf_alm.export_alm(mf.bundle.config, mf.bundle.params, fresh)
  with open(os.path.join(fresh, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["MusicFlamingoForConditionalGeneration"]
  assert config["rope_parameters"]["partial_rotary_factor"] == 0.2 and config["audio_frame_step"] == 0.01


def test_partial_folder_is_a_one_line_error_naming_the_keys(mf, tmp_path):
  broken = str(tmp_path / "partial")
  shutil.copytree(mf.src, broken)
  weights = load_file(os.path.join(broken, "model.safetensors"))
  missing = "multi_modal_projector.linear_2.bias"
  del weights[missing]
  weights["model.pos_emb.inv_freq_extra"] = np.zeros(3, np.float32)
  save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError) as info:
    hf_alm.import_alm(broken)
  message = str(info.value)
  assert "\n" not in message and missing in message and "model.pos_emb.inv_freq_extra" in message
  # An unsupported rotary kind is refused before any weight is read.
  with open(os.path.join(broken, "config.json")) as f:
    config = json.load(f)
  config["rope_parameters"]["rope_type"] = "yarn"
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump(config, f)
  assert cli_main(["import-hf", broken, str(tmp_path / "out")]) == 1


def test_recipe_is_the_released_layout():
  for stage in ("projector", "audio", "lora", "full"):
    cfg = load_run_config(os.path.join(REPO, "configs", f"musicflamingo_7b.py:{stage}"))
    assert cfg.train.stage == stage and cfg.data.template == "musicflamingo"
    assert cfg.model.audio.max_windows == MAX_WINDOWS and hf_alm.family_of(cfg.model) == "musicflamingo"
    hf = hf_alm.alm_config_to_hf(cfg.model, "musicflamingo")
    assert hf_alm.alm_config_from_hf(hf, "musicflamingo", has_lm_head=True) == dataclasses.replace(
        cfg.model, llm=dataclasses.replace(cfg.model.llm, remat="none", lora_rank=0, lora_alpha=16.0,
                                            lora_targets=("q", "k", "v", "o"), eos_token_ids=(), attention="xla"),
        whisper=dataclasses.replace(cfg.model.whisper, remat="none", attention="xla"), loss_chunk_tokens=0)
    # Not an AF3 model, and an AF3 model is not a MusicFlamingo one.
    assert hf_alm.exportable_problems(cfg.model, "af3")
    assert hf_alm.exportable_problems(dataclasses.replace(cfg.model, rotary_time=None), "musicflamingo")
