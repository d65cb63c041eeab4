"""The BEATs positional conv (weight-normed grouped Conv1d) gives the 1-device gradients on
meshes whose batch split leaves some devices holding the same examples.

XLA partitions the kernel gradient of a `feature_group_count` conv (a
`batch_group_count` conv) wrongly when the batch is sharded over part of the
mesh only: `(2, 2, 2)` with `batch → (data, fsdp)` doubled it. `PosConv` now runs
one dense conv per group (`beats.grouped_conv1d`); see docs/grouped_conv_sharding.md.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax.models.beats import grouped_conv1d
from tests.helpers import run_worker


# Meshes (data, fsdp, tensor) whose batch split (data x fsdp) is partial, plus a full one.
MESHES = [(2, 2, 2), (2, 1, 2), (1, 2, 2), (4, 2, 1)]

WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from alm_jax import sharding
from alm_jax.models.beats import PosConv
from alm_jax.models.partitioning import constrain

meshes = json.loads(sys.argv[1])
graphdef, params = nnx.split(PosConv(32, 8, 4, rngs=nnx.Rngs(0)), nnx.Param)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 24, 32)).astype(np.float32)
target = rng.normal(size=(8, 24, 32)).astype(np.float32)

def loss(params, x):
  x = constrain(x, ("batch", "audio_frames", "embed"))
  return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x) - target))

def place(params, mesh, rules):
  # each parameter on the mesh by its logical axes, as training lays it out
  def one(v):
    axes = v.get_metadata().get("out_sharding")
    spec = sharding.logical_to_spec(tuple(axes), rules) if axes else jax.sharding.PartitionSpec()
    return v.replace(jax.device_put(v.get_value(), jax.sharding.NamedSharding(mesh, spec)))
  return jax.tree.map(one, params, is_leaf=lambda v: isinstance(v, nnx.Variable))

grad = jax.grad(loss, argnums=(0, 1))
want = jax.jit(grad)(params, x)
errors = {}
for shape in meshes:
  mesh = sharding.make_mesh({"shape": shape}, jax.devices()[: int(np.prod(shape))])
  rules = sharding.make_rules()
  batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None, None), rules))
  got = jax.jit(sharding.bind_rules(grad, mesh, rules))(place(params, mesh, rules),
                                                        jax.device_put(x, batch))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), got, want)
  errors[str(tuple(shape))] = max(jax.tree.leaves(diffs))
print("ERRORS " + json.dumps(errors))
"""


def test_pos_conv_gradients_on_partially_batch_sharded_meshes_match_one_device():
  errors = run_worker(WORKER, json.dumps(MESHES), tag="ERRORS")
  assert set(errors) == {str(m) for m in MESHES}
  assert all(err < 1e-5 for err in errors.values()), errors


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_conv1d_matches_the_grouped_lax_conv(groups):
  rng = np.random.default_rng(groups)
  x = jnp.asarray(rng.normal(size=(2, 20, 16)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(7, 16 // groups, 8)), jnp.float32)

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1,), [(3, 3)], dimension_numbers=("NWC", "WIO", "NWC"),
                                        feature_group_count=groups)

  np.testing.assert_array_equal(grouped_conv1d(x, kernel, groups, (3, 3)), reference(x, kernel))
  ours = jax.grad(lambda x, k: jnp.sum(jnp.sin(grouped_conv1d(x, k, groups, (3, 3)))), (0, 1))(x, kernel)
  theirs = jax.grad(lambda x, k: jnp.sum(jnp.sin(reference(x, k))), (0, 1))(x, kernel)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_conv1d_rejects_channels_that_do_not_fit_the_groups():
  with pytest.raises(ValueError, match="do not fit 3 groups"):
    grouped_conv1d(jnp.zeros((1, 4, 8)), jnp.zeros((3, 2, 8)), 3, (1, 1))
