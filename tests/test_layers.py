"""Shared layers against PyTorch equivalents (float32, random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.models import layers, stack


def test_linear_multi_dim_matches_matmul():
  lin = layers.Linear(6, (2, 3), in_axes=("embed",), out_axes=("heads", "head_dim"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 6))
  want = x @ lin.kernel[...].reshape(6, 6) + lin.bias[...].reshape(6)
  np.testing.assert_allclose(lin(x).reshape(4, 6), want, atol=1e-6)
  assert lin.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


def test_lora_zero_init_then_merge():
  lin = layers.Linear(5, 7, in_axes=("embed",), out_axes=("mlp",), lora_rank=2, lora_alpha=4.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 5))
  base = x @ lin.kernel[...] + lin.bias[...]
  np.testing.assert_allclose(lin(x), base, atol=1e-6)
  lin.lora_b[...] = jax.random.normal(jax.random.key(3), lin.lora_b.shape)
  adapted = lin(x)
  assert np.abs(adapted - base).max() > 1e-3
  merged = x @ lin.merged_kernel() + lin.bias[...]
  np.testing.assert_allclose(adapted, merged, atol=1e-5)
  assert isinstance(lin.lora_a, layers.LoRAParam)


def test_layernorm_and_rmsnorm_match_torch():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 3 + 1
  ln = layers.LayerNorm(8, eps=1e-5, rngs=nnx.Rngs(0))
  ln.scale[...] = jnp.arange(8.0) / 4
  ln.bias[...] = jnp.arange(8.0) / 8
  ref = torch.nn.LayerNorm(8, eps=1e-5)
  ref.weight.data = torch.arange(8.0) / 4
  ref.bias.data = torch.arange(8.0) / 8
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
  rms = layers.RMSNorm(8, eps=1e-6)
  xt = torch.from_numpy(x)
  want = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6)
  np.testing.assert_allclose(rms(jnp.asarray(x)), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_torch_sdpa(heads, kv_heads):
  rng = np.random.default_rng(heads * 10 + kv_heads)
  q = rng.normal(size=(2, 5, heads, 8)).astype(np.float32)
  k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  valid = np.ones((2, 7), bool)
  valid[1, 4:] = False
  bias = rng.normal(size=(1, heads, 5, 7)).astype(np.float32)
  out = layers.dot_product_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=layers.padding_mask_2d(jnp.asarray(valid)), bias=bias
  )
  g = heads // kv_heads
  tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
  tk, tv = tk.repeat_interleave(g, 1), tv.repeat_interleave(g, 1)
  additive = torch.from_numpy(bias) + torch.where(torch.from_numpy(valid)[:, None, None, :], 0.0, -1e30)
  want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=additive).transpose(1, 2)
  np.testing.assert_allclose(out, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_layer_stack_same_value_and_grad_under_every_remat_policy_scanned_or_not(policy, scan):
  mlps = stack.build(lambda r: layers.MLP(4, 8, rngs=r), 3, nnx.Rngs(0), scan=scan)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  graphdef, state = nnx.split(mlps)
  body = lambda mlp, h, _: (h + mlp(h), None)

  def unrolled(state):  # the same three layers, called one by one
    model, h = nnx.merge(graphdef, state), x
    for i in range(3):
      layer = nnx.merge(*nnx.split(jax.tree.map(lambda a: a[i], model) if scan else model[i]))
      h = body(layer, h, None)[0]
    return jnp.sum(h**2)

  def loss(state, policy):
    return jnp.sum(stack.run(nnx.merge(graphdef, state), body, x, remat=policy)[0] ** 2)

  want_v, want_g = jax.value_and_grad(unrolled)(state)
  v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, policy)
  np.testing.assert_allclose(v, want_v, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, want_g)
