"""Meshes, logical-axis rules and the sufficiently-sharded check.

The sharded-training parity harness lives in `parity_harness.py` (the production
step: `ParamLayout` + `make_optimizer` + `jit_train_step`); the audio-language
model's mesh x precision x accumulation matrix, and where its step puts
parameters, optimizer state and collectives, are in test_alm_sharding*.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from alm_jax import sharding
from alm_jax.config import ConfigError
from alm_jax.models import layers, partitioning
from alm_jax.params import ParamLayout

# ----------------------------------------------------------------------------
# The small test transformer (built only from alm_jax.models.layers).


class Block(nnx.Module):
  """Pre-LN transformer block: attention and MLP with residuals."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.ln1 = layers.LayerNorm(dim, rngs=rngs)
    self.attn = layers.MultiHeadAttention(dim, heads, rngs=rngs)
    self.ln2 = layers.LayerNorm(dim, rngs=rngs)
    self.mlp = layers.MLP(dim, 4 * dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    x = partitioning.constrain(x, ("batch", "length", "embed"))
    return x + self.mlp(self.ln2(x))


class TinyTransformer(nnx.Module):
  """Token embedding, `depth` blocks, final norm, tied output projection."""

  def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 8, depth: int = 2, *, rngs: nnx.Rngs):
    self.embed = layers.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
    self.ln = layers.LayerNorm(dim, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = partitioning.constrain(self.embed(ids), ("batch", "length", "embed"))
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln(x))

  def loss(self, batch):
    """Mean token cross-entropy of `labels` given `ids`, with the metrics the train step reads."""
    logits = self(batch["ids"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    count = jnp.asarray(batch["labels"].size, jnp.float32)
    return loss, {"loss": loss, "target_tokens": count, "tokens": count, "token_accuracy": jnp.zeros(())}


# ----------------------------------------------------------------------------
# Rules and mesh configs (this process, one device).


def test_rules_cover_every_logical_axis_once():
  names = [name for name, _ in sharding.DEFAULT_RULES]
  assert sorted(names) == sorted(partitioning.LOGICAL_AXES)
  assert len(names) == len(set(names))
  rules = dict(sharding.make_rules())
  assert set(rules) == set(partitioning.LOGICAL_AXES)
  for target in rules.values():
    for axis in (target,) if isinstance(target, str) else (target or ()):
      assert axis in sharding.MESH_AXES
  assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp" and rules["norm"] is None


def test_rule_overrides_and_their_errors():
  rules = dict(sharding.make_rules({"embed": None, "length": "tensor", "mlp": ["fsdp", "tensor"]}))
  assert rules["embed"] is None and rules["length"] == "tensor" and rules["mlp"] == ("fsdp", "tensor")
  with pytest.raises(ConfigError, match=r"config\.mesh\.rules\.embedding"):
    sharding.make_rules({"embedding": "fsdp"})
  with pytest.raises(ConfigError, match=r"config\.mesh\.rules\.mlp.*unknown mesh axis 'model'"):
    sharding.mesh_config_from({"rules": {"mlp": "model"}})


@pytest.mark.parametrize(
    "values,pattern",
    [
        ({"shape": (2, -1, -1)}, r"config\.mesh\.shape: at most one -1"),
        ({"shape": (2, 0, 1)}, r"config\.mesh\.shape: sizes must be positive"),
        ({"shape": (2, 4)}, r"config\.mesh\.shape: needs 3 sizes"),
        ({"shape": "2x4"}, r"config\.mesh\.shape: expected a sequence"),
        ({"shapes": (1, 1, 1)}, r"config\.mesh\.shapes: unknown key"),
        ({"shape": (1, -1, 1), "dcn_shape": (-1, 1, 1)}, r"config\.mesh\.shape: at most one -1"),
    ],
)
def test_mesh_config_rejects_bad_values(values, pattern):
  with pytest.raises(ConfigError, match=pattern):
    sharding.mesh_config_from(values)


def test_resolve_shape_fills_minus_one_and_rejects_impossible():
  assert sharding.resolve_shape((1, -1, 1), 8) == (1, 8, 1)
  assert sharding.resolve_shape((2, -1, 2), 8) == (2, 2, 2)
  assert sharding.resolve_shape((-1, 1, 1), 1) == (1, 1, 1)
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape: \(3, -1, 1\) cannot cover 8 devices"):
    sharding.resolve_shape((3, -1, 1), 8)
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape: \(2, 2, 1\) multiplies to 4 but there are 8"):
    sharding.resolve_shape((2, 2, 1), 8)


def test_make_mesh_rejects_impossible_shape_before_compiling():
  mesh = sharding.make_mesh({"shape": (1, -1, 1)})
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (1, len(jax.devices()), 1)
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape"):
    sharding.make_mesh({"shape": (2, 2, 2)}, jax.devices()[:1])


def _layout() -> ParamLayout:
  return ParamLayout(lambda rngs: TinyTransformer(rngs=rngs))


def test_partition_specs_of_the_tiny_transformer_and_its_optimizer_state():
  from alm_jax.train.optimizer import OptimizerConfig, abstract_opt_state, make_optimizer

  rules = sharding.make_rules()
  layout = _layout()
  specs = {p: layout.spec(p, rules) for p in layout.paths}
  assert specs["embed/embedding"] == P("tensor", "fsdp")
  assert specs["blocks/0/attn/q_proj/kernel"] == P("fsdp", "tensor", None)
  assert specs["blocks/0/attn/q_proj/bias"] == P("tensor", None)
  assert specs["blocks/1/attn/out_proj/kernel"] == P("tensor", None, "fsdp")
  assert specs["blocks/0/mlp/fc1/kernel"] == P("fsdp", "tensor")
  assert specs["blocks/0/mlp/fc2/kernel"] == P("tensor", "fsdp")
  assert specs["blocks/0/ln1/scale"] == P(None)
  # Optimizer moments take their parameter's sharding; the step count is replicated.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  abstract = layout.abstract_sharded(mesh, rules)
  tx = make_optimizer(OptimizerConfig(), {p: layout.abstract[p] for p in layout.paths}, total_steps=10)
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract_opt_state(tx, abstract))[0]:
    name = next((k.key for k in reversed(keypath) if isinstance(k, jax.tree_util.DictKey)), None)
    assert leaf.sharding.spec == (specs[name] if name in specs else P()), jax.tree_util.keystr(keypath)
  # Rule overrides flow through.
  replicated = sharding.make_rules({"embed": None, "vocab": None})
  assert layout.spec("embed/embedding", replicated) == P(None, None)


def test_check_divisible_names_the_offending_parameter():
  layout = _layout()
  mesh = AbstractMesh((1, 1, 3), sharding.MESH_AXES)  # 8 heads, 512 mlp, 256 vocab: none divide by 3
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape: parameter .* is not divisible by mesh axes tensor \(3\)"):
    layout.check_divisible(mesh, sharding.make_rules())
  layout.check_divisible(AbstractMesh((1, 4, 2), sharding.MESH_AXES), sharding.make_rules())


def _abstract_on(shape, rules):
  mesh = AbstractMesh(tuple(shape), sharding.MESH_AXES)
  layout = _layout()
  return {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, layout.spec(p, rules)))
          for p, a in layout.abstract.items()}, mesh


def test_assert_params_sufficiently_sharded():
  rules = sharding.make_rules()
  params, mesh = _abstract_on((1, 8, 1), rules)
  summary = sharding.assert_params_sufficiently_sharded(params, mesh, tolerance=0.1)
  assert summary.total_params == sum(int(np.prod(x.shape)) for x in params.values())
  assert 0 < summary.excess < 0.1
  unsharded, mesh = _abstract_on((1, 8, 1), sharding.make_rules({"embed": None}))
  with pytest.raises(ConfigError, match=r"config\.mesh\.rules: parameters are .* above perfect sharding"):
    sharding.assert_params_sufficiently_sharded(unsharded, mesh)


def test_train_and_compile_refuse_a_mostly_unsharded_model(tmp_path):
  """The documented check is real: `alm-jax train` and `alm-jax compile` stop before compiling."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from tests.helpers import FAST_XLA, REPO, TINY, cli_env, make_corpus  # pylint: disable=import-outside-toplevel

  corpus = make_corpus(str(tmp_path / "corpus"), n=12)
  flags = ["--config", TINY + ":micro", "--config.mesh.shape=(1,4,1)", "--config.mesh.rules.embed=None",
           "--config.mesh.rules.mlp=None", "--config.mesh.rules.vocab=None", "--config.mesh.rules.heads=None",
           "--config.mesh.rules.kv_heads=None", f"--config.data.path={corpus}"]
  env = cli_env(XLA_FLAGS=FAST_XLA + " --xla_force_host_platform_device_count=4")
  for command in (["train", "--workdir", str(tmp_path / "run")], ["compile", "--topology", "cpu:4"]):
    proc = subprocess.run([sys.executable, "-m", "alm_jax", *command, *flags], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, command
    assert "config.mesh.rules: parameters are" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_batch_that_does_not_split_is_a_config_error():
  mesh = AbstractMesh((2, 4, 1), sharding.MESH_AXES)
  batch = {"ids": np.zeros((6, 16), np.int32)}
  shardings = sharding.batch_shardings(batch, mesh, sharding.make_rules())
  assert shardings["ids"].spec == P(("data", "fsdp"), None)
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape: batch field ids has size 6 .* \('data', 'fsdp'\)=8"):
    sharding.check_batch(batch, shardings, mesh)
