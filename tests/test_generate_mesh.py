"""Generation over a device mesh: `generate(..., mesh=...)` gives the one-device greedy tokens on data-, FSDP-,
tensor- and mixed-parallel meshes of 8 CPU devices, and the compiled program really is partitioned (per-device
KV cache and weight shapes in its HLO, per-device argument bytes), so the equality is not one device's run again.

The worker runs in a fresh Python with 8 CPU devices (the flag must precede jax's import).
"""

import json

import pytest

from tests.helpers import run_worker

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]

# A tiny LLM whose every sharded dimension divides 8 (heads 16, kv heads 8, FFN 96, vocab 256, width 64), with
# head_dim 6 and 2 layers so the KV cache [layers 2, batch 8, positions 25, kv heads 8, head_dim 6] has a
# distinct size in each dimension and its per-device shape can be read off the HLO.
WORKER = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
jax.config.update("jax_default_matmul_precision", "highest")
from alm_jax import sharding
from alm_jax.infer import generate as gen
from alm_jax.models.llm import LLM, LLMConfig

cfg = LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=16, num_kv_heads=8,
                head_dim=6, tie_embeddings=False)
graphdef, state = nnx.split(nnx.jit(lambda: LLM(cfg, rngs=nnx.Rngs(0)))())  # one compile, not one per op
state = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 and x.shape[-1] == 256 else x, state)  # wider logit gaps
rng = np.random.default_rng(1)
lengths = [12, 5, 9, 12, 3, 7, 10, 1]
tokens = rng.integers(3, 256, (8, 12)).astype(np.int32)
mask = np.arange(12)[None, :] >= 12 - np.asarray(lengths)[:, None]  # left padded
tokens[~mask] = 0
options = dict(mask=mask, max_new_tokens=10, stop_tokens=(), length_bucket=16)

want = gen.generate((graphdef, state), tokens, **options)
one_device = sharding.make_mesh({"shape": (1, 1, 1)}, jax.devices()[:1])
single = gen.generate((graphdef, state), tokens, mesh=one_device, **options)
results = {"single": np.asarray(single.tokens).tolist(), "want": np.asarray(want.tokens).tolist(), "meshes": {}}
base_bytes = gen.lower((graphdef, state), tokens, mesh=one_device, **options).compile().memory_analysis()
for shape in json.loads(sys.argv[1]):
  mesh = sharding.make_mesh({"shape": shape}, jax.devices()[: int(np.prod(shape))])
  out = gen.generate((graphdef, state), tokens, mesh=mesh, **options)
  compiled = gen.lower((graphdef, state), tokens, mesh=mesh, **options).compile()
  hlo = compiled.as_text()
  caches = sorted(set(re.findall(r"f32\[2,\d+,25,\d+,6\]", hlo)))
  results["meshes"][str(tuple(shape))] = {
      "tokens": np.asarray(out.tokens).tolist(),
      "lengths": np.asarray(out.lengths).tolist(),
      "out_spec": str(out.tokens.sharding.spec),
      "devices": len(out.tokens.sharding.device_set),
      "caches": caches,
      "embed_shapes": sorted(set(re.findall(r"f32\[\d+,\d+\]", hlo)) & {"f32[256,64]", "f32[32,64]", "f32[256,8]"}),
      "argument_bytes": compiled.memory_analysis().argument_size_in_bytes,
  }
results["base_argument_bytes"] = base_bytes.argument_size_in_bytes
try:
  gen.generate((graphdef, state), tokens[:6], mask=mask[:6], max_new_tokens=2, stop_tokens=(),
               mesh=sharding.make_mesh({"shape": (8, 1, 1)}), length_bucket=16)
  results["odd_batch_error"] = None
except ValueError as e:
  results["odd_batch_error"] = str(e)
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
  return run_worker(WORKER, json.dumps(MESHES), tag="RESULTS")


def test_one_device_mesh_gives_the_plain_run(results):
  assert results["single"] == results["want"]
  assert len({tuple(row) for row in results["want"]}) > 1  # rows differ: a mix-up of rows would show


@pytest.mark.parametrize("shape", [str(m) for m in MESHES])
def test_greedy_tokens_on_every_mesh_equal_one_device(results, shape):
  got = results["meshes"][shape]
  assert got["tokens"] == results["want"]
  assert got["lengths"] == [10] * 8
  assert got["devices"] == 8


# Per-device KV cache [layers, batch, positions, kv heads, head_dim]: batch over data x fsdp, kv heads over tensor.
CACHES = {"(8, 1, 1)": "f32[2,1,25,8,6]", "(1, 8, 1)": "f32[2,1,25,8,6]", "(1, 1, 8)": "f32[2,8,25,1,6]",
          "(2, 2, 2)": "f32[2,2,25,4,6]"}
# The input embedding [vocab, embed] per device: vocab over tensor, embed over fsdp.
EMBEDS = {"(8, 1, 1)": "f32[256,64]", "(1, 8, 1)": "f32[256,8]", "(1, 1, 8)": "f32[32,64]"}


@pytest.mark.parametrize("shape", [str(m) for m in MESHES])
def test_the_kv_cache_is_partitioned(results, shape):
  caches = results["meshes"][shape]["caches"]
  assert CACHES[shape] in caches, caches
  assert "f32[2,8,25,8,6]" not in caches, caches  # no whole cache on one device


@pytest.mark.parametrize("shape", list(EMBEDS))
def test_weights_are_partitioned(results, shape):
  got = results["meshes"][shape]
  assert EMBEDS[shape] in got["embed_shapes"], got["embed_shapes"]
  base = results["base_argument_bytes"]
  if shape == "(8, 1, 1)":  # data parallel: every device holds all the weights
    assert got["argument_bytes"] > 0.9 * base
  else:  # FSDP or tensor parallel over 8: an eighth of the weights per device (norms stay whole)
    assert got["argument_bytes"] < 0.2 * base, (got["argument_bytes"], base)


def test_output_rows_stay_split_over_the_batch_axes(results):
  assert "data" in results["meshes"]["(8, 1, 1)"]["out_spec"]
  assert "fsdp" in results["meshes"]["(1, 8, 1)"]["out_spec"]


def test_a_batch_the_mesh_cannot_split_is_a_clear_error(results):
  assert "prompt batch" in (results["odd_batch_error"] or ""), results["odd_batch_error"]
