"""Where generation runs: `--mesh` parsing, the mesh and dtype a checkpoint implies, batch groups."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from alm_jax import sharding as sharding_lib
from alm_jax.config import ConfigError
from alm_jax.infer import placement


@pytest.mark.parametrize("text,shape", [("8,1,1", (8, 1, 1)), ("(1, -1, 1)", (1, -1, 1)), ("1x1x8", (1, 1, 8))])
def test_parse_mesh(text, shape):
  assert placement.parse_mesh(text) == shape


def test_bad_mesh_is_a_one_line_error_naming_the_flag():
  with pytest.raises(ConfigError, match="--mesh"):
    placement.parse_mesh("eight")
  with pytest.raises(ConfigError, match="config.mesh.shape"):
    placement.mesh_config(None, "2,2")


def test_mesh_config_starts_from_the_checkpoint_and_takes_flag_and_overrides():
  stored = {"mesh": {"shape": (1, -1, 1), "dcn_shape": (1, 1, 1), "rules": {"heads": "tensor"},
                     "sharding_tolerance": 0.1}}
  config = placement.mesh_config(stored, None)
  assert config.shape == (1, -1, 1) and config.sharding_tolerance == 0.1
  config = placement.mesh_config(stored, "1,1,-1", {"mesh.rules.batch": "('data', 'fsdp')"})
  assert config.shape == (1, 1, -1)
  assert dict(config.logical_rules)["batch"] == ("data", "fsdp")
  assert placement.mesh_config(None, None).shape == sharding_lib.MeshConfig().shape  # no stored mesh: defaults
  with pytest.raises(ConfigError, match="config.train.steps"):
    placement.mesh_config(stored, None, {"train.steps": "3"})


def test_inference_dtype_follows_flag_then_training_then_release():
  assert placement.inference_dtype({"train": {"compute_dtype": "bfloat16"}}, None) == "bfloat16"
  assert placement.inference_dtype({"train": {"compute_dtype": "bfloat16"}}, "float32") == "float32"
  assert placement.inference_dtype({"hf": {"config": {"torch_dtype": "bfloat16"}}}, None) == "bfloat16"
  assert placement.inference_dtype({"hf": {"config": {"dtype": "float32"}}}, None) == "float32"
  assert placement.inference_dtype({}, None) == "float32"
  with pytest.raises(ConfigError, match="--dtype"):
    placement.inference_dtype({}, "float16")


def test_one_process_is_one_group_holding_every_row():
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(shape=(1, 1, 1)), devices=jax.devices()[:1])
  group = placement.batch_group(mesh, sharding_lib.MeshConfig().logical_rules)
  assert group == placement.BatchGroup(index=0, count=1, leader=True)
  rows = np.arange(12).reshape(6, 2)
  array = jax.device_put(rows, NamedSharding(mesh, PartitionSpec("data")))
  np.testing.assert_array_equal(placement.local_rows(array), rows)
