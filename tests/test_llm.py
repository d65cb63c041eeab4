"""LLM decoder: logits parity with transformers (Qwen2, Qwen3, Llama 3; GQA 2/1/7; tied/untied), KV cache,
padding, embeddings input, remat, LoRA and config validation."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from alm_jax.checkpoints import hf_llm
from alm_jax.config import ConfigError
from alm_jax.models import layers, lora
from alm_jax.models.llm import LLM, LLMConfig, init_cache, positions_from_mask

VOCAB = 96

# Small random configs: (transformers config class, kwargs). GQA ratios 2, 1, 7; tied and untied.
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                                             tie_word_embeddings=False, rope_theta=10000.0)),
    "llama": (transformers.LlamaConfig, dict(
        num_attention_heads=7, num_key_value_heads=1, hidden_size=56, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rms_norm_eps=1e-5)),
}


def reference(family: str, seed: int = 0):
  """A tiny random transformers model with every weight random (norm scales and biases too)."""
  cls, kwargs = FAMILIES[family]
  values = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=VOCAB,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  values.update(kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cls(**values), dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


@functools.partial(jax.jit, static_argnames=("graphdef", "return_hidden"))
def _forward(graphdef, state, tokens, embeddings, positions, mask, cache, cache_index, return_hidden):
  return nnx.merge(graphdef, state)(tokens, embeddings=embeddings, positions=positions, mask=mask, cache=cache,
                                    cache_index=cache_index, return_hidden=return_hidden)


def forward(model, tokens=None, *, embeddings=None, positions=None, mask=None, cache=None, cache_index=None,
            return_hidden=False):
  """`model(...)` under one jit per shape (eager JAX compiles every op separately, which is slower)."""
  graphdef, state = nnx.split(model)
  as_array = lambda x: None if x is None else jnp.asarray(x)
  return _forward(graphdef, state, as_array(tokens), as_array(embeddings), as_array(positions), as_array(mask), cache,
                  as_array(cache_index), return_hidden)


def numpy_model(cfg, seed=0):
  """An `LLM` with random weights filled in from numpy (no compiled random-init program: faster in tests)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=None)))
  rng = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    value = 1.0 + 0.1 * rng.normal(size=shape) if "norm" in str(path) else 0.2 * rng.normal(size=shape)
    leaves.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def padded_batch(lengths, total, seed=0, side="left"):
  """Random prompts [B, total] with `lengths` real tokens each, padded with 0 on one side."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), bool)
  for i, n in enumerate(lengths):
    span = slice(total - n, total) if side == "left" else slice(0, n)
    ids[i, span] = rng.integers(3, VOCAB, n)
    mask[i, span] = True
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.inference_mode():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()


def assert_logits_close(ours, ref, rel=1e-4):
  """Max abs difference within `rel` of the logits' scale (the issue's 1e-4 relative)."""
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= rel * np.abs(ref).max(), f"max error {err:.3g} vs scale {np.abs(ref).max():.3g}"


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
  """(family, transformers model, our model imported from its saved folder)."""
  ref = reference(request.param)
  folder = str(tmp_path_factory.mktemp(request.param))
  ref.save_pretrained(folder)
  return request.param, ref, hf_llm.import_hf(folder)


def to_right_padded(ids, mask):
  """Same prompts moved to right padding."""
  out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
  for i in range(len(ids)):
    n = mask[i].sum()
    out_ids[i, :n] = ids[i][mask[i]]
    out_mask[i, :n] = True
  return out_ids, out_mask


def test_logits_match_transformers_with_padding(pair):
  family, ref, model = pair
  assert model.cfg.family == family
  ids, mask = padded_batch([11, 6, 9], 11)
  want = torch_logits(ref, ids, mask)
  got, cache = forward(model, ids, mask=mask)
  assert cache is None and got.shape == (3, 11, VOCAB) and got.dtype == jnp.float32
  assert_logits_close(np.asarray(got)[mask], want[mask])
  # The same prompts right-padded: positions come from the mask, so real tokens get the same logits.
  r_ids, r_mask = to_right_padded(ids, mask)
  got_r, _ = forward(model, r_ids, mask=r_mask)
  assert_logits_close(np.asarray(got_r)[r_mask], want[mask])


def test_tied_and_untied_heads(pair):
  family, ref, model = pair
  tied = FAMILIES[family][1]["tie_word_embeddings"]
  assert (model.lm_head is None) == tied
  assert ("lm_head/kernel" in hf_llm.mapping.flat_paths(model)) == (not tied)


def test_kv_cache_decoding_matches_full_forward(pair):
  _, _, model = pair
  ids, mask = padded_batch([9, 5, 7], 9, seed=1)
  full, _ = forward(model, ids, mask=mask)
  positions = positions_from_mask(jnp.asarray(mask))
  cache = init_cache(model.cfg, 3, 12)
  # Prefill 6 tokens, then feed the remaining 3 one at a time.
  out, cache = forward(model, ids[:, :6], positions=positions[:, :6], mask=mask[:, :6], cache=cache, cache_index=0)
  steps = [out]
  for t in range(6, 9):
    out, cache = forward(model, ids[:, t:t + 1], positions=positions[:, t:t + 1], mask=mask[:, t:t + 1], cache=cache,
                         cache_index=t)
    steps.append(out)
  incremental = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(incremental[mask], np.asarray(full)[mask], atol=1e-4)
  assert cache["layers"]["k"].shape == (model.cfg.num_layers, 3, 12, model.cfg.num_kv_heads, model.cfg.head_dim)
  np.testing.assert_array_equal(np.asarray(cache["valid"])[:, :9], mask)


def test_embeddings_input_and_hidden_states(pair):
  _, _, model = pair
  ids, mask = padded_batch([11, 6, 9], 11, seed=2)
  by_ids, _ = forward(model, ids, mask=mask)
  embeds = model.embed(jnp.asarray(ids))
  assert embeds.shape == (3, 11, model.cfg.hidden_size)
  by_embeds, _ = forward(model, embeddings=embeds, mask=mask, positions=positions_from_mask(jnp.asarray(mask)))
  np.testing.assert_allclose(by_embeds, by_ids, atol=1e-5)
  hidden, _ = forward(model, embeddings=embeds, mask=mask, return_hidden=True)
  assert hidden.shape == (3, 11, model.cfg.hidden_size)
  np.testing.assert_allclose(model.logits(hidden), by_ids, atol=1e-5)


def test_positions_from_mask():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool)
  np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]])


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policy_checkpoints_each_layer_with_same_logits(scan):
  cfg = LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  scan_layers=scan)
  ids = padded_batch([6, 4], 6)[0]
  logits, remat_eqns = [], []
  for policy in ("none", "full"):
    model = numpy_model(dataclasses.replace(cfg, remat=policy))
    graphdef, state = nnx.split(model)

    def loss(state):
      out, _ = nnx.merge(graphdef, state)(jnp.asarray(ids))
      return jnp.mean(jax.nn.logsumexp(out, -1))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(state)
    remat_eqns.append(len(re.findall(r"\b(?:checkpoint|remat\d*)\[", str(jaxpr))))  # scan bodies included
    logits.append(np.asarray(forward(model, ids)[0]))
  # One checkpointed body in the scan, or one per layer unrolled (values and grads: test_layers).
  assert remat_eqns[0] == 0 and remat_eqns[1] >= (1 if scan else cfg.num_layers)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


def test_lora_changes_logits_and_merge_reproduces_them(pair):
  family, ref, _ = pair
  model = hf_llm.import_hf(
      hf_llm.mapping.DictReader(ref.state_dict(), "state dict"),
      hf_llm.llm_config_from_hf(ref.config.to_dict()),
  )
  ids, mask = padded_batch([11, 6, 9], 11, seed=3)
  base, _ = forward(model, ids, mask=mask)
  count = lora.add_lora(model, 4, 8.0, ("q", "k", "v", "o", "gate", "up", "down"), rngs=nnx.Rngs(1))
  cfg = model.cfg
  d, f, h, k, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = 4 * ((d + h * hd) * 2 + (d + k * hd) * 2 + (d + f) * 3)
  assert count == cfg.num_layers * per_layer == lora.lora_param_count(nnx.state(model))
  assert cfg.lora_rank == 4 and isinstance(model.layers.attn.q_proj.lora_a, layers.LoRAParam)
  assert model.layers.attn.q_proj.lora_a.shape == (cfg.num_layers, d, 4)  # one adapter per stacked layer
  fresh, _ = forward(model, ids, mask=mask)
  np.testing.assert_allclose(np.asarray(fresh), np.asarray(base), atol=1e-5)  # zero-initialised B: no effect
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    lora.add_lora(model, 4, 8.0, ("q",), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(4)
  for _, linear in lora.target_linears(model):
    linear.lora_b[...] = jnp.asarray(rng.normal(size=linear.lora_b.shape).astype(np.float32) * 0.05)
  adapted, _ = forward(model, ids, mask=mask)
  assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-2
  assert lora.merge_lora(model) == 7  # seven stacked projections
  assert lora.lora_param_count(model) == 0 and model.cfg.lora_rank == 0
  assert not any("lora" in p for p in hf_llm.mapping.flat_paths(model))
  merged, _ = forward(model, ids, mask=mask)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_lora_from_config_and_path_pattern(scan):
  cfg = LLMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora_rank=2, lora_targets=("q", "down"), scan_layers=scan)
  model = numpy_model(cfg)
  paths = [p for p in hf_llm.mapping.flat_paths(model) if "lora" in p]
  prefixes = ["layers"] if scan else [f"layers/{i}" for i in range(2)]
  assert paths == sorted(f"{l}/{m}/lora_{ab}" for l in prefixes for m in ("attn/q_proj", "mlp/down_proj") for ab in "ab")
  assert all(re.search(lora.LORA_PATH_PATTERN, p) for p in paths)
  assert lora.lora_param_count(model) == 2 * (2 * (32 + 4 * 8) + 2 * (48 + 32))


def test_config_validation_names_keys():
  with pytest.raises(ConfigError, match="llm.num_kv_heads"):
    LLMConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ConfigError, match="llm.lora_targets"):
    LLMConfig(lora_targets=("q", "qkv"))
  with pytest.raises(ConfigError, match="llm.remat"):
    LLMConfig(remat="sometimes")
  hf = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to_dict()
  for key, value, where in [
      ("model_type", "gpt2", "config.json:model_type"),
      ("num_key_value_heads", 3, "config.json:num_key_value_heads"),
      ("use_sliding_window", True, "config.json:use_sliding_window"),
      ("hidden_act", "gelu", "config.json:hidden_act"),
      ("hidden_size", "64", "config.json:hidden_size"),
      ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
       "config.json:rope_parameters.rope_type"),
  ]:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
      hf_llm.llm_config_from_hf({**hf, key: value})
  missing = dict(hf)
  del missing["vocab_size"]
  with pytest.raises(ConfigError, match="config.json:vocab_size: missing"):
    hf_llm.llm_config_from_hf(missing)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trips_through_hf_dict(family):
  cls, kwargs = FAMILIES[family]
  sizes = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": VOCAB}
  hf = cls(**{**sizes, **kwargs}).to_dict()
  cfg = hf_llm.llm_config_from_hf(hf)
  assert hf_llm.llm_config_from_hf(hf_llm.llm_config_to_hf(cfg)) == cfg
  assert cfg.qk_norm == (family == "qwen3") and cfg.qkv_bias == (family == "qwen2")
  if family == "llama":
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_positions) == ("llama3", 8.0, 16)
  # Old-style keys (rope_theta / rope_scaling at top level, as most hub checkpoints have them) read the same.
  legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
  legacy["rope_theta"] = cfg.rope_theta
  legacy["rope_scaling"] = hf_llm.llm_config_to_hf(cfg)["rope_scaling"]
  assert hf_llm.llm_config_from_hf(legacy) == cfg
