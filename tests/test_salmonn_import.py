"""`alm-jax import-salmonn`: a SALMONN release (its `.pth` of trainable parameters plus the Whisper, BEATs and
Llama towers) imported into a run directory gives the logits of SALMONN's forward pass.

The parts are tiny and random: a transformers Whisper encoder, the reference BEATs port (speechbrain's, as
tests/test_beats.py loads it) saved as an official `.pt`, a transformers `Blip2QFormerModel` saved under
SALMONN's LAVIS names, a `LlamaForCausalLM`, LoRA factors under peft names. The reference forward is
assembled here from those torch parts as SALMONN's `generate` does it: Whisper on the 30 s padded log-Mel →
ln_speech; BEATs on the unpadded clip → ln_audio → zero-padded to Whisper's length; channels concatenated;
17-frame windows through the Q-former (one query each); projection; the LLM with the LoRA deltas merged into
q_proj / v_proj, fed `<s>` + `USER: <Speech>` + audio + `</Speech> {q}\\nASSISTANT:`. Greedy generation through
`ALMGenerator` (what `alm-jax generate` runs) picks the reference's tokens. The test also shows that dropping
ln_audio, the LoRA deltas or the zero padding of BEATs changes the logits far beyond the tolerance, that older
peft names import the same, and that bad files are one-line errors naming the keys.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from alm_jax.audio import features
from alm_jax.checkpoints import salmonn_pth
from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.cli import main as cli_main
from alm_jax.commands.import_salmonn import import_salmonn
from alm_jax.errors import CheckpointError
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt
from test_beats import ITER3_CFG, _reference_module, _write_official_pt

SR = 16000
REL = 1e-4  # max error within 1e-4 of the logits' scale
WINDOW = 17  # Whisper frames per Q-former window (SALMONN: 0.333 s)
WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80,
               max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
               vocab_size=64, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)
BEATS = dict(ITER3_CFG, encoder_layers=2, finetuned_model=False)  # width 48
QFORMER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
               cross_attention_frequency=1, encoder_hidden_size=32 + 48, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
LLAMA = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
LORA_RANK, LORA_ALPHA = 8, 32.0
PEFT = "llama_model.base_model.model.model.layers"
CLIP_SECONDS = 7.3  # 728 fbank frames: not whole BEATs patches, and far from 30 s (BEATs zero padding matters)
QUESTION = "What can you hear?"


def _randomize(model: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
  """O(1)-effect random weights (norm scales around 1), so every part moves the logits."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in skip):
        continue
      if p.ndim == 1:
        base = 1.0 if "norm" in name.lower() else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p.shape[0] if "embed_tokens" in name else p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def _tokenizer(folder: str) -> tokenizers.Tokenizer:
  """A small BPE with Llama's `<unk>`=0, `<s>`=1, `</s>`=2, saved with its config as a Vicuna folder has it."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                           show_progress=False)
  tok.train_from_iterator(["USER: ASSISTANT: What can you hear? <Speech> </Speech> a dog barks"] * 20, trainer)
  assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>").save_pretrained(folder)
  return tok


def _lavis_name(hf_name: str) -> str:
  """A `Blip2QFormerModel` tensor name as SALMONN's LAVIS BERT (`speech_Qformer.bert.*`) names it."""
  name = hf_name.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                             ".crossattention.self.")
  name = name.replace("layernorm.", "embeddings.LayerNorm.", 1) if name.startswith("layernorm.") else name
  return "speech_Qformer.bert." + name


def _clip(seconds: float) -> np.ndarray:
  rng = np.random.default_rng(3)
  t = np.arange(int(seconds * SR)) / SR
  x = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 0.7 * t)) / 2 + 0.05 * rng.normal(size=t.size)
  return (np.round(np.clip(x, -1, 1) * 2**15) / 2**15).astype(np.float32)


def _build_release(root: str) -> dict:
  """Saves the towers and the `.pth`; returns the torch parts and the paths."""
  parts = {"root": root}
  torch.manual_seed(0)
  whisper = transformers.WhisperModel(transformers.WhisperConfig(**WHISPER)).eval()
  _randomize(whisper, 1, skip=("embed_positions",))
  parts["whisper_dir"] = os.path.join(root, "whisper")
  whisper.save_pretrained(parts["whisper_dir"])
  parts["whisper"] = whisper.encoder

  parts["beats_pt"] = os.path.join(root, "beats.pt")
  _write_official_pt(BEATS, parts["beats_pt"], seed=2)
  parts["beats"] = _reference_module().BEATs(ckp_path=parts["beats_pt"], freeze=True)

  qformer = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).eval()
  _randomize(qformer, 3)
  parts["qformer"] = qformer

  parts["llm_dir"] = os.path.join(root, "vicuna")
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  _randomize(llama, 4)
  llama.save_pretrained(parts["llm_dir"])
  parts["tok"] = _tokenizer(parts["llm_dir"])
  parts["llama"] = llama

  gen = torch.Generator().manual_seed(5)
  rand = lambda *shape, std=1.0: torch.randn(shape, generator=gen) * std  # noqa: E731
  model = {_lavis_name(k): v.clone() for k, v in qformer.state_dict().items()}
  model["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # a LAVIS buffer SALMONN keeps
  model["speech_query_tokens"] = rand(1, 1, QFORMER["hidden_size"], std=0.02)
  width = QFORMER["hidden_size"]
  model["speech_llama_proj.weight"] = rand(LLAMA["hidden_size"], width, std=width ** -0.5)
  model["speech_llama_proj.bias"] = rand(LLAMA["hidden_size"], std=0.2)
  for name, width in (("ln_speech", WHISPER["d_model"]), ("ln_audio", BEATS["encoder_embed_dim"])):
    model[f"{name}.weight"] = 1.0 + rand(width, std=0.3)
    model[f"{name}.bias"] = rand(width, std=0.3)
  hidden = LLAMA["hidden_size"]
  for i in range(LLAMA["num_hidden_layers"]):
    for proj in ("q_proj", "v_proj"):  # peft's default LoRA targets for Llama
      model[f"{PEFT}.{i}.self_attn.{proj}.lora_A.default.weight"] = rand(LORA_RANK, hidden, std=hidden ** -0.5)
      model[f"{PEFT}.{i}.self_attn.{proj}.lora_B.default.weight"] = rand(hidden, LORA_RANK, std=0.05)
  parts["model"] = model
  parts["pth"] = os.path.join(root, "salmonn.pth")
  torch.save({"model": model, "config": {"model": {"lora_alpha": LORA_ALPHA}}, "epoch": 3}, parts["pth"])
  return parts


def _reference_logits(parts: dict, clip: np.ndarray, ids_left: list[int], ids_right: list[int],
                      **switches: bool) -> np.ndarray:
  """SALMONN's logits on `clip` and the prompt."""
  llama, embeds = _reference_inputs(parts, clip, ids_left, ids_right, **switches)
  with torch.inference_mode():
    return llama(inputs_embeds=embeds).logits[0].numpy()


def _reference_inputs(parts: dict, clip: np.ndarray, ids_left: list[int], ids_right: list[int], *,
                      ln_audio: bool = True, lora: bool = True, pad_beats: bool = True):
  """(LLM with the LoRA deltas merged, its input embeddings): SALMONN's forward pass on `clip` from the torch
  parts; the switches break one detail each."""
  model = parts["model"]
  extractor = transformers.WhisperFeatureExtractor(feature_size=WHISPER["num_mel_bins"])
  mel = extractor(clip, sampling_rate=SR, return_tensors="pt").input_features  # padded to 30 s
  fbank = np.array(features.beats_fbank(jax.numpy.asarray(clip[None]), method="fft"))  # the unpadded clip
  beats = parts["beats"]
  beats.preprocess = lambda source, fbank_mean, fbank_std: torch.from_numpy(fbank)
  layer_norm = lambda x, name: torch.nn.functional.layer_norm(  # noqa: E731
      x, x.shape[-1:], model[f"{name}.weight"], model[f"{name}.bias"])
  with torch.inference_mode():
    speech = layer_norm(parts["whisper"](mel).last_hidden_state, "ln_speech")
    audio = beats.extract_features(torch.zeros(1, fbank.shape[1]), torch.ones(1))[0]
    audio = layer_norm(audio, "ln_audio") if ln_audio else audio
    length = speech.shape[1]
    if pad_beats:
      audio = torch.nn.functional.pad(audio, (0, 0, 0, length - audio.shape[1]))
    else:  # wrong on purpose: BEATs run on the padded 30 s window, its padding tokens kept
      fbank = np.array(features.beats_fbank(jax.numpy.asarray(np.pad(clip, (0, 30 * SR - clip.size))[None]),
                                              method="fft"))
      audio = layer_norm(beats.extract_features(torch.zeros(1, fbank.shape[1]), torch.ones(1))[0], "ln_audio")
      audio = torch.nn.functional.pad(audio, (0, 0, 0, length - audio.shape[1]))
    fused = torch.cat([speech, audio], dim=-1)
    count = length // WINDOW
    windows = fused[0, : count * WINDOW].reshape(count, WINDOW, fused.shape[-1])
    queries = model["speech_query_tokens"].expand(count, -1, -1)
    hidden = parts["qformer"](query_embeds=queries, encoder_hidden_states=windows,
                              encoder_attention_mask=torch.ones(count, WINDOW, dtype=torch.long)).last_hidden_state
    tokens = torch.nn.functional.linear(hidden, model["speech_llama_proj.weight"], model["speech_llama_proj.bias"])
    tokens = tokens.reshape(1, -1, tokens.shape[-1])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    llama.load_state_dict(parts["llama"].state_dict())
    if lora:
      for i, layer in enumerate(llama.model.layers):
        for proj in ("q_proj", "v_proj"):
          a = model[f"{PEFT}.{i}.self_attn.{proj}.lora_A.default.weight"]
          b = model[f"{PEFT}.{i}.self_attn.{proj}.lora_B.default.weight"]
          getattr(layer.self_attn, proj).weight += (LORA_ALPHA / LORA_RANK) * b @ a
    embed = llama.model.embed_tokens
    embeds = torch.cat([embed(torch.tensor([[1] + ids_left])), tokens, embed(torch.tensor([ids_right]))], dim=1)
  return llama, embeds


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
  root = str(tmp_path_factory.mktemp("salmonn"))
  parts = _build_release(root)
  parts["run"] = os.path.join(root, "run")
  assert cli_main(["import-salmonn", parts["pth"], "--whisper", parts["whisper_dir"], "--beats", parts["beats_pt"],
                   "--llm", parts["llm_dir"], parts["run"]]) == 0
  parts["bundle"] = load_bundle(parts["run"])
  parts["clip"] = _clip(CLIP_SECONDS)
  generator = ALMGenerator(parts["bundle"], max_new_tokens=8, batch_size=1, length_bucket=128)
  parts["generator"] = generator
  batch = generator.encode([user_prompt(QUESTION, [parts["clip"]])])
  n = int(batch["token_mask"][0].sum())
  layout = parts["bundle"].layout
  arrays = {k: jax.numpy.asarray(v) for k, v in batch.items() if k != "example_id"}
  logits = jax.jit(lambda p, b: layout.model(p)(b))(parts["bundle"].params, arrays)
  parts["ids"] = batch["tokens"][0, :n].tolist()
  parts["ours"] = np.asarray(logits[0, :n])
  start = parts["ids"].index(0)  # the audio slots (`<unk>`) split the prompt as SALMONN's `<SpeechHere>` does
  parts["left"], parts["right"] = parts["ids"][1:start], parts["ids"][start + 88:]
  return parts


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_imported_config(setup):
  cfg = setup["bundle"].config
  assert setup["bundle"].template == "salmonn" and cfg.audio_token_id == 0
  assert cfg.encoders == ("whisper", "beats") and cfg.fusion == "salmonn" and cfg.encoder_norm
  assert not cfg.trim_padding and not cfg.whisper.pool and not cfg.whisper.mask_padding
  q = cfg.bridge.qformer
  assert (q.mode, q.window, q.queries, q.num_layers, q.num_heads, q.cross_attention_frequency) == (
      "window", WINDOW, 1, 2, 2, 1)
  assert (q.hidden_size, q.intermediate_size, q.encoder_dim, q.llm_dim) == (128, 96, 80, 64)
  assert (cfg.llm.family, cfg.llm.lora_rank, cfg.llm.lora_alpha, cfg.llm.lora_targets) == ("llama", 8, 32.0,
                                                                                            ("q", "v"))


def test_logits_match_salmonn_reference(setup):
  # Our template and placeholder count give SALMONN's prompt text: <s>, left, 88 audio slots, right. (Ids are
  # encoded per template segment; SALMONN encodes each side whole, which BPE may merge differently.)
  tok = setup["tok"]
  assert setup["ids"] == [1] + setup["left"] + [0] * 88 + setup["right"]
  assert tok.decode(setup["left"]) == "USER: <Speech>"
  assert tok.decode(setup["right"]) == f"</Speech> {QUESTION}\nASSISTANT:"
  ref = _reference_logits(setup, setup["clip"], setup["left"], setup["right"])
  err = _rel(setup["ours"], ref)
  print(f"SALMONN import: {len(setup['ids'])} tokens, max relative logits error {err:.2e}")
  assert err <= REL, f"max error {err:.3g} of the logits' scale"
  setup["ref"] = ref


def test_greedy_generation_matches_reference(setup):
  """`generate`'s path (KV cache, LoRA adapters, the template's stops) picks SALMONN's greedy tokens."""
  ours = setup["generator"].generate_ids([user_prompt(QUESTION, [setup["clip"]])])[0]
  llama, embeds = _reference_inputs(setup, setup["clip"], setup["left"], setup["right"])
  theirs: list[int] = []
  with torch.inference_mode():
    while len(theirs) < 8:
      token = int(llama(inputs_embeds=embeds).logits[0, -1].argmax())
      if token == 2:  # </s>
        break
      theirs.append(token)
      embeds = torch.cat([embeds, llama.model.embed_tokens(torch.tensor([[token]]))], dim=1)
  assert len(ours) >= 4 and ours == theirs


def test_older_peft_names_import_the_same(setup, tmp_path):
  """peft before adapter names saved `lora_A.weight`; those import as `lora_A.default.weight`."""
  model = {k.replace(".default.weight", ".weight"): v for k, v in setup["model"].items()}
  path = str(tmp_path / "old.pth")
  torch.save({"model": model}, path)
  imported = salmonn_pth.import_salmonn(path, setup["whisper_dir"], setup["beats_pt"], setup["llm_dir"])
  adapters = [p for p in imported.params if p.endswith(("lora_a", "lora_b"))]
  assert len(adapters) == 4 and imported.config.llm.lora_alpha == 32.0  # stacked layers: q and v, A and B
  for path in adapters:
    np.testing.assert_array_equal(np.asarray(imported.params[path]), np.asarray(setup["bundle"].params[path]))


@pytest.mark.parametrize("broken", ["ln_audio", "lora", "pad_beats"])
def test_each_detail_moves_the_logits(setup, broken):
  """The parity check above would catch a missing ln_audio, dropped LoRA deltas or BEATs padding kept."""
  ref = _reference_logits(setup, setup["clip"], setup["left"], setup["right"], **{broken: False})
  err = _rel(setup["ours"], ref)
  print(f"without {broken}: max relative logits error {err:.2e}")
  assert err > 100 * REL


def _one_line_error(*args, **kwargs) -> str:
  with pytest.raises(CheckpointError) as info:
    import_salmonn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_bad_checkpoints_are_one_line_errors(setup, tmp_path):
  towers = dict(whisper=setup["whisper_dir"], beats=setup["beats_pt"], llm=setup["llm_dir"])
  model = dict(setup["model"])
  del model["speech_llama_proj.bias"]
  del model[f"{PEFT}.1.self_attn.v_proj.lora_B.default.weight"]
  model["ln_audio.weight"] = model["ln_audio.weight"][:-1]
  model["speech_Qformer.bert.encoder.layer.0.extra.weight"] = torch.zeros(2)
  bad = str(tmp_path / "bad.pth")
  torch.save({"model": model}, bad)
  message = _one_line_error(bad, str(tmp_path / "out1"), **towers)
  assert "4 mismatch(es)" in message
  for key in ("speech_llama_proj.bias: missing", f"{PEFT}.1.self_attn.v_proj.lora_B.default.weight: missing",
              "ln_audio.weight: shape (47,)", "speech_Qformer.bert.encoder.layer.0.extra.weight: unexpected"):
    assert key in message, key
  torch.save({"model": {"ln_speech.weight": torch.ones(32)}}, bad)
  message = _one_line_error(bad, str(tmp_path / "out2"), **towers)
  assert "not a SALMONN checkpoint" in message and "speech_query_tokens" in message
  torch.save({"state_dict": {}}, bad)
  assert "expected a dict with a 'model'" in _one_line_error(bad, str(tmp_path / "out3"), **towers)
  # The LLM tower must fit the projection.
  other = dict(setup["model"])
  other["speech_llama_proj.weight"] = other["speech_llama_proj.weight"][:32]
  torch.save({"model": other}, bad)
  assert "speech_llama_proj.weight maps to 32" in _one_line_error(bad, str(tmp_path / "out4"), **towers)
