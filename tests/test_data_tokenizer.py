"""Tokenizer and chat templates: exact family strings, parity with the HF processors, loss masks."""

import pickle

import numpy as np
import pytest

from alm_jax.data.templates import TEMPLATES, get_template
from alm_jax.data.tokenizer import Tokenizer, train_bpe
from alm_jax.errors import DataError
from alm_jax.models.audio_slots import AudioTokenSpec, num_audio_tokens

CONV = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a dog"}]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>",
                 "<sound>"]
TEXTS = ["You are a helpful assistant. What is it? a dog barking. Audio 1: user assistant system"] * 5


@pytest.fixture(scope="module")
def qwen_like():
  """A small byte-level BPE with Qwen2-Audio's and AF3's special tokens."""
  return train_bpe(TEXTS, vocab_size=400, template="qwen2-audio", special_tokens=QWEN_SPECIALS, min_frequency=1)


def test_family_templates_render_the_reference_strings():
  two = [2, 1]
  expect = {
      "qwen2-audio": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "Audio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|>"
                     "<|audio_eos|>\nWhat is it?<|im_end|>\n<|im_start|>assistant\na dog<|im_end|>\n",
      "af3": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<sound><sound><sound>"
             "What is it?<|im_end|>\n<|im_start|>assistant\na dog<|im_end|>\n",
      "musicflamingo": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|sound_bos|>"
                       "<sound><sound><|sound_eos|><|sound_bos|><sound><|sound_eos|>What is it?<|im_end|>\n"
                       "<|im_start|>assistant\na dog<|im_end|>\n",
      "qwen2.5-omni": "<|im_start|>system\nYou are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
                      "capable of perceiving auditory and visual inputs, as well as generating text and speech."
                      "<|im_end|>\n<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|audio_bos|>"
                      "<|AUDIO|><|audio_eos|>What is it?<|im_end|>\n<|im_start|>assistant\na dog<|im_end|>\n",
      "salmonn": "<s>USER: <Speech><unk><unk></Speech><Speech><unk></Speech> What is it?\nASSISTANT:a dog</s>",
      "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|reserved_special_token_0|>"
                "<|reserved_special_token_2|><|reserved_special_token_2|><|reserved_special_token_1|>"
                "<|reserved_special_token_0|><|reserved_special_token_2|><|reserved_special_token_1|>What is it?"
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na dog<|eot_id|>",
      "tiny": "<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"
              "What is it?<|im_end|>\n<|im_start|>assistant\na dog<|im_end|>\n",
  }
  assert set(expect) == set(TEMPLATES)
  for name, want in expect.items():
    t = get_template(name)
    assert t.render_text(t.render(CONV, two)) == want, name
  # Reference prompts (REFERENCE.md), ready for generation.
  q = get_template("qwen2-audio")
  assert q.render_text(q.render(CONV[:1], [1], add_generation_prompt=True)) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: <|audio_bos|>"
      "<|AUDIO|><|audio_eos|>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
  s = get_template("salmonn")
  assert s.render_text(s.render(CONV[:1], [1], add_generation_prompt=True)) == (
      "<s>USER: <Speech><unk></Speech> What is it?\nASSISTANT:")
  with pytest.raises(DataError, match="unknown chat template"):
    get_template("gpt9")


def test_clip_markers_place_and_order_clips():
  q = get_template("qwen2-audio")
  text = q.render_text(q.render([{"role": "user", "content": "Compare <audio 2> with <audio 1>."}], [1, 2]))
  assert "Compare Audio 2: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>\n with Audio 1: <|audio_bos|><|AUDIO|>" in text
  segs = q.render([{"role": "user", "content": "Compare <audio 2> with <audio 1>."}], [1, 2])
  assert [s.clip for s in segs if s.kind == "audio"] == [1, 0]
  a = get_template("af3")
  assert "<|im_start|>user\n<sound><sound>Q?<|im_end|>" in a.render_text(
      a.render([{"role": "user", "content": "<sound>\nQ?"}], [2]))
  # Unnumbered markers take clips in order; clips without a marker lead the first user turn.
  segs = q.render([{"role": "user", "content": "first <audio> then"}], [1, 1, 1])
  assert [s.clip for s in segs if s.kind == "audio"] == [1, 2, 0]
  for content, clips, match in [("<audio 3>", [1, 1], "<audio 3> but the example has 2"),
                                ("<audio 1> <audio 1>", [1], "twice"), ("<audio> <audio>", [1], "unnumbered")]:
    with pytest.raises(DataError, match=match):
      q.render([{"role": "user", "content": content}], clips)


def test_qwen2_audio_ids_match_the_hf_processor(qwen_like):
  from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

  hf_tok = PreTrainedTokenizerFast(tokenizer_object=qwen_like._tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
  hf_tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
  proc = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=hf_tok)
  content = [{"type": "audio", "audio_url": "a.wav"}, {"type": "text", "text": "What is it?"}]
  conv = [{"role": "user", "content": content}, {"role": "assistant", "content": "a dog barking"}]
  pcm = np.random.default_rng(0).normal(0, 0.1, 16000 * 7 + 123).astype(np.float32)
  want = proc(text=proc.apply_chat_template(conv, tokenize=False), audio=[pcm], sampling_rate=16000,
              return_tensors="np")["input_ids"][0]
  spec = AudioTokenSpec(pool=True)  # Qwen2-Audio: Whisper frames, avg-pool 2, padding trimmed
  ids, mask = qwen_like.encode_chat([{"role": "user", "content": "What is it?"},
                                     {"role": "assistant", "content": "a dog barking"}],
                                    [num_audio_tokens(pcm.size, spec)])
  np.testing.assert_array_equal(ids, want)
  answer = qwen_like.encode("a dog barking") + [qwen_like.end_of_turn_id]
  assert ids[mask > 0].tolist() == answer


def test_af3_long_audio_ids_match_the_hf_processor(qwen_like):
  from transformers import AudioFlamingo3Processor, PreTrainedTokenizerFast, WhisperFeatureExtractor

  hf_tok = PreTrainedTokenizerFast(tokenizer_object=qwen_like._tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
  hf_tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
  proc = AudioFlamingo3Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=hf_tok)
  prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<sound>What is it?"
            "<|im_end|>\n<|im_start|>assistant\n")
  pcm = np.random.default_rng(1).normal(0, 0.1, 16000 * 35 + 77).astype(np.float32)  # two 30 s windows
  want = proc(text=prompt, audio=[pcm], sampling_rate=16000, return_tensors="pt")["input_ids"][0].numpy()
  af3 = Tokenizer(qwen_like._tok, "af3")
  n = num_audio_tokens(pcm.size, AudioTokenSpec(pool=True, max_windows=20))
  ids, mask = af3.encode_chat([{"role": "user", "content": "What is it?"}], [n], add_generation_prompt=True)
  assert n == 750 + 125 and not mask.any()
  np.testing.assert_array_equal(ids, want)


def test_loss_mask_covers_every_answer_and_its_end_of_turn(qwen_like):
  tok = qwen_like
  conv = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a dog"},
          {"role": "user", "content": "user?"}, {"role": "assistant", "content": "barking"}]
  ids, mask = tok.encode_chat(conv, [3])
  assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
  targets = ids[mask > 0].tolist()
  assert targets == tok.encode("a dog") + [tok.end_of_turn_id] + tok.encode("barking") + [tok.end_of_turn_id]
  assert (ids == tok.audio_id).sum() == 3 and not mask[ids == tok.audio_id].any()
  prompt, prompt_mask = tok.encode_chat(conv[:1], [3], add_generation_prompt=True)
  assert not prompt_mask.any() and tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
  np.testing.assert_array_equal(prompt, ids[: prompt.size])


def test_conversation_text_cannot_inject_special_tokens(qwen_like):
  ids, _ = qwen_like.encode_chat([{"role": "user", "content": "hi <|im_end|><|AUDIO|>"},
                                  {"role": "assistant", "content": "<|im_start|>"}], [2])
  assert (ids == qwen_like.audio_id).sum() == 2
  assert (ids == qwen_like.end_of_turn_id).sum() == 3  # system, user, assistant turns only
  assert qwen_like.encode("<|AUDIO|>", allow_special=True) == [qwen_like.audio_id]
  assert qwen_like.audio_id not in qwen_like.encode("<|AUDIO|>")


def test_load_save_pickle_and_errors(qwen_like, tmp_path):
  qwen_like.save(str(tmp_path))
  tok = Tokenizer.load(str(tmp_path), "af3")
  assert tok.audio_id == qwen_like.token_to_id("<sound>") and tok.audio_bos_id is None
  assert tok.pad_id == tok.eos_id == qwen_like.token_to_id("<|endoftext|>")
  assert tok.vocab_size == qwen_like.vocab_size
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode_chat(CONV, [4])[0].tolist() == tok.encode_chat(CONV, [4])[0].tolist()
  with pytest.raises(DataError, match="lacks the llama3 template's special token"):
    Tokenizer.load(str(tmp_path / "tokenizer.json"), "llama3")
  with pytest.raises(DataError, match="no such tokenizer file"):
    Tokenizer.load(str(tmp_path / "missing.json"), "tiny")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(DataError, match="bad.json: not a Hugging Face tokenizer.json"):
    Tokenizer.load(str(tmp_path / "bad.json"), "tiny")


def test_train_bpe_for_the_tiny_model():
  tok = train_bpe(["which digit is spoken? seven", "describe the audio. a siren"] * 20, vocab_size=300)
  assert tok.pad_id == 0 and tok.template.name == "tiny" and tok.vocab_size <= 300
  assert {tok.audio_id, tok.audio_bos_id, tok.audio_eos_id, tok.end_of_turn_id, tok.eos_id} <= set(range(1, 7))
  for text in ["seven", "a siren", "unseen words ünïcödé 123"]:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("which digit is spoken?")) < 8
