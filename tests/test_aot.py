"""Ahead-of-time compilation for TPU topologies (libtpu, no TPU) and CPU-modelled GPU meshes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alm_jax import aot
from alm_jax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "text,name,devices",
    [
        ("v5p:4x4x4", "v5p:4x4x4", 64),
        ("v5p-128", "v5p:4x4x4", 64),  # Cloud TPU counts TensorCores: 2 per v5p chip
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-32", "v5p:2x2x4", 16),
        ("v4-16", "v4:2x2x2", 8),
        ("v5e-32", "v5e:4x8", 32),
        ("v6e:4x4", "v6e:4x4", 16),
    ],
)
def test_parse_tpu_topologies(text, name, devices):
  topology = aot.parse_topology(text)
  assert (topology.platform, topology.topology_name, topology.num_devices) == ("tpu", name, devices)
  assert topology.hbm_bytes and topology.hbm_bytes >= 16 * aot.GIB


def test_parse_gpu_models_and_errors():
  h100 = aot.parse_topology("h100:8", num_slices=2)
  assert (h100.platform, h100.num_devices, h100.hbm_bytes) == ("cpu", 16, 80 * aot.GB)
  assert aot.parse_topology("cpu:4", hbm_gib=2).hbm_bytes == 2 * aot.GIB
  for bad, pattern in [("v5p:4x4", "3 dimensions"), ("v5p-96", "give the slice shape"), ("tpu7", "cannot parse"),
                       ("cpu:0", "at least one device")]:
    with pytest.raises(ConfigError, match=f"--topology: .*{pattern}"):
      aot.parse_topology(bad)


HLO = """HloModule jit_step, is_scheduled=true

%all-reduce-scatter.1 (input.1: f32[512,128]) -> f32[512,32] {
  %input.1 = f32[512,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.9 = f32[512,128]{0,1:T(8,128)} all-reduce(%input.1), channel_id=64, replica_groups={{0,1,2,3}}
  ROOT %dynamic-slice = f32[512,32]{0,1} dynamic-slice(%all-reduce.9, %c, %d), dynamic_slice_sizes={512,32}
}

%wrapped_reduce_scatter (p: bf16[64,256]) -> bf16[16,256] {
  %p = bf16[64,256]{1,0} parameter(0)
  ROOT %reduce-scatter.2 = bf16[16,256]{1,0} reduce-scatter(%p), dimensions={0}, to_apply=%add
}

ENTRY %main.1 (param: f32[16,512], param.1: s32[2,16]) -> f32[] {
  %param = f32[16,512]{1,0} parameter(0), sharding={devices=[8,1]<=[8]}, metadata={op_name="params['mlp']['fc1']['kernel'].value"}
  %param.1 = s32[2,16]{1,0} parameter(1), sharding={devices=[4,1]<=[4]}, metadata={op_name="batch['ids']"}
  %all-gather-start = (f32[16,512]{1,0}, f32[128,512]{1,0}) all-gather-start(%param), dimensions={0}
  %all-gather-done = f32[128,512]{1,0} all-gather-done(%all-gather-start)
  %fusion.3 = f32[512,32]{0,1:T(8,128)} fusion(%x), kind=kCustom, calls=%all-reduce-scatter.1
  %async-start = ((bf16[64,256]), bf16[16,256], u32[]) async-start(%y), calls=%wrapped_reduce_scatter
  %all-reduce.1 = f32[] all-reduce(%z), replica_groups={}, to_apply=%add
  %all-to-all.2 = (f32[1,1,16,16]{3,2,1,0}, f32[1,1,16,16]{3,2,1,0}) all-to-all(%a, %b), dimensions={0}
  %collective-permute-start.1 = (f32[8]{0}, f32[8]{0}) collective-permute-start(%w), source_target_pairs={{0,1}}
  %collective-permute-done.1 = f32[8]{0} collective-permute-done(%collective-permute-start.1)
  ROOT %r = f32[] add(%all-reduce.1, %all-reduce.1)
}
"""


def test_count_collectives_reads_async_pairs_and_fused_reduce_scatter():
  stats = aot.count_collectives(HLO)
  assert {k: v.count for k, v in stats.items()} == {
      "all-gather": 1, "reduce-scatter": 2, "all-reduce": 1, "all-to-all": 1, "collective-permute": 1}
  assert stats["all-gather"].result_bytes == 128 * 512 * 4  # the gathered array, not the start op's operand
  assert stats["collective-permute"].result_bytes == 8 * 4
  assert stats["reduce-scatter"].result_bytes == 512 * 32 * 4 + 16 * 256 * 2
  assert stats["all-reduce"].result_bytes == 4
  assert aot.entry_parameter_shapes(HLO) == [("params['mlp']['fc1']['kernel'].value", (16, 512)),
                                            ("batch['ids']", (2, 16))]


def test_collectives_split_into_weights_and_activations():
  ops = aot.collective_ops(HLO)
  assert [op.kind for op in ops] == ["reduce-scatter", "all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                     "collective-permute"]  # program order: the wrapped reduce-scatter comes first
  assert ops[1].arrays == (("f32", (128, 512)),) and ops[1].op_name == ""
  # A [128, 512] weight on 8 devices: whole, or split in 2, 4 or 8 over the mesh's axes.
  counts = aot.parameter_sized_counts([(128, 512)], {"data": 2, "fsdp": 4, "tensor": 1})
  assert counts == {128 * 512 // d for d in (1, 2, 4, 8)}
  split = aot.classify_collectives(ops, counts)  # the fused reduce-scatter's f32[512,32] is a quarter
  assert [op.kind for op in split[aot.WEIGHTS]] == ["all-gather", "reduce-scatter"]
  assert [op.kind for op in split[aot.ACTIVATIONS]] == ["reduce-scatter", "all-reduce", "all-to-all",
                                                        "collective-permute"]
  # A combined op holding a weight and an activation is split between the two.
  mixed = aot.CollectiveOp("all-reduce", (("f32", (128, 512)), ("bf16", (7, 3)), ("s32", (4, 4))), "x")
  split = aot.classify_collectives([mixed], counts)
  assert split[aot.WEIGHTS][0].result_bytes == 128 * 512 * 4 and split[aot.ACTIVATIONS][0].result_bytes == 42
  assert split[aot.INDICES][0].arrays == (("s32", (4, 4)),)  # integers are never weights here


def test_memory_report_totals_and_verdict():
  report = aot.MemoryReport(arguments=10 * aot.GIB, outputs=10 * aot.GIB, aliased=9 * aot.GIB,
                            temporaries=4 * aot.GIB, generated_code=0, hbm=16 * aot.GIB)
  assert report.total == 15 * aot.GIB and report.fits
  assert "93.8% used: fits" in report.format()
  tight = aot.MemoryReport(arguments=10 * aot.GIB, outputs=10 * aot.GIB, aliased=0, temporaries=0, generated_code=0,
                           hbm=16 * aot.GIB)
  assert not tight.fits and "does NOT fit: needs 20.00 GiB of 16.00 GiB" in tight.format()


# ----------------------------------------------------------------------------
# Real compiles, in a subprocess (libtpu's topology description; a fresh CPU device count).


def compile_tiny(topology_text: str, shape: tuple[int, ...], dcn_shape: tuple[int, ...] = (1, 1, 1),
                 num_slices: int = 1) -> dict:
  """Compiles the test transformer's production train step for `topology_text` on mesh `shape`; returns the report."""
  import jax
  import numpy as np

  from alm_jax import sharding
  from alm_jax.params import ParamLayout
  from alm_jax.train.optimizer import OptimizerConfig, abstract_opt_state, make_optimizer
  from alm_jax.train.step import make_train_step
  from test_sharding import TinyTransformer

  topology = aot.parse_topology(topology_text, num_slices=num_slices)
  aot.prepare_host(topology)
  mesh = sharding.make_mesh({"shape": shape, "dcn_shape": dcn_shape}, aot.topology_devices(topology))
  rules = sharding.make_rules()
  layout = ParamLayout(lambda r: TinyTransformer(depth=1, rngs=r))
  params = layout.abstract_sharded(mesh, rules)
  tx = make_optimizer(OptimizerConfig(), dict(layout.abstract), total_steps=10)
  opt_state = abstract_opt_state(tx, params)
  batch = {"ids": jax.ShapeDtypeStruct((16, 32), np.int32), "labels": jax.ShapeDtypeStruct((16, 32), np.int32)}
  batch_shardings = sharding.batch_shardings(batch, mesh, rules)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()}
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  step = make_train_step(layout, tx)
  _, report = aot.compile_and_report(
      step, (params, {}, opt_state, batch), in_shardings=(shardings(params), {}, shardings(opt_state), batch_shardings),
      out_shardings=(shardings(params), shardings(opt_state), None), mesh=mesh, rules=rules, donate_argnums=(0, 2),
      topology=topology)
  print(report.format(), flush=True)
  state = list(params.values()) + jax.tree.leaves(opt_state)
  result = report.to_dict()
  result["state_shard_bytes"] = sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in state)
  result["state_bytes"] = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in state)
  return result


def _run_compile(topology_text: str, shape: tuple[int, ...], dcn_shape=(1, 1, 1), num_slices=1) -> tuple[dict, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TPU_SKIP_MDS_QUERY="1")
  from tests.helpers import FAST_XLA  # pylint: disable=import-outside-toplevel

  env["XLA_FLAGS"] = FAST_XLA  # speeds up CPU compiles only; TPU compiles are unaffected
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--compile", topology_text, json.dumps(shape),
       json.dumps(dcn_shape), str(num_slices)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  text, _, payload = proc.stdout.rpartition("REPORT ")
  return json.loads(payload), text


@pytest.mark.slow
def test_compile_for_a_tpu_topology_reports_memory_and_collectives():
  report, text = _run_compile("v5p:2x2x1", (1, -1, 1))
  print(text)
  assert report["num_devices"] == 4 and report["mesh_shape"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert "per-device memory:" in text and "HBM per device" in text and "reduce-scatter" in text
  memory = report["memory"]
  # Sharded state in, sharded state out: arguments cover the state's shards (TPU tiles pad small arrays)
  # but stay well below the unsharded state.
  assert report["state_shard_bytes"] <= memory["arguments"] < report["state_bytes"]
  assert memory["aliased"] > 0 and memory["total"] < memory["hbm"]
  # FSDP on TPU: weights gathered before use, gradients reduce-scattered.
  assert report["collectives"]["all-gather"]["count"] > 0
  assert report["collectives"]["reduce-scatter"]["count"] > 0


@pytest.mark.slow
def test_compile_for_cpu_modelled_gpu_nodes():
  # Two "nodes" of two GPUs: FSDP inside a node, data parallel across nodes.
  report, text = _run_compile("h100:2", (1, 2, 1), dcn_shape=(2, 1, 1), num_slices=2)
  assert report["num_devices"] == 4 and report["memory"]["hbm"] == 80 * aot.GB
  assert report["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["state_shard_bytes"] <= report["memory"]["arguments"] <= report["state_shard_bytes"] * 1.2 + 4096
  assert report["collectives"]["all-gather"]["count"] > 0


# The choices a TPU config makes (configs/qwen2_audio_7b.py); the demo config itself is set for CPUs.
TPU_CHOICES = ("--config.model.frontend.method=matmul", "--config.model.frontend.examples_per_step=0",
               "--config.model.whisper.attention_block=0")


@pytest.mark.slow
def test_compile_command_compiles_the_real_alm_train_step(tmp_path):
  # `alm-jax compile` on the demo model (micro size): the step `alm-jax train` runs, for 4 and 8 v5p chips
  # with one row per chip. Data parallelism through every tower: the 8-chip program's collectives carry
  # weights, gradients and token ids, and no more activation data than the 4-chip one's (a gather of the
  # global batch of clips, frames or tokens would double).
  from tests.helpers import TINY, alm_jax  # pylint: disable=import-outside-toplevel

  reports = {}
  for topology, rows in (("v5p:2x2x1", 4), ("v5p:2x2x2", 8)):
    out = tmp_path / f"{topology}.json"
    # The projector stage: a real train step (backward through the LLM), compiled faster than `full`.
    result = alm_jax("compile", "--config", TINY + ":micro,projector", "--topology", topology, "--json", str(out),
                     "--config.mesh.shape=(1,-1,1)", f"--config.data.batch_size={rows}", *TPU_CHOICES, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "per-device memory:" in result.stdout and "collective results by what they carry" in result.stdout
    assert "warning" not in result.stdout
    reports[topology] = json.loads(out.read_text())
  report = reports["v5p:2x2x1"]
  assert report["num_devices"] == 4 and report["mesh_shape"]["fsdp"] == 4
  assert 0 < report["memory"]["total"] < report["memory"]["hbm"]
  assert report["collectives"]["all-gather"]["count"] > 0
  small, large = (reports[t]["traffic"] for t in ("v5p:2x2x1", "v5p:2x2x2"))
  assert large[aot.WEIGHTS]["result_bytes"] > 0
  assert large[aot.ACTIVATIONS]["result_bytes"] <= small[aot.ACTIVATIONS]["result_bytes"] * 1.01 + 64, (
      reports["v5p:2x2x2"]["largest_activation_collectives"])


if __name__ == "__main__" and "--compile" in sys.argv:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  topology_arg, shape_arg, *rest = sys.argv[sys.argv.index("--compile") + 1:]
  rest += ["[1, 1, 1]", "1"][len(rest):]
  dcn_arg, slices_arg = rest[:2]
  out = compile_tiny(topology_arg, tuple(json.loads(shape_arg)), tuple(json.loads(dcn_arg)), int(slices_arg))
  print("REPORT " + json.dumps(out, default=str), flush=True)

