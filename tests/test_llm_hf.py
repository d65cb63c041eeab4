"""Hugging Face folders ↔ LLM: export (LoRA merged) loads in transformers with the same logits, sharded imports
stream tensor by tensor, tokenizer files travel along, and bad checkpoints give one-line errors naming the key."""

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from alm_jax.checkpoints import hf_llm
from alm_jax.errors import CheckpointError
from alm_jax.models import lora
from test_llm import FAMILIES, VOCAB, assert_logits_close, forward, padded_batch, reference, torch_logits


def save_tokenizer(folder):
  """A tiny word-level tokenizer saved as tokenizer.json + tokenizer_config.json (as real model folders carry)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
  )
  fast.save_pretrained(folder)
  return fast


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_with_merged_lora_loads_in_transformers(family, tmp_path):
  ref = reference(family, seed=2)
  src, out = str(tmp_path / "src"), str(tmp_path / "out")
  ref.save_pretrained(src)
  save_tokenizer(src)
  model = hf_llm.import_hf(src)
  lora.add_lora(model, 2, 4.0, ("q", "v", "o", "up"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for _, linear in lora.target_linears(model, ("q", "v", "o", "up")):
    linear.lora_b[...] = jnp.asarray(rng.normal(size=linear.lora_b.shape).astype(np.float32) * 0.1)
  ids, mask = padded_batch([10, 4, 7], 10, seed=8)
  ours, _ = forward(model, ids, mask=mask)
  assert np.abs(np.asarray(ours)[mask] - torch_logits(ref, ids, mask)[mask]).max() > 1e-2  # the adapters matter

  files = hf_llm.export_hf(model, out, src_dir=src, max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  assert lora.lora_param_count(model) > 0  # export merged into a copy, the model keeps its adapters
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(loaded) is type(ref) and loaded.dtype == torch.float32
  assert_logits_close(np.asarray(ours)[mask], torch_logits(loaded, ids, mask)[mask])
  vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
  assert vocab == transformers.AutoTokenizer.from_pretrained(src).get_vocab() and vocab["w5"] == 5
  # Tied models store no separate head; the export re-imports to the same parameters.
  names = set(hf_llm.SafetensorsReader(out).keys())
  assert ("lm_head.weight" in names) == (not ref.config.tie_word_embeddings)
  back = hf_llm.import_hf(out)
  assert back.cfg == hf_llm.load_config(src)
  again, _ = forward(back, ids, mask=mask)
  np.testing.assert_allclose(np.asarray(again), np.asarray(ours), atol=1e-5)


def test_sharded_bf16_checkpoint_streams_tensor_by_tensor(tmp_path):
  # Released checkpoints are bfloat16 and sharded with an index file.
  ref = reference("qwen2", seed=3)
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(p.bfloat16().float())  # float32 reference holding the bf16-rounded weights
  copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="20KB")
  with open(tmp_path / "model.safetensors.index.json") as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) > 2
  placed = []

  def place(path, array):
    assert array.dtype == np.float32
    placed.append((path, array.shape))
    return jnp.asarray(array)

  model = hf_llm.import_hf(str(tmp_path), place=place)
  paths = [p for p, _ in placed]
  assert len(paths) == len(set(paths)) == len(hf_llm.mapping.flat_paths(model))
  assert ("layers/attn/k_proj/kernel", (2, 64, 2, 16)) in placed  # both layers, stacked, placed once
  ids, mask = padded_batch([10, 4, 7], 10, seed=9)
  ours, _ = forward(model, ids, mask=mask)
  assert_logits_close(np.asarray(ours)[mask], torch_logits(ref, ids, mask)[mask])


def test_bad_checkpoints_give_one_line_errors_naming_the_key(tmp_path):
  ref = reference("qwen3", seed=4)
  ref.save_pretrained(str(tmp_path))
  path = str(tmp_path / "model.safetensors")
  tensors = load_file(path)
  good = dict(tensors)
  tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:-8]
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError) as err:
    hf_llm.import_hf(str(tmp_path))
  message = str(err.value)
  assert "\n" not in message
  assert "model.layers.1.self_attn.k_proj.weight: shape" in message
  assert "does not fit layers/1/attn/k_proj/kernel (64, 4, 24)" in message

  del good["model.layers.0.self_attn.q_norm.weight"]
  good["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  save_file(good, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError) as err:
    hf_llm.import_hf(str(tmp_path))
  message = str(err.value)
  assert "model.layers.0.self_attn.q_norm.weight: missing" in message
  assert "model.layers.0.self_attn.extra.weight: unexpected" in message

  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(CheckpointError, match=r"config\.json:model_type: unsupported 'gpt2'"):
    hf_llm.import_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
  with pytest.raises(CheckpointError, match=r"config\.json:num_key_value_heads"):
    hf_llm.import_hf(str(tmp_path))
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    hf_llm.import_hf(str(tmp_path / "missing"), cfg=hf_llm.LLMConfig())


def test_import_with_lora_and_remat_overrides(tmp_path):
  ref = reference("llama", seed=5)
  ref.save_pretrained(str(tmp_path))
  model = hf_llm.import_hf(str(tmp_path), lora_rank=4, lora_targets=("k", "gate"), remat="full")
  assert (model.cfg.lora_rank, model.cfg.remat) == (4, "full")
  adapters = [p for p in hf_llm.mapping.flat_paths(model) if "lora" in p]
  assert len(adapters) == 2 * 2  # stacked over the two layers
  assert not np.asarray(model.layers.mlp.gate_proj.lora_b[...][1]).any()
  assert np.asarray(model.layers.mlp.gate_proj.lora_a[...][1]).std() > 0
