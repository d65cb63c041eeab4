"""Name maps and safetensors streaming: round trips and one-line mismatch errors."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from alm_jax.checkpoints import mapping
from alm_jax.checkpoints.safetensors_io import SafetensorsReader, write_safetensors
from alm_jax.errors import CheckpointError
from alm_jax.models import layers, stack


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = layers.MultiHeadAttention(8, 2, k_bias=False, rngs=rngs)
    self.norm = layers.LayerNorm(8, rngs=rngs)


class Tower(nnx.Module):

  def __init__(self, n, rngs, scan=False):
    self.layers = stack.build(Block, n, rngs, scan=scan)


NAMES = mapping.NameMap(
    "toy",
    [
        mapping.Rule("layers/{i}/attn/{p}_proj/kernel".replace("{p}", p), f"enc.{{i}}.{p}.weight", mapping.LINEAR)
        for p in "qkv"
    ]
    + [
        mapping.Rule("layers/{i}/attn/q_proj/bias", "enc.{i}.q.bias", mapping.RESHAPE),
        mapping.Rule("layers/{i}/attn/v_proj/bias", "enc.{i}.v.bias", mapping.RESHAPE),
        mapping.Rule("layers/{i}/attn/out_proj/kernel", "enc.{i}.o.weight", mapping.LINEAR_IN2),
        mapping.Rule("layers/{i}/attn/out_proj/bias", "enc.{i}.o.bias"),
        mapping.Rule("layers/{i}/norm/scale", "enc.{i}.ln.weight"),
        mapping.Rule("layers/{i}/norm/bias", "enc.{i}.ln.bias"),
    ],
    ignore=[r"^decoder\."],
)


def test_export_import_round_trip_through_sharded_safetensors(tmp_path):
  model = Tower(3, nnx.Rngs(0))
  flat = mapping.flat_paths(model)
  files = write_safetensors(str(tmp_path), mapping.export_params(flat, NAMES), max_shard_bytes=2000)
  assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
  reader = SafetensorsReader(str(tmp_path))
  # A torch-layout check: q weight is (out, in) = (8, 8) and equals kernel.T.
  np.testing.assert_array_equal(reader.get("enc.1.q.weight"), np.asarray(model.layers[1].attn.q_proj.kernel[...]).reshape(8, 8).T)
  loaded = mapping.import_params(flat, NAMES, reader)
  for path, leaf in flat.items():
    np.testing.assert_array_equal(loaded[path], np.asarray(leaf[...]))


def test_stacked_layers_export_and_import_under_the_per_layer_names(tmp_path):
  """A scanned tower (`layers/attn/q_proj/kernel` [N, ...]) writes and reads the same tensors, under the
  same per-layer names, as the unrolled tower holding the same weights."""
  unrolled = Tower(3, nnx.Rngs(0))
  stacked_flat = mapping.flat_paths(Tower(3, nnx.Rngs(1), scan=True))
  assert mapping.split_stacked("layers/attn/q_proj/kernel") == ("layers", "attn/q_proj/kernel")
  assert mapping.split_stacked("layers/2/attn/q_proj/kernel") is None
  view = mapping.layer_view(stacked_flat)
  assert set(view) == set(mapping.flat_paths(unrolled))
  assert view["layers/2/norm/bias"] == mapping.LayerEntry("layers/norm/bias", 2, (8,))
  write_safetensors(str(tmp_path), mapping.export_params(mapping.flat_paths(unrolled), NAMES))
  reader = SafetensorsReader(str(tmp_path))
  placed = []
  loaded = mapping.import_params(stacked_flat, NAMES, reader, place=lambda p, a: placed.append(p) or a)
  assert sorted(placed) == sorted(stacked_flat)  # each stacked parameter placed once, all layers in
  for path, entry in view.items():
    np.testing.assert_array_equal(loaded[entry.path][entry.index], np.asarray(mapping.flat_paths(unrolled)[path][...]))
  exported = dict(mapping.export_params(loaded, NAMES))
  for name in reader.keys():
    np.testing.assert_array_equal(exported[name], reader.get(name))
  del exported["enc.1.q.weight"]
  write_safetensors(str(tmp_path / "short"), iter(exported.items()))
  with pytest.raises(CheckpointError, match=r"enc\.1\.q\.weight: missing from checkpoint \(needed for layers/1/attn/q_proj/kernel\)"):
    mapping.import_params(stacked_flat, NAMES, SafetensorsReader(str(tmp_path / "short")))


def test_mismatches_are_collected_and_named(tmp_path):
  model = Tower(2, nnx.Rngs(0))
  flat = mapping.flat_paths(model)
  tensors = dict(mapping.export_params(flat, NAMES))
  del tensors["enc.1.v.weight"]
  tensors["enc.0.ln.weight"] = np.zeros(7, np.float32)
  tensors["extra.weight"] = np.zeros(1, np.float32)
  tensors["decoder.x"] = np.zeros(1, np.float32)  # ignored on purpose
  write_safetensors(str(tmp_path), tensors.items())
  with pytest.raises(CheckpointError) as err:
    mapping.import_params(flat, NAMES, SafetensorsReader(str(tmp_path)))
  message = str(err.value)
  assert "\n" not in message
  assert "enc.1.v.weight: missing" in message
  assert "enc.0.ln.weight: shape (7,)" in message
  assert "extra.weight: unexpected" in message
  assert "decoder.x" not in message
