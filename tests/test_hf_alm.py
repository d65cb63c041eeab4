"""Released ALM checkpoints: small random `Qwen2AudioForConditionalGeneration` and
`AudioFlamingo3ForConditionalGeneration` models saved by transformers, imported with `alm-jax import-hf`,
give the same logits (one clip, two clips, a 45 s clip) and the same greedy generation; `export-hf` loads back
in transformers with the same logits; bad folders give one-line errors; `alm-jax generate` answers.

Everything runs on 30 s windows (the released encoder shape, 1500 positions); the models are tiny.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.numpy import load_file, save_file

from alm_jax.checkpoints import hf_alm
from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.cli import main as cli_main
from alm_jax.commands.export_hf import export_hf
from alm_jax.errors import CheckpointError
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt
from alm_jax.run_config import load_run_config
from helpers import REPO, alm_jax

SR = 16000
WINDOW = 30 * SR
REL = 1e-4  # the issue's tolerance: max error within 1e-4 of the logits' scale
VOCAB = 320
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

FAMILIES = {
    "qwen2-audio": dict(
        model=transformers.Qwen2AudioForConditionalGeneration, config=transformers.Qwen2AudioConfig,
        encoder=dict(model_type="qwen2_audio_encoder", d_model=64, encoder_layers=2, encoder_attention_heads=4,
                     encoder_ffn_dim=128),
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"),
        token="<|AUDIO|>", token_key="audio_token_index", mask_key="feature_attention_mask",
    ),
    "af3": dict(
        model=transformers.AudioFlamingo3ForConditionalGeneration, config=transformers.AudioFlamingo3Config,
        encoder=dict(model_type="audioflamingo3_encoder", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128),
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>"),
        token="<sound>", token_key="audio_token_id", mask_key="input_features_mask",
    ),
}

# name -> (clip seconds, prompt text)
PROMPTS = {
    "one clip": ((7.3,), "What can you hear?"),
    "two clips": ((4.1, 11.6), "Which clip is louder?"),
    "45 s clip": ((45.0,), "Describe the recording."),
}


# ---------------------------------------------------------------------------
# Reference models, tokenizer, audio.


def make_tokenizer(folder: str, specials: tuple[str, ...]) -> tokenizers.Tokenizer:
  """A byte-level BPE trained on a few sentences, the family's special tokens appended after it (as Qwen's are)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=290, initial_alphabet=alphabet, show_progress=False)
  corpus = ["What can you hear? Which clip is louder? Describe the recording.", "You are a helpful assistant.",
            "system user assistant Audio 1: 2: the a sound of music speech"] * 20
  tok.train_from_iterator(corpus, trainer)
  tok.add_special_tokens(list(specials))
  assert tok.get_vocab_size() <= VOCAB
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>")
  fast.save_pretrained(folder)  # tokenizer.json + tokenizer_config.json, as released folders carry
  return tok


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Weights of O(1) effect everywhere (the default init barely lets audio reach the logits)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if re.search(r"norm", name) else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed_positions" in name:
        continue  # the sinusoid table
      elif re.search(r"(q|k)_proj\.weight$", name):
        p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / p.shape[1] ** 0.5)
      else:
        fan_in = p.shape[0] if "embed_tokens" in name else p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def reference(family: str, folder: str, seed: int = 0, text_overrides: dict | None = None,
              encoder_overrides: dict | None = None):
  """A random float32 model of `family` saved in `folder` with its tokenizer; returns (model, tokenizer).
  The overrides change the decoder's / encoder's config (e.g. head counts a mesh axis divides)."""
  spec = FAMILIES[family]
  tok = make_tokenizer(folder, spec["specials"])
  text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=False)
  text.update(text_overrides or {})
  encoder = dict(spec["encoder"], num_mel_bins=128, max_source_positions=1500)
  encoder.update(encoder_overrides or {})
  config = spec["config"](audio_config=encoder, text_config=text, **{spec["token_key"]: tok.token_to_id(spec["token"])})
  torch.manual_seed(seed)
  model = spec["model"](config).eval()
  _randomize(model, seed)
  model.save_pretrained(folder)
  return model, tok


def clip(seconds: float, seed: int) -> np.ndarray:
  """Tones and noise on the int16 grid (so a 16-bit WAV of it reads back exactly)."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  x = 0.3 * np.sin(2 * np.pi * (220 + 80 * seed) * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2
  x += 0.05 * rng.normal(size=t.size) + 0.2 * np.sin(2 * np.pi * 1234 * t) * (t % 2 < 0.4)
  return (np.round(np.clip(x, -1, 1) * 2**15) / 2**15).astype(np.float32)


def clips_of(name: str) -> tuple[list[np.ndarray], str]:
  seconds, text = PROMPTS[name]
  return [clip(s, seed=i + 1) for i, s in enumerate(seconds)], text


def hf_inputs(family: str, tok: tokenizers.Tokenizer, clips: list[np.ndarray], text: str) -> dict:
  """What the reference processors produce, built by hand: features per 30 s window, masks, expanded prompt."""
  extractor = transformers.WhisperFeatureExtractor(feature_size=128)
  spec = FAMILIES[family]
  if family == "qwen2-audio":  # one window per clip; the processor truncates at 30 s
    windows, owner = [c[:WINDOW] for c in clips], list(range(len(clips)))
  else:  # AF3: 30 s windows, up to 20 per clip
    windows, owner = [], []
    for k, c in enumerate(clips):
      for start in range(0, min(c.size, 20 * WINDOW), WINDOW):
        windows.append(c[start:start + WINDOW])
        owner.append(k)
  feats = extractor(windows, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
  frames = feats["attention_mask"].sum(-1)
  counts = []
  for k in range(len(clips)):  # the processors' count: conv stride 2, then the pooling, over the clip's frames
    length = int(sum(f for f, o in zip(frames, owner) if o == k))
    counts.append(((length - 1) // 2 + 1 - 2) // 2 + 1)
  if family == "qwen2-audio":
    audio = "".join(f"Audio {k + 1}: <|audio_bos|>{'<|AUDIO|>' * n}<|audio_eos|>\n" for k, n in enumerate(counts))
  else:
    audio = "".join("<sound>" * n for n in counts)
  prompt = f"{SYSTEM}<|im_start|>user\n{audio}{text}<|im_end|>\n<|im_start|>assistant\n"
  ids = tok.encode(prompt, add_special_tokens=False).ids
  return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
          "input_features": torch.from_numpy(feats["input_features"]),
          spec["mask_key"]: torch.from_numpy(feats["attention_mask"]).long(), "counts": counts}


def hf_logits(model, inputs: dict) -> np.ndarray:
  with torch.inference_mode():
    return model(**{k: v for k, v in inputs.items() if k != "counts"}).logits[0].numpy()


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@dataclasses.dataclass
class Setup:
  """One family's reference model, its saved folder, the imported run directory and our generator."""

  family: str
  src: str
  run: str
  ref: torch.nn.Module
  tok: tokenizers.Tokenizer
  bundle: object
  generator: ALMGenerator
  cache: dict


def our_logits(setup: Setup, clips: list[np.ndarray], text: str) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, logits) of our imported model on the same prompt, through the batch contract."""
  batch = setup.generator.encode([user_prompt(text, clips)])
  n = int(batch["token_mask"][0].sum())
  if "forward" not in setup.cache:
    layout = setup.bundle.layout
    setup.cache["forward"] = jax.jit(lambda params, b: layout.model(params)(b))
  arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "example_id"}
  logits = setup.cache["forward"](setup.bundle.params, arrays)
  return batch["tokens"][0, :n], np.asarray(logits[0, :n])


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory) -> Setup:
  family = request.param
  root = tmp_path_factory.mktemp(family)
  src, run = str(root / "hf"), str(root / "run")
  ref, tok = reference(family, src, seed=1 if family == "af3" else 0)
  assert cli_main(["import-hf", src, run]) == 0  # family detected from config.json
  bundle = load_bundle(run)
  generator = ALMGenerator(bundle, max_new_tokens=32, batch_size=1, length_bucket=128)
  return Setup(family, src, run, ref, tok, bundle, generator, {})


# ---------------------------------------------------------------------------
# Parity.


def test_imported_config_and_run_directory(setup):
  cfg = setup.bundle.config
  assert setup.bundle.template == setup.family
  assert cfg.whisper.pool and cfg.whisper.mask_padding and cfg.trim_padding and cfg.encoders == ("whisper",)
  assert cfg.audio.window_seconds == 30.0 and cfg.audio.max_windows == {"qwen2-audio": 1, "af3": 20}[setup.family]
  assert cfg.bridge.kind == "mlp" and cfg.bridge.mlp.num_layers == {"qwen2-audio": 1, "af3": 2}[setup.family]
  assert cfg.audio_token_id == setup.tok.token_to_id(FAMILIES[setup.family]["token"]) == setup.bundle.tokenizer.audio_id
  assert not cfg.llm.tie_embeddings and cfg.llm.num_kv_heads == 2
  assert sorted(os.listdir(os.path.join(setup.run, "hf_files"))) == ["generation_config.json", "tokenizer.json",
                                                                      "tokenizer_config.json"]


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_match_transformers(setup, prompt):
  clips, text = clips_of(prompt)
  inputs = hf_inputs(setup.family, setup.tok, clips, text)
  ids, ours = our_logits(setup, clips, text)
  # Our tokenizer, template and audio_slots counts give exactly the reference prompt.
  assert ids.tolist() == inputs["input_ids"][0].tolist()
  if prompt == "45 s clip":
    assert inputs["input_features"].shape[0] == {"qwen2-audio": 1, "af3": 2}[setup.family]
    assert inputs["counts"] == [{"qwen2-audio": 750, "af3": 1125}[setup.family]]
  ref = hf_logits(setup.ref, inputs)
  err = max_rel_error(ours, ref)
  print(f"{setup.family} {prompt}: {len(ids)} tokens, max relative logits error {err:.2e}")
  assert err <= REL, f"max error {err:.3g} of the logits' scale"


def test_greedy_generation_matches_transformers(setup):
  clips, text = clips_of("one clip")
  inputs = hf_inputs(setup.family, setup.tok, clips, text)
  ours = setup.generator.generate_ids([user_prompt(text, clips)])[0]
  stops = setup.generator.stop_tokens
  with torch.inference_mode():
    out = setup.ref.generate(**{k: v for k, v in inputs.items() if k != "counts"}, max_new_tokens=32,
                             do_sample=False, eos_token_id=stops, pad_token_id=setup.tok.token_to_id("<|endoftext|>"))
  theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
  if theirs and theirs[-1] in stops:
    theirs = theirs[:-1]
  print(f"{setup.family}: generated {len(ours)} tokens")
  assert len(ours) >= 8 and ours == theirs
  setup.cache["generated"] = setup.tok.decode(theirs)


def test_export_loads_in_transformers_with_the_same_logits(setup, tmp_path):
  out = str(tmp_path / "export")
  assert cli_main(["export-hf", setup.run, out]) == 0
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(setup.src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name
  loaded = FAMILIES[setup.family]["model"].from_pretrained(out).eval()
  assert type(loaded) is type(setup.ref) and loaded.dtype == torch.float32
  assert loaded.config.to_dict()[FAMILIES[setup.family]["token_key"]] == setup.bundle.config.audio_token_id
  clips, text = clips_of("one clip")
  inputs = hf_inputs(setup.family, setup.tok, clips, text)
  _, ours = our_logits(setup, clips, text)
  err = max_rel_error(ours, hf_logits(loaded, inputs))
  print(f"{setup.family} export: max relative logits error {err:.2e}")
  assert err <= REL
  # The export names every tensor as save_pretrained does.
  ref_names = set(load_file(os.path.join(setup.src, "model.safetensors")))
  assert set(load_file(os.path.join(out, "model.safetensors"))) == ref_names


def test_export_merges_lora_and_shards(setup, tmp_path):
  """A LoRA-adapted model exports with the adapters folded in, across several shards."""
  if setup.family != "af3":
    pytest.skip("one family is enough")
  cfg = setup.bundle.config
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora_rank=2, lora_alpha=4.0,
                                                          lora_targets=("q", "v", "up")))
  layout = hf_alm.model_layout(cfg)
  rng = np.random.default_rng(0)
  adapters = {p: (rng.normal(size=a.shape) * 0.3).astype(np.float32) for p, a in layout.abstract.items()
              if p.endswith(("/lora_a", "/lora_b"))}
  assert len(adapters) == 2 * 3  # stacked: one leaf per projection holds every layer
  params = {**setup.bundle.params, **adapters}
  clips, text = clips_of("one clip")
  batch = setup.generator.encode([user_prompt(text, clips)])
  n = int(batch["token_mask"][0].sum())
  arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "example_id"}
  ours = np.asarray(jax.jit(lambda p, b: layout.model(p)(b))(params, arrays)[0, :n])
  out = str(tmp_path / "lora")
  files = hf_alm.export_alm(cfg, params, out, family="af3", max_shard_bytes=60_000)
  assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  loaded = transformers.AudioFlamingo3ForConditionalGeneration.from_pretrained(out).eval()
  inputs = hf_inputs("af3", setup.tok, clips, text)
  assert max_rel_error(ours, hf_logits(setup.ref, inputs)) > 1e-2  # the adapters matter
  err = max_rel_error(ours, hf_logits(loaded, inputs))
  print(f"af3 LoRA export: max relative logits error {err:.2e}")
  assert err <= REL


# ---------------------------------------------------------------------------
# Errors.


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(CheckpointError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_wrong_family_and_wrong_shape_are_one_line_errors(setup, tmp_path):
  # An explicit family that config.json contradicts.
  other = "af3" if setup.family == "qwen2-audio" else "qwen2-audio"
  message = _one_line_error(hf_alm.import_alm, setup.src, other)
  assert "config.json" in message and other in message
  # A config.json of a family we do not read.
  bad = str(tmp_path / "llava")
  os.makedirs(bad)
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}, f)
  message = _one_line_error(hf_alm.import_alm, bad)
  assert "config.json" in message and "llava" in message
  # A tensor of the wrong shape (the same size transposed would also be caught: shapes are compared as stored).
  broken = str(tmp_path / "broken")
  shutil.copytree(setup.src, broken)
  weights = load_file(os.path.join(broken, "model.safetensors"))
  key = "audio_tower.layers.1.fc1.weight"
  weights[key] = np.ascontiguousarray(weights[key].T)
  save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
  message = _one_line_error(hf_alm.import_alm, broken)
  assert "model.safetensors" in message and key in message and "(128, 64)" in message
  # The CLI prints it as one line and fails.
  assert cli_main(["import-hf", broken, str(tmp_path / "out")]) == 1


def test_tied_head_is_written_out_and_family_follows_the_model(setup, tmp_path):
  """Neither HF class ties its head: a tied model (e.g. trained on Qwen2.5-0.5B) exports the embedding as lm_head."""
  cfg = setup.bundle.config
  tied = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_embeddings=True))
  params = {p: v for p, v in setup.bundle.params.items() if p != "llm/lm_head/kernel"}
  out = str(tmp_path / "tied")
  hf_alm.export_alm(tied, params, out)  # family from the projector's depth
  weights = load_file(os.path.join(out, "model.safetensors"))
  np.testing.assert_array_equal(weights["language_model.lm_head.weight"],
                                weights["language_model.model.embed_tokens.weight"])
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == [FAMILIES[setup.family]["model"].__name__]
  assert config["text_config"]["tie_word_embeddings"] is False
  assert hf_alm.family_of(cfg) == setup.family  # a trained run without import metadata
  assert hf_alm.family_of(cfg, "af3", {"family": "qwen2-audio"}) == "qwen2-audio"


def test_export_refuses_models_the_family_cannot_hold(tmp_path):
  tiny = load_run_config(os.path.join(REPO, "configs", "tiny.py")).model  # BEATs + window Q-former
  message = _one_line_error(hf_alm.alm_config_to_hf, tiny, "qwen2-audio", source="tiny")
  assert "Q-former" in message or "qformer" in message
  with pytest.raises(CheckpointError, match="does not exist|no such checkpoint|no finalized"):
    export_hf(str(tmp_path / "missing"), str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# The command line.


def test_generate_command_answers_on_an_imported_checkpoint(setup, tmp_path):
  if setup.family != "qwen2-audio":
    pytest.skip("one family is enough for the subprocess")
  from alm_jax.audio.io import write_wav  # pylint: disable=import-outside-toplevel

  clips, text = clips_of("one clip")
  wav = str(tmp_path / "a.wav")
  write_wav(wav, clips[0])
  result = alm_jax("generate", "--ckpt", setup.run, "--audio", wav, "--prompt", text, "--max-new-tokens", "32")
  assert result.returncode == 0, result.stderr
  answer = result.stdout.strip()
  assert answer
  if "generated" in setup.cache:  # the same answer transformers gives (random weights: random text)
    assert answer == setup.cache["generated"].strip()


def test_released_recipes_validate_and_match_their_families():
  for name, family in (("qwen2_audio_7b", "qwen2-audio"), ("af3_7b", "af3")):
    for stage in ("projector", "audio", "lora", "full"):
      cfg = load_run_config(os.path.join(REPO, "configs", f"{name}.py:{stage}"))
      assert cfg.train.stage == stage and cfg.data.template == family
      hf = hf_alm.alm_config_to_hf(cfg.model, family)  # the recipe is exactly the released layout
      assert not hf_alm.exportable_problems(cfg.model, family)
      # Clip-number vectors (a training option of ours) have no place in the released layout.
      assert hf_alm.exportable_problems(dataclasses.replace(cfg.model, clip_embeddings=2), family) == [
          "needs model.clip_embeddings=0 (the family has no clip-number vectors)"]
      assert cfg.model.loss_chunk_tokens == 512  # 152k vocabularies: the loss in chunks by default
      # Training and target choices (remat, adapters, loss chunks, attention kernel) are not part of the layout.
      assert cfg.model.llm.attention == cfg.model.whisper.attention == "splash"
      assert hf_alm.alm_config_from_hf(hf, family, has_lm_head=True) == dataclasses.replace(
          cfg.model, llm=dataclasses.replace(cfg.model.llm, remat="none", lora_rank=0, lora_alpha=16.0,
                                              lora_targets=("q", "k", "v", "o"), eos_token_ids=(), attention="xla"),
          whisper=dataclasses.replace(cfg.model.whisper, remat="none", attention="xla"), loss_chunk_tokens=0)
  salmonn = load_run_config(os.path.join(REPO, "configs", "salmonn_7b.py"))
  assert salmonn.model.token_spec().bridge == "window_qformer" and salmonn.train.pretrained.beats
  assert salmonn.model.llm.lora_rank == 8 and salmonn.model.llm.lora_alpha == 32.0
  assert hf_alm.exportable_problems(salmonn.model, "qwen2-audio")
