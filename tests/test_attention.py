"""The attention entry point (issue 14): every implementation computes the same masked attention.

xla is checked against an independent numpy reference; splash (Pallas interpret mode on CPU), the blocked xla
loop and the cudnn argument mapping (run by jax.nn's xla implementation) against xla. Sharded runs and the
TPU lowering of splash run in subprocesses: they need a fresh CPU device count, and libtpu.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax.models import attention as attn
from alm_jax.models import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(batch, t, heads, kv_heads, dim, s=None, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = rng.normal(size=(batch, t, heads, dim)) * 1.5
  k = rng.normal(size=(batch, s, kv_heads, dim)) * 1.5
  v = rng.normal(size=(batch, s, kv_heads, dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def allowed_np(batch, heads, t, s, causal=False, key_valid=None, segment_ids=None, mask=None):
  """[B, H, T, S] bool from the documented rule, written out independently of the module."""
  ok = np.ones((batch, heads, t, s), bool)
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  if causal:
    ok &= (j <= i)[None, None]
  if key_valid is not None:
    ok &= np.asarray(key_valid, bool)[:, None, None, :]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    ok &= (seg[:, :, None] == seg[:, None, :])[:, None]
  if mask is not None:
    ok &= np.broadcast_to(np.asarray(mask, bool).reshape((1,) * (4 - np.ndim(mask)) + np.shape(mask)), ok.shape)
  return ok


def reference(q, k, v, *, scale=None, bias=None, **conditions):
  """Float64 numpy attention, one (example, head) at a time; a row with no allowed key averages all values."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, t, heads, dim = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(dim) if scale is None else scale
  ok = allowed_np(batch, heads, t, s, **conditions)
  bias = np.zeros((1, 1, 1, 1)) if bias is None else np.asarray(bias, np.float64).reshape(
      (1,) * (4 - np.ndim(bias)) + np.shape(bias))
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      kv = h // (heads // kv_heads)
      logits = q[b, :, h] @ k[b, :, kv].T * scale + np.broadcast_to(bias, (batch, heads, t, s))[b, h]
      for i in range(t):
        row = ok[b, h, i]
        weights = np.zeros(s)
        if row.any():
          e = np.exp(logits[i, row] - logits[i, row].max())
          weights[row] = e / e.sum()
        else:
          weights[:] = 1 / s
        out[b, i, h] = weights @ v[b, :, kv]
  return out


def rows_with_keys(batch, heads, t, s, **conditions):
  """[B, T, H] bool: query rows that may attend at least one key (the rows every implementation defines)."""
  return allowed_np(batch, heads, t, s, **conditions).any(-1).transpose(0, 2, 1)


def lengths_mask(t, lengths, left=False):
  pos = np.arange(t)[None]
  lengths = np.asarray(lengths)[:, None]
  return pos >= t - lengths if left else pos < lengths


def packed(t, boundaries):
  """Segment ids [B, T] with a new segment starting at each boundary of each row."""
  return np.stack([np.searchsorted(np.asarray(b), np.arange(t), side="right") for b in boundaries]).astype(np.int32)


def jitted(**options):
  return jax.jit(lambda q, k, v: attn.attention(q, k, v, **options))


# ---------------------------------------------------------------------------
# xla against numpy, and the callers' bitwise results.

XLA_CASES = {
    "causal_left_padding_gqa": dict(shape=(2, 11, 4, 2, 8), causal=True, key_valid=lengths_mask(11, [11, 6], True),
                                    scale=0.4),
    "causal_right_padding_mqa": dict(shape=(2, 11, 4, 1, 8), causal=True, key_valid=lengths_mask(11, [4, 11])),
    "packed_scaled": dict(shape=(2, 12, 2, 2, 8), causal=True, segment_ids=packed(12, [[5], [2, 9]]), scale=0.3),
    "cross_mask_bias": dict(shape=(2, 7, 4, 2, 8), s=10, key_valid=lengths_mask(10, [10, 0]),
                            mask=np.random.default_rng(1).random((2, 1, 7, 10)) > 0.3,
                            bias=np.random.default_rng(2).normal(size=(1, 4, 7, 10))),
}


@pytest.mark.parametrize("name", XLA_CASES)
def test_xla_equals_numpy_reference(name):
  case = dict(XLA_CASES[name])
  q, k, v = qkv(*case.pop("shape"), s=case.pop("s", None))
  got = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl="xla", **case))(q, k, v)
  np.testing.assert_allclose(got, reference(q, k, v, **case), atol=2e-5, rtol=0)


def test_xla_conditions_are_bitwise_the_dense_mask_callers_pass():
  # What the LLM and the encoders pass today (a dense mask, a key-padding mask, a bias) gives bitwise the same
  # through the entry point, and causal/key_valid/segment_ids equal the dense mask they describe.
  q, k, v = qkv(2, 10, 4, 2, 8)
  valid = lengths_mask(10, [10, 6], left=True)
  segments = packed(10, [[4], [7]])
  dense = allowed_np(2, 1, 10, 10, causal=True, key_valid=valid, segment_ids=segments)
  bias = np.random.default_rng(3).normal(size=(1, 4, 10, 10)).astype(np.float32)
  padding = layers.padding_mask_2d(jnp.asarray(valid))

  from tests.helpers import OPTIMISED_XLA  # pylint: disable=import-outside-toplevel

  def both(q, k, v):
    before = (layers.dot_product_attention(q, k, v, mask=jnp.asarray(dense), bias=bias),
              layers.dot_product_attention(q, k, v, mask=padding))
    after = (attn.attention(q, k, v, causal=True, key_valid=valid, segment_ids=segments, bias=bias),
             attn.attention(q, k, v, key_valid=valid))
    return before, after

  # Bitwise equality is a property of the optimised program (what runs), not of the suite's -O0 compiles.
  optimised = lambda fn: jax.jit(fn).lower(q, k, v).compile(OPTIMISED_XLA)
  before, after = optimised(both)(q, k, v)
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
  dense_entry = optimised(lambda q, k, v: attn.attention(q, k, v, mask=dense, bias=bias))
  np.testing.assert_array_equal(dense_entry(q, k, v), before[0])


# ---------------------------------------------------------------------------
# The blocked xla loop.


def test_head_block_equals_one_fused_xla_attention():
  # LLM rows: causal, left padding, packed, grouped-query heads; 37 rows in 5 blocks of 8 (the last one padded).
  q, k, v = qkv(2, 37, 4, 2, 8, seed=4)
  conditions = dict(causal=True, key_valid=lengths_mask(37, [37, 20], left=True),
                    segment_ids=packed(37, [[10, 30], [25]]), scale=0.2)
  np.testing.assert_allclose(jitted(head_block=8, **conditions)(q, k, v), jitted(**conditions)(q, k, v),
                             atol=1e-5, rtol=0)
  # Whisper's call: as many kv heads as heads, a key-padding mask [B, 1, 1, S].
  q, k, v = qkv(2, 37, 4, 4, 8, seed=5)
  mask = layers.padding_mask_2d(jnp.asarray(lengths_mask(37, [37, 20])))
  np.testing.assert_allclose(jitted(mask=mask, head_block=16)(q, k, v), jitted(mask=mask)(q, k, v),
                             atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# splash, in Pallas interpret mode.

SPLASH_CASES = {
    # LLM rows: left and right padding, grouped-query heads.
    "causal_padding_gqa": dict(shape=(2, 37, 4, 2, 8), causal=True, key_valid=np.concatenate(
        [lengths_mask(37, [30], left=True), lengths_mask(37, [21])])),
    # Packed rows over three 128-row blocks: segments cross block edges, padding after the last one.
    "causal_packed": dict(shape=(2, 300, 2, 1, 8), causal=True, segment_ids=packed(300, [[100, 130, 250], [7]]),
                          key_valid=lengths_mask(300, [300, 290])),
    # Whisper: every key of the row's real frames, T not a multiple of 128; grouped heads, scale given.
    "encoder_key_padding": dict(shape=(2, 75, 6, 3, 16), key_valid=lengths_mask(75, [75, 33]), scale=0.1),
}


@pytest.mark.parametrize("name", SPLASH_CASES)
def test_splash_equals_xla(name):
  case = dict(SPLASH_CASES[name])
  shape = case.pop("shape")
  q, k, v = qkv(*shape, seed=6)
  run = lambda impl, **kw: jax.jit(lambda q, k, v: attn.attention(q, k, v, impl=impl, **case, **kw))(q, k, v)
  splash, xla = run("splash", interpret=True), run("xla")
  conditions = {key: val for key, val in case.items() if key != "scale"}
  rows = rows_with_keys(shape[0], shape[2], shape[1], shape[1], **conditions)
  assert rows.mean() > 0.9
  np.testing.assert_allclose(np.asarray(splash)[rows], np.asarray(xla)[rows], atol=1e-5, rtol=0)


def test_splash_segment_ids_keep_padding_out():
  # Invalid and padding keys carry an id below every query's; padding queries share it.
  valid = lengths_mask(5, [5, 2])
  q_ids, kv_ids = attn.splash_segment_ids(5, 5, jnp.asarray(valid), jnp.asarray(packed(5, [[3], [1]]) + 4), 2)
  assert q_ids.shape == kv_ids.shape == (2, 128)
  np.testing.assert_array_equal(q_ids[:, :6], [[4, 4, 4, 5, 5, 3], [4, 5, 5, 5, 5, 3]])
  np.testing.assert_array_equal(kv_ids[:, :6], [[4, 4, 4, 5, 5, 3], [4, 5, 3, 3, 3, 3]])
  assert attn.splash_block(128) == 128 and attn.splash_block(384) == 128 and attn.splash_block(1536) == 512


# ---------------------------------------------------------------------------
# cudnn's argument mapping, run by jax.nn's xla implementation.


@pytest.mark.parametrize("name", ["causal_left_padding_gqa", "cross_mask_bias"])
def test_cudnn_arguments_equal_xla(name):
  case = dict(XLA_CASES[name])
  q, k, v = qkv(*case.pop("shape"), s=case.pop("s", None), seed=7)
  args = attn.cudnn_arguments(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **{
      key: (jnp.asarray(val) if isinstance(val, np.ndarray) else val) for key, val in case.items()})
  assert args["is_causal"] == case.get("causal", False)
  for key in ("mask", "bias"):
    if args[key] is not None:  # cuDNN wants full [.., .., T, S] extents
      assert args[key].ndim == 4 and args[key].shape[2:] == (q.shape[1], k.shape[1])
  static = {key: args.pop(key) for key in ("scale", "is_causal")}
  got = jax.jit(lambda arrays: jax.nn.dot_product_attention(**arrays, **static, implementation="xla"))(args)
  np.testing.assert_allclose(got, jitted(**case)(q, k, v), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Errors.


def test_errors_name_the_problem():
  q, k, v = qkv(1, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*xla, splash, cudnn"):
    attn.attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="'splash' cannot take a dense mask and bias"):
    attn.attention(q, k, v, impl="splash", mask=np.ones((4, 4), bool), bias=np.zeros((4, 4)))
  with pytest.raises(ValueError, match="'splash' cannot take a dense bias"):
    attn.attention(q, k, v, impl="splash", bias=np.zeros((4, 4)))
  with pytest.raises(ValueError, match="'cudnn' needs float16 or bfloat16"):
    attn.attention(q, k, v, impl="cudnn")
  with pytest.raises(ValueError, match="head_block=2 is an option of the xla"):
    attn.attention(q, k, v, impl="splash", head_block=2)
  with pytest.raises(ValueError, match="causal attention is self-attention"):
    attn.attention(q, k[:, :3], v[:, :3], causal=True)
  with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
    attn.attention(q[:, :, :1].repeat(3, 2), k, v)
  with pytest.raises(ValueError, match="key-padding mask"):
    attn.attention(q, k, v, mask=np.ones((1, 1, 4, 4), bool), head_block=2)


# ---------------------------------------------------------------------------
# Under a mesh (subprocesses): per device on 4 CPU devices, and lowered for a TPU topology.


def sharded_run() -> dict:
  """Batch over fsdp, heads over tensor on 4 CPU devices: blocked xla and splash (outputs and gradients) equal
  unsharded xla; returns the largest differences and whether each ran per device."""
  from alm_jax import sharding
  from alm_jax.models import partitioning

  mesh = sharding.make_mesh({"shape": (1, 2, 2)}, jax.devices("cpu")[:4])
  rules = sharding.make_rules()
  q, k, v = qkv(2, 40, 4, 2, 8, seed=8)
  conditions = dict(causal=True, key_valid=lengths_mask(40, [40, 25], left=True), segment_ids=packed(40, [[15], [30]]))
  weights = np.random.default_rng(9).normal(size=q.shape) * rows_with_keys(2, 4, 40, 40, **conditions)[..., None]

  def outputs_and_grads(**options):
    def loss(q, k, v):
      out = attn.attention(q, k, v, **conditions, **options)
      return jnp.sum(out * weights), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

  want = jax.tree.leaves(outputs_and_grads()(q, k, v))
  result = {}
  for name, options in (("blocked", dict(head_block=16)), ("splash", dict(impl="splash", interpret=True))):
    with partitioning.use_rules(mesh, rules):
      lowered = outputs_and_grads(**options).lower(q, k, v)
    got = jax.tree.leaves(lowered.compile()(q, k, v))
    rows = weights != 0
    result[name] = max(float(np.abs(np.asarray(a) - np.asarray(b))[rows if a.shape == rows.shape else ...].max())
                       for a, b in zip(got, want))
    result[name + "_shard_map"] = "sdy.manual_computation" in lowered.as_text()
  return result


def tpu_compile() -> dict:
  """Lowers and compiles splash (forward and gradient) for v5p:2x2x1 on a (data, fsdp, tensor) = (1, 2, 2) mesh."""
  from jax.experimental import topologies
  from jax.sharding import NamedSharding

  from alm_jax import sharding
  from alm_jax.models import partitioning

  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  except Exception as e:  # libtpu present but unable to describe the topology
    return {"skip": f"no TPU topology description: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
  mesh = sharding.make_mesh({"shape": (1, 2, 2)}, devices)
  rules = sharding.make_rules()

  def loss(q, k, v, segments):
    out = attn.attention(q, k, v, impl="splash", causal=True, segment_ids=segments)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  spec = lambda *axes: NamedSharding(mesh, partitioning.logical_to_spec(axes, rules))
  heads, kv_heads = spec("batch", None, "heads", None), spec("batch", None, "kv_heads", None)
  args = (jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16, sharding=heads),
          jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16, sharding=kv_heads),
          jax.ShapeDtypeStruct((2, 200, 2, 64), jnp.bfloat16, sharding=kv_heads),
          jax.ShapeDtypeStruct((2, 200), jnp.int32, sharding=spec("batch", None)))
  with partitioning.use_rules(mesh, rules):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
  text = lowered.as_text()
  compiled = lowered.compile()
  return {"platform": devices[0].platform, "mosaic": text.count("tpu_custom_call"),
          "shard_map": "sdy.manual_computation" in text, "compiled": compiled is not None}


def _subprocess(mode: str, **env) -> dict:
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # this checkout's alm_jax
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TPU_SKIP_MDS_QUERY="1", PYTHONPATH=path,
             ALLOW_MULTIPLE_LIBTPU_LOAD="1", **env)  # other processes may hold libtpu's lock; nothing runs on a TPU
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return json.loads(proc.stdout.rpartition("RESULT ")[2])


def test_blocked_and_splash_run_per_device_under_a_mesh():
  from tests.helpers import FAST_XLA  # pylint: disable=import-outside-toplevel

  flags = FAST_XLA + " --xla_force_host_platform_device_count=4"  # faster CPU compiles
  result = _subprocess("--sharded", XLA_FLAGS=flags)
  assert result["blocked_shard_map"] and result["splash_shard_map"], result
  assert result["blocked"] < 1e-5 and result["splash"] < 1e-5, result


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the [tpu] extra)")
def test_splash_lowers_and_compiles_for_a_tpu_topology():
  result = _subprocess("--tpu-compile")
  if "skip" in result:
    pytest.skip(result["skip"])
  assert result["platform"] == "tpu" and result["compiled"], result
  assert result["mosaic"] >= 3 and result["shard_map"], result  # forward, dq and dkv kernels, per device


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  out = sharded_run() if "--sharded" in sys.argv else tpu_compile()
  print("RESULT " + json.dumps(out), flush=True)
