"""Jitted generation: greedy tokens equal transformers `generate` (left- and right-padded batches), stop tokens,
embeddings input, sampling (determinism, top-k, top-p, temperature) and compile-once-per-bucket."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.checkpoints import hf_llm
from alm_jax.config import ConfigError
from alm_jax.infer import generate as gen
from alm_jax.infer.sampling import SamplingConfig, sample
from test_llm import FAMILIES, VOCAB, padded_batch, reference, to_right_padded

EOS = 2
LENGTHS = [7, 12, 3, 9]


_PAIRS = {}


def pair(family, tmp_path_factory):
  """(transformers model, our model imported from its saved folder), built once per family."""
  if family not in _PAIRS:
    ref = reference(family, seed=3)  # top-1/top-2 logit gaps along the greedy paths >= 8e-3
    folder = str(tmp_path_factory.mktemp(family))
    ref.save_pretrained(folder)
    _PAIRS[family] = ref, hf_llm.import_hf(folder)
  return _PAIRS[family]


def hf_generate(ref, ids, mask, new, eos=EOS):
  with torch.inference_mode():
    out = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=eos)
  tokens = out[:, ids.shape[1]:].numpy()
  return np.pad(tokens, ((0, 0), (0, new - tokens.shape[1])))  # transformers stops when every row is done


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(family, tmp_path_factory):
  ref, model = pair(family, tmp_path_factory)
  ids, mask = padded_batch(LENGTHS, max(LENGTHS), seed=5, side="left")
  r_ids, r_mask = to_right_padded(ids, mask)
  # Stop on a token that row 1 emits at step 10, as transformers' eos: rows stop (then pad) at different steps.
  stop = int(hf_generate(ref, ids, mask, 32)[1, 9])
  want = hf_generate(ref, ids, mask, 32, eos=stop)
  lengths = [(list(row).index(stop) + 1 if stop in row else 32) for row in want]
  assert lengths[1] <= 10 and max(lengths) == 32
  for prompt, prompt_mask in ((ids, mask), (r_ids, r_mask)):  # our left- and right-padded inputs
    out = gen.generate(model, prompt, mask=prompt_mask, max_new_tokens=32, stop_tokens=[stop], length_bucket=16)
    assert out.tokens.shape == (4, 32) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)


def test_embeddings_input_and_split_model_give_the_same_tokens(tmp_path_factory):
  _, model = pair("qwen2", tmp_path_factory)
  ids, mask = padded_batch(LENGTHS, max(LENGTHS), seed=5, side="right")
  by_ids = gen.generate(model, ids, mask=mask, max_new_tokens=32, stop_tokens=[EOS], length_bucket=16)
  embeds = model.embed(jnp.asarray(ids))
  by_embeds = gen.generate(nnx.split(model), embeddings=embeds, mask=mask, max_new_tokens=32, stop_tokens=[EOS],
                           length_bucket=16)
  np.testing.assert_array_equal(np.asarray(by_embeds.tokens), np.asarray(by_ids.tokens))
  np.testing.assert_array_equal(np.asarray(by_embeds.lengths), np.asarray(by_ids.lengths))
  assert model.cfg.eos_token_ids == (EOS,)  # stop tokens default to the model's eos ids
  default = gen.generate(model, ids, mask=mask, max_new_tokens=32, length_bucket=16)
  np.testing.assert_array_equal(np.asarray(default.tokens), np.asarray(by_ids.tokens))


def test_stop_tokens_pad_and_compile_once_per_bucket(tmp_path_factory):
  _, model = pair("qwen2", tmp_path_factory)
  ids, mask = padded_batch(LENGTHS, max(LENGTHS), seed=6, side="right")
  free = np.asarray(gen.generate(model, ids, mask=mask, max_new_tokens=32, stop_tokens=(), length_bucket=16).tokens)
  # Several stop tokens: row 0's 6th token and row 1's 4th token.
  stops = [int(free[0, 5]), int(free[1, 3])]
  out = gen.generate(model, ids, mask=mask, max_new_tokens=32, stop_tokens=stops, pad_id=-1, length_bucket=16)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row in range(4):
    hits = [j for j in range(32) if free[row, j] in stops]
    n = hits[0] + 1 if hits else 32
    assert lengths[row] == n
    np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
    assert (tokens[row, n:] == -1).all()
  # A shorter prompt in the same length bucket, other stop tokens: the compiled program is reused.
  compiled = gen._generate_jit._cache_size()
  short = gen.generate(model, ids[:, :10], mask=mask[:, :10], max_new_tokens=32, stop_tokens=[EOS], pad_id=-1,
                       length_bucket=16)
  assert short.tokens.shape == (4, 32)
  assert gen._generate_jit._cache_size() == compiled


def test_sampling_is_deterministic_per_seed(tmp_path_factory):
  _, model = pair("qwen3", tmp_path_factory)
  ids, mask = padded_batch(LENGTHS, max(LENGTHS), seed=7, side="left")
  cfg = SamplingConfig(temperature=1.5, top_k=40, top_p=0.95)
  a = gen.generate(model, ids, mask=mask, max_new_tokens=16, sampling=cfg, seed=1, length_bucket=16)
  b = gen.generate(model, ids, mask=mask, max_new_tokens=16, sampling=cfg, seed=1, length_bucket=16)
  c = gen.generate(model, ids, mask=mask, max_new_tokens=16, sampling=cfg, seed=2, length_bucket=16)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  assert ((np.asarray(a.tokens) >= 0) & (np.asarray(a.tokens) < VOCAB)).all()


def _draws(logits, cfg, n=4000):
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, cfg)))(keys))[:, 0]


def test_sampling_rules():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
  assert int(sample(logits, jax.random.key(0), SamplingConfig())[0]) == 5  # greedy
  assert set(_draws(logits, SamplingConfig(temperature=2.0, top_k=1))) == {5}
  assert set(_draws(logits, SamplingConfig(temperature=2.0, top_p=0.01))) == {5}
  assert set(_draws(logits, SamplingConfig(temperature=5.0, top_k=3))) == {0, 1, 5}
  # top-p: probabilities at T=1 are .23 .08 .05 .03 .01 .61 -> the 0.8 nucleus is {5, 0}.
  assert set(_draws(logits, SamplingConfig(temperature=1.0, top_p=0.8))) == {0, 5}
  # Plain temperature sampling follows softmax(logits / T).
  draws = _draws(logits, SamplingConfig(temperature=2.0))
  freq = np.bincount(draws, minlength=6) / len(draws)
  np.testing.assert_allclose(freq, jax.nn.softmax(logits[0] / 2.0), atol=0.03)


@pytest.mark.parametrize("kwargs,key", [
    (dict(temperature=-1.0), "sampling.temperature"),
    (dict(top_k=-2), "sampling.top_k"),
    (dict(top_p=0.0), "sampling.top_p"),
])
def test_sampling_config_validation(kwargs, key):
  with pytest.raises(ConfigError, match=key):
    SamplingConfig(**kwargs)


SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx
from alm_jax.infer import generate as gen
from alm_jax.models import partitioning
from alm_jax.models.llm import LLM, LLMConfig

jax.config.update("jax_default_matmul_precision", "highest")
rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
cfg = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                tie_embeddings=False)
graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=None)))
rng = np.random.default_rng(0)
state = jax.tree.map(lambda v: v.replace(jnp.asarray(rng.normal(size=v.get_value().shape) * 0.3, jnp.float32)), state,
                     is_leaf=lambda x: isinstance(x, nnx.Variable))
def shard(v):
  spec = partitioning.logical_to_spec(v.get_metadata()["out_sharding"], rules)
  return v.replace(jax.device_put(v.get_value(), NamedSharding(mesh, spec)))
sharded = jax.tree.map(shard, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
assert sharded["layers"]["mlp"]["up_proj"]["kernel"].get_value().sharding.spec == PartitionSpec(None, None, "tensor")
ids = rng.integers(3, 96, (4, 9)).astype(np.int32)
mask = np.ones((4, 9), bool)
mask[1, :4] = False
mask[2, 6:] = False
with partitioning.use_rules(mesh, rules):
  out = gen.generate((graphdef, sharded), ids, mask=mask, max_new_tokens=12)
  text = gen._generate_jit.lower(graphdef, sharded, jnp.asarray(ids), None, jnp.asarray(mask), jax.random.key(0),
                                 jnp.full((8,), -1, jnp.int32), max_new_tokens=12, sampling=gen.SamplingConfig(),
                                 pad_id=0, cache_dtype=None).as_text()
assert "sharding_constraint" in text or "mhlo.sharding" in text
jax.clear_caches()
ref = gen.generate((graphdef, state), ids, mask=mask, max_new_tokens=12)
np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
print("OK", out.tokens.sharding.spec)
"""


def test_generation_under_a_mesh_with_sharded_params_and_cache():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
