"""Qwen2.5-Omni thinker: a small random `Qwen2_5OmniThinkerForConditionalGeneration` saved by transformers,
imported with `alm-jax import-hf`, gives the same audio-tower outputs and logits (one clip, two clips, a 45 s
clip) and the same greedy generation; TMRoPE positions and tables match `get_rope_index` and the rotary module;
`export-hf` loads back with the same logits; a whole `Qwen2_5OmniForConditionalGeneration` folder imports its
thinker; bad folders give one-line errors; `alm-jax generate` answers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from alm_jax.checkpoints import hf_alm, hf_omni
from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.cli import main as cli_main
from alm_jax.data.templates import OMNI_SYSTEM
from alm_jax.errors import CheckpointError
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt
from alm_jax.models.llm import rope_tables
from alm_jax.run_config import load_run_config
from helpers import REPO
from test_hf_alm import _randomize, clip, make_tokenizer, max_rel_error

SR = 16000
WINDOW = 30 * SR
REL = 1e-4  # the tolerance: max error within 1e-4 of the reference's scale
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>",
            "<|VIDEO|>", "<|vision_bos|>")
SECTION = [2, 3, 3]  # mrope_section of the tiny decoder (head_dim 16 → 8 frequencies)
PROMPTS = {
    "one clip": ((7.31,), "What can you hear?"),  # 731 mel frames: an odd last chunk
    "two clips": ((4.1, 11.6), "Which clip is louder?"),
    "45 s clip": ((45.0,), "Describe the recording."),
}
GENERATE = ([clip(7.3, seed=1)], "What can you hear?")  # a prompt whose random-weight answer runs 24 tokens


def thinker_config(tok) -> transformers.Qwen2_5OmniThinkerConfig:
  audio = dict(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
               max_source_positions=1500, n_window=100, output_dim=64)
  text = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=SECTION))
  vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0])
  ids = {k: tok.token_to_id(t) for k, t in (("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|IMAGE|>"),
                                            ("video_token_index", "<|VIDEO|>"), ("audio_start_token_id", "<|audio_bos|>"),
                                            ("audio_end_token_id", "<|audio_eos|>"),
                                            ("vision_start_token_id", "<|vision_bos|>"))}
  return transformers.Qwen2_5OmniThinkerConfig(audio_config=audio, text_config=text, vision_config=vision, **ids)


def clips_of(name: str) -> tuple[list[np.ndarray], str]:
  seconds, text = PROMPTS[name]
  return [clip(s, seed=i + 1) for i, s in enumerate(seconds)], text


def hf_inputs(tok, clips: list[np.ndarray], text: str) -> dict:
  """The reference inputs built by hand: each clip's log-Mel (per 30 s window, as our front end computes it,
  windows joined in time), its frame mask, and the expanded prompt."""
  extractor = transformers.WhisperFeatureExtractor(feature_size=128)
  feats, masks = [], []
  for c in clips:
    windows = [c[s:s + WINDOW] for s in range(0, c.size, WINDOW)]
    out = extractor(windows, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
    feats.append(np.concatenate(list(out["input_features"]), axis=-1))
    masks.append(np.concatenate(list(out["attention_mask"]), axis=-1))
  width = max(f.shape[-1] for f in feats)
  features = np.stack([np.pad(f, ((0, 0), (0, width - f.shape[-1]))) for f in feats])
  mask = np.stack([np.pad(m, (0, width - m.size)) for m in masks])
  counts = [((int(m.sum()) - 1) // 2 + 1 - 2) // 2 + 1 for m in masks]
  audio = "".join(f"<|audio_bos|>{'<|AUDIO|>' * n}<|audio_eos|>" for n in counts)
  prompt = (f"<|im_start|>system\n{OMNI_SYSTEM}<|im_end|>\n<|im_start|>user\n{audio}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")
  ids = tok.encode(prompt, add_special_tokens=False).ids
  return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
          "input_features": torch.from_numpy(features), "feature_attention_mask": torch.from_numpy(mask).long(),
          "counts": counts}


def hf_logits(model, inputs: dict) -> np.ndarray:
  with torch.inference_mode():
    return model(**{k: v for k, v in inputs.items() if k != "counts"}).logits[0].numpy()


@dataclasses.dataclass
class Setup:
  src: str
  run: str
  ref: torch.nn.Module
  tok: object
  bundle: object
  generator: ALMGenerator
  cache: dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
  root = tmp_path_factory.mktemp("omni")
  src, run = str(root / "hf"), str(root / "run")
  tok = make_tokenizer(src, SPECIALS)
  torch.manual_seed(0)
  ref = transformers.Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(tok)).eval()
  _randomize(ref, 0)
  ref.save_pretrained(src)
  assert cli_main(["import-hf", src, run]) == 0  # family detected from config.json
  bundle = load_bundle(run)
  generator = ALMGenerator(bundle, max_new_tokens=24, batch_size=4, length_bucket=128)
  return Setup(src, run, ref, tok, bundle, generator, {})


def our_forward(setup: Setup, prompts: list[tuple[list[np.ndarray], str]]) -> list[tuple]:
  """Per prompt (token ids, logits, audio tokens in order) of our imported model, all prompts in one batch."""
  batch = setup.generator.encode([user_prompt(text, clips) for clips, text in prompts])
  if "forward" not in setup.cache:
    layout = setup.bundle.layout

    def forward(params, b):
      model = layout.model(params)
      tokens, valid = model.audio_tokens(b["audio"], b["audio_samples"], b["audio_clip"])
      return model(b), tokens, valid

    setup.cache["forward"] = jax.jit(forward)
  arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "example_id"}
  logits, tokens, valid = jax.device_get(setup.cache["forward"](setup.bundle.params, arrays))
  out = []
  for row in range(len(prompts)):
    n = int(batch["token_mask"][row].sum())
    out.append((batch["tokens"][row, :n], logits[row, :n], tokens[row][valid[row]]))
  return out


def prompt_outputs(setup: Setup) -> dict[str, tuple]:
  """`our_forward` of every prompt in PROMPTS, computed once (one compile)."""
  if "prompts" not in setup.cache:
    setup.cache["prompts"] = dict(zip(PROMPTS, our_forward(setup, [clips_of(name) for name in PROMPTS])))
  return setup.cache["prompts"]


# ---------------------------------------------------------------------------
# Parity.


def test_imported_config(setup):
  cfg = setup.bundle.config
  assert setup.bundle.template == "qwen2.5-omni"
  assert cfg.whisper.chunk_frames == 200 and cfg.whisper.pool and cfg.audio.window_seconds == 30.0
  assert cfg.bridge.mlp.num_layers == 1 and cfg.audio.max_windows == 20 and not cfg.llm.tie_embeddings
  assert cfg.audio_token_id == setup.tok.token_to_id("<|AUDIO|>") == setup.bundle.tokenizer.audio_id


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_audio_tower_and_logits_match_transformers(setup, prompt):
  clips, text = clips_of(prompt)
  inputs = hf_inputs(setup.tok, clips, text)
  ids, logits, audio = prompt_outputs(setup)[prompt]
  assert ids.tolist() == inputs["input_ids"][0].tolist()  # template, tokenizer and token counts agree
  if prompt == "45 s clip":
    assert inputs["counts"] == [1125]
  with torch.inference_mode():
    tower = setup.ref.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"]).last_hidden_state
  tower_err = max_rel_error(audio, tower.numpy())
  err = max_rel_error(logits, hf_logits(setup.ref, inputs))
  print(f"omni {prompt}: {audio.shape[0]} audio tokens, tower error {tower_err:.2e}; {len(ids)} tokens, "
        f"logits error {err:.2e}")
  assert tower_err <= REL and err <= REL


def test_rope_index_matches_get_rope_index(setup):
  """Audio-only and audio+text prompts (left padding in a batch of two): the reference's 3-D ids and deltas."""
  clips, text = clips_of("two clips")
  long = hf_inputs(setup.tok, clips, text)["input_ids"][0]
  short = hf_inputs(setup.tok, clips[:1], "")["input_ids"][0]  # audio only
  ids = torch.full((2, long.numel()), setup.tok.token_to_id("<|endoftext|>"))
  mask = torch.zeros_like(ids)
  ids[0], mask[0] = long, 1
  ids[1, -short.numel():], mask[1, -short.numel():] = short, 1
  lengths = torch.tensor([3000, 3000, 3000])
  theirs, deltas = setup.ref.model.get_rope_index(ids, attention_mask=mask, audio_seqlens=lengths)
  ours, our_deltas = hf_omni.rope_index(ids.numpy(), mask.numpy())
  np.testing.assert_array_equal(ours, theirs.numpy())
  np.testing.assert_array_equal(our_deltas, deltas.numpy())
  image = ids.numpy().copy()
  image[0, 3] = setup.tok.token_to_id("<|IMAGE|>")
  with pytest.raises(CheckpointError, match="image placeholders") as info:
    hf_omni.rope_index(image, mask.numpy(), image_token_id=setup.tok.token_to_id("<|IMAGE|>"))
  assert "\n" not in str(info.value)


def test_tmrope_decoder_matches_transformers(setup):
  """Distinct time/height/width ids (as vision tokens have): tables and decoder logits follow `mrope_section`."""
  llm_cfg = setup.bundle.config.llm
  assert llm_cfg.mrope_section == tuple(SECTION)
  text = setup.ref.model.language_model
  positions = torch.stack([torch.arange(40) * 3, torch.arange(40) % 7, 100 - torch.arange(40)])[:, None, :]
  cos, sin = text.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
  ours = rope_tables(llm_cfg, jax.numpy.asarray(positions.numpy()))
  np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=1e-6)
  ids = torch.arange(40)[None] * 7 % 290
  with torch.inference_mode():
    theirs = setup.ref.lm_head(text(input_ids=ids, position_ids=positions).last_hidden_state)[0].numpy()
  llm = setup.bundle.layout.model(setup.bundle.params).llm
  logits, _ = llm(jax.numpy.asarray(ids.numpy()), positions=jax.numpy.asarray(positions.numpy()))
  err = max_rel_error(np.asarray(logits[0]), theirs)
  print(f"omni TMRoPE decoder (3-D positions): max relative logits error {err:.2e}")
  assert err <= REL


def test_greedy_generation_matches_transformers(setup):
  clips, text = GENERATE
  inputs = hf_inputs(setup.tok, clips, text)
  ours = setup.generator.generate_ids([user_prompt(text, clips)])[0]
  stops = setup.generator.stop_tokens
  with torch.inference_mode():
    out = setup.ref.generate(**{k: v for k, v in inputs.items() if k != "counts"}, max_new_tokens=24,
                             do_sample=False, eos_token_id=stops, pad_token_id=setup.tok.token_to_id("<|endoftext|>"))
  theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
  if theirs and theirs[-1] in stops:
    theirs = theirs[:-1]
  print(f"omni: generated {len(ours)} tokens")
  assert len(ours) >= 8 and ours == theirs
  setup.cache["generated"] = setup.tok.decode(theirs)


def test_export_loads_in_transformers_with_the_same_logits(setup, tmp_path):
  out = str(tmp_path / "export")
  assert cli_main(["export-hf", setup.run, out]) == 0
  loaded = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).eval()
  assert loaded.dtype == torch.float32 and loaded.config.audio_token_id == setup.bundle.config.audio_token_id
  assert loaded.config.text_config.rope_parameters["mrope_section"] == SECTION
  clips, text = clips_of("two clips")
  _, ours, _ = prompt_outputs(setup)["two clips"]
  err = max_rel_error(ours, hf_logits(loaded, hf_inputs(setup.tok, clips, text)))
  print(f"omni export: max relative logits error {err:.2e}")
  assert err <= REL
  ref_names = {n for n in load_file(os.path.join(setup.src, "model.safetensors")) if not n.startswith("visual.")}
  assert set(load_file(os.path.join(out, "model.safetensors"))) == ref_names  # the vision tower is left out


def test_whole_model_folder_imports_its_thinker(setup, tmp_path, capsys):
  """A `Qwen2_5OmniForConditionalGeneration` folder: `thinker.` names; talker and token2wav skipped with a note."""
  whole = str(tmp_path / "whole")
  config = transformers.Qwen2_5OmniConfig(thinker_config=setup.ref.config.to_dict(), enable_audio_output=False)
  model = transformers.Qwen2_5OmniForConditionalGeneration(config)
  model.thinker.load_state_dict(setup.ref.state_dict())
  model.save_pretrained(whole)  # `thinker.` names
  weights = load_file(os.path.join(whole, "model.safetensors"))
  weights["talker.model.embed_tokens.weight"] = np.zeros((8, 4), np.float32)  # as a folder with audio output has
  weights["token2wav.code2wav_dit_model.proj.weight"] = np.zeros((4, 4), np.float32)
  save_file(weights, os.path.join(whole, "model.safetensors"), metadata={"format": "pt"})
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy2(os.path.join(setup.src, name), whole)
  capsys.readouterr()
  assert cli_main(["import-hf", whole, str(tmp_path / "run"), "--family", "qwen2.5-omni"]) == 0
  note = capsys.readouterr().out
  assert "skipped" in note and "talker" in note and "token2wav" in note and "vision" in note
  imported = load_bundle(str(tmp_path / "run"))
  assert imported.config == setup.bundle.config and imported.template == "qwen2.5-omni"
  for path, value in setup.bundle.params.items():
    np.testing.assert_array_equal(np.asarray(imported.params[path]), np.asarray(value), err_msg=path)


# ---------------------------------------------------------------------------
# Errors.


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(CheckpointError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_wrong_family_partial_folder_and_wrong_shape_are_one_line_errors(setup, tmp_path):
  message = _one_line_error(hf_alm.import_alm, setup.src, "af3")
  assert "config.json" in message and "af3" in message
  weights = load_file(os.path.join(setup.src, "model.safetensors"))
  partial = str(tmp_path / "partial")
  shutil.copytree(setup.src, partial)
  missing = "audio_tower.layers.1.fc2.weight"
  save_file({k: v for k, v in weights.items() if k not in (missing, "audio_tower.ln_post.bias")},
            os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
  message = _one_line_error(hf_alm.import_alm, partial)
  assert missing in message and "audio_tower.ln_post.bias" in message and "missing" in message
  broken = str(tmp_path / "broken")
  shutil.copytree(setup.src, broken)
  key = "audio_tower.proj.weight"
  save_file({**weights, key: np.zeros((64, 32), np.float32)}, os.path.join(broken, "model.safetensors"),
            metadata={"format": "pt"})
  message = _one_line_error(hf_alm.import_alm, broken)
  assert key in message and "(64, 32)" in message
  assert cli_main(["import-hf", broken, str(tmp_path / "out"), "--family", "qwen2.5-omni"]) == 1


# ---------------------------------------------------------------------------
# The command line and the recipe.


def test_generate_command_answers_on_an_imported_checkpoint(setup, tmp_path, capsys):
  from alm_jax.audio.io import write_wav  # pylint: disable=import-outside-toplevel

  clips, text = GENERATE
  wav = str(tmp_path / "a.wav")
  write_wav(wav, clips[0])
  capsys.readouterr()
  assert cli_main(["generate", "--ckpt", setup.run, "--audio", wav, "--prompt", text, "--max-new-tokens", "24"]) == 0
  answer = capsys.readouterr().out.strip()
  assert answer
  if "generated" in setup.cache:  # the same answer transformers gives (random weights: random text)
    assert answer == setup.cache["generated"].strip()


def test_recipe_validates_and_is_the_released_layout():
  for stage in ("projector", "lora", "full"):
    cfg = load_run_config(os.path.join(REPO, "configs", f"qwen2_5_omni_7b.py:{stage}"))
    assert cfg.train.stage == stage and cfg.data.template == "qwen2.5-omni"
    hf = hf_alm.alm_config_to_hf(cfg.model, "qwen2.5-omni")
    assert hf["audio_config"]["n_window"] == 100 and hf["text_config"]["rope_parameters"]["mrope_section"] == [16, 24, 24]
    assert cfg.model.llm.mrope_section == (16, 24, 24)
    back = hf_alm.alm_config_from_hf(hf, "qwen2.5-omni", has_lm_head=True)
    assert back == dataclasses.replace(
        cfg.model, llm=dataclasses.replace(cfg.model.llm, remat="none", lora_rank=0, lora_alpha=16.0,
                                            lora_targets=("q", "k", "v", "o"), eos_token_ids=(), attention="xla"),
        whisper=dataclasses.replace(cfg.model.whisper, remat="none", attention="xla"), loss_chunk_tokens=0)
