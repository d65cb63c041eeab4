"""The roofline of a compiled step: loop trip counts, FLOPs, HBM and collective bytes, and the times they imply."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alm_jax import aot, roofline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, D = 16, 128  # rows and width of the matmul stacks below


def scanned_stack(layers: int, dtype=jnp.float32):
  """A forward pass of `layers` identical matmul layers as one `lax.scan` over stacked weights."""

  def step(ws, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return h

  return step, (jax.ShapeDtypeStruct((layers, D, D), dtype), jax.ShapeDtypeStruct((B, D), dtype))


def nested_stack(outer: int, inner: int):
  """`outer` groups of `inner` matmul layers: a scan inside a scan."""

  def step(ws, x):
    def group(h, wg):
      h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, wg)
      return h, None

    h, _ = jax.lax.scan(group, x, ws)
    return h

  return step, (jax.ShapeDtypeStruct((outer, inner, D, D), jnp.float32), jax.ShapeDtypeStruct((B, D), jnp.float32))


def compile_cpu(fn, args):
  return jax.jit(fn).lower(*args).compile()


def cost_flops(compiled) -> float:
  return roofline.cost_analysis_flops(compiled)


LAYER_FLOPS = 2 * B * D * D  # one [B, D] @ [D, D]


def test_scan_body_counts_once_per_iteration():
  compiled = compile_cpu(*scanned_stack(6))
  r = roofline.roofline(compiled)
  assert [(loop.trip_count, loop.source) for loop in r.loops] == [(6, "known_trip_count")]
  assert r.flops == 6 * LAYER_FLOPS
  assert cost_flops(compiled) < 1.2 * LAYER_FLOPS  # XLA's cost analysis: the body once
  # The TPU compiler writes no known_trip_count: without it the induction variable gives the same count.
  text = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", compiled.as_text())
  inferred = roofline.analyse_hlo(text)
  assert [(loop.trip_count, loop.source) for loop in inferred.loops] == [(6, "induction variable")]
  assert inferred.flops == r.flops


def test_nested_scans_multiply_trip_counts():
  compiled = compile_cpu(*nested_stack(3, 4))
  module = roofline.parse_module(compiled.as_text())
  counts, _, loops = roofline.multipliers(module)
  assert sorted(loop.trip_count for loop in loops) == [3, 4]
  inner = next(loop for loop in loops if loop.trip_count == 4)
  assert counts[inner.body] == 12 and counts[inner.computation] == 3
  assert roofline.analyse_hlo(compiled.as_text()).flops == 12 * LAYER_FLOPS


def test_scan_reads_a_slice_of_the_stacked_weights_per_layer():
  # Each iteration reads its layer's slice of the [8, D, D] stack, not the stack: the HBM estimate stays
  # within a few times the stack's bytes (it would be 8 times the stack if slices counted the whole operand).
  layers = 8
  r = roofline.roofline(compile_cpu(*scanned_stack(layers)))
  stack = layers * D * D * 4
  assert stack < r.hbm_bytes < 4 * stack


def mlp_and_conv():
  """A loop-free forward and backward pass: three matmuls and a strided, padded 1-D convolution."""

  def loss(params, x, audio):
    for w in params["mlp"]:
      x = jax.nn.gelu(x @ w)
    y = jax.lax.conv_general_dilated(audio, params["conv"], (2,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"))
    return (x**2).mean() + (y**2).mean()

  params = {"mlp": [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((256, 512), (512, 256), (256, 128))],
            "conv": jax.ShapeDtypeStruct((3, 80, 128), jnp.float32)}
  args = (params, jax.ShapeDtypeStruct((64, 256), jnp.float32), jax.ShapeDtypeStruct((4, 300, 80), jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2)), args


def test_flops_and_bytes_match_cost_analysis_without_loops():
  compiled = compile_cpu(*mlp_and_conv())
  r = roofline.roofline(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert r.loops == () and r.cost_analysis_flops == cost["flops"]
  # XLA also counts elementwise work (gelu, squares), which the dot count leaves out: a few % more.
  assert 0.97 * cost["flops"] <= r.flops <= cost["flops"]
  assert abs(r.hbm_bytes - cost["bytes accessed"]) <= 0.1 * cost["bytes accessed"]


def test_unknown_trip_count_counts_once_and_is_listed():
  # A loop over a data-dependent bound: its count is not a constant, so the body counts once.
  def step(n, w, x):
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x)

  args = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((D, D), jnp.float32),
          jax.ShapeDtypeStruct((B, D), jnp.float32))
  r = roofline.analyse_hlo(compile_cpu(step, args).as_text())
  assert [(loop.trip_count, loop.source) for loop in r.loops] == [(None, "unknown")]
  assert r.flops == LAYER_FLOPS and r.unknown_loops == list(r.loops)
  assert "unknown trip counts, counted once" in r.format()


@pytest.mark.parametrize("start,step,limit,op,n", [(0, 1, 32, "LT", 32), (0, 1, 31, "LE", 32), (2, 3, 11, "LT", 3),
                                                   (10, -2, 0, "GT", 5), (10, -2, 0, "GE", 6), (0, 4, 12, "NE", 3),
                                                   (5, 1, 3, "LT", 0), (0, -1, 3, "LT", None)])
def test_induction_variable_counts(start, step, limit, op, n):
  assert roofline._count(start, step, limit, op) == n  # pylint: disable=protected-access


def test_roofline_arithmetic():
  peaks = roofline.ChipPeaks("test", flops_per_s=100e12, hbm_bytes_per_s=1e12, ici_bytes_per_s=100e9)
  traffic = {"all-gather": roofline.CollectiveTraffic(4, 6e9, 3e9),
             "all-reduce": roofline.CollectiveTraffic(1, 1e9, 2e9)}
  r = roofline.Roofline(flops=200e12, hbm_bytes=1e12, collectives=traffic, peaks=peaks, model_flops=150e12,
                        model_flops_source="6·N·tokens")
  assert (r.compute_seconds, r.memory_seconds, r.collective_seconds) == (2.0, 1.0, 0.05)
  assert r.collective_bytes == 5e9
  assert r.seconds == 2.0 and r.bound == "compute" and r.serial_seconds == pytest.approx(3.05)
  assert r.mfu == pytest.approx(150e12 / 2.0 / 100e12) and r.hfu == pytest.approx(1.0)
  text = r.format()
  assert "step >= 2 s (compute-bound, perfect overlap); 3.05 s with no overlap" in text
  assert "MFU 75.0% (6·N·tokens = 1.500e+14)" in text and "all-gather x4" in text
  d = r.to_dict()
  assert (d["seconds"], d["bound"], d["mfu"]) == (2.0, "compute", 0.75) and d["peaks"]["name"] == "test"
  json.dumps(d)
  memory_bound = roofline.Roofline(flops=1e12, hbm_bytes=5e12, collectives={}, peaks=peaks)
  assert memory_bound.seconds == 5.0 and memory_bound.bound == "memory" and memory_bound.mfu is None
  counts_only = roofline.Roofline(flops=1e12, hbm_bytes=5e12, collectives={})
  assert counts_only.seconds is None and counts_only.mfu is None and "counts only" in counts_only.format()


@pytest.mark.parametrize("name,generation", [("v5p:4x4x4", "v5p"), ("v5p-128", "v5p"), ("TPU v5", "v5p"),
                                             ("v5e:4x8", "v5e"), ("v5litepod-16", "v5e"), ("TPU v5 lite", "v5e"),
                                             ("v6e-16", "v6e"), ("TPU v6 lite", "v6e"), ("v4:2x2x2", "v4"),
                                             ("cpu:8", None), ("h100:8", None), ("cpu", None)])
def test_chip_peaks_by_topology_or_device_kind(name, generation):
  peaks = roofline.chip_peaks(name)
  assert (peaks.name if peaks else None) == generation
  if peaks:
    assert peaks.flops_per_s > 1e14 and peaks.hbm_bytes_per_s > 5e11 and peaks.ici_bytes_per_s > 1e11


def test_compile_report_carries_the_roofline():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  compiled = compile_cpu(*scanned_stack(5))
  report = aot.analyse(compiled, mesh, "cpu:1", model_flops=1e9, model_flops_source="given")
  assert report.roofline.flops == 5 * LAYER_FLOPS and report.roofline.peaks is None
  text = report.format()
  assert "flops per device per step" in text and "roofline per device per step (1 loop, trip counts 5)" in text
  d = report.to_dict()
  assert {"target", "memory", "collectives", "flops", "traffic", "fits"} <= set(d)
  assert d["roofline"]["flops"] == 5 * LAYER_FLOPS and d["roofline"]["loops"][0]["trip_count"] == 5
  json.dumps(d, default=str)


# ----------------------------------------------------------------------------
# In a subprocess: 8 CPU devices, or libtpu's v5p description (each needs a fresh JAX).


def collectives_on_8_devices() -> dict:
  """An FSDP-sharded scan on 8 CPU devices: its weights gathered per layer, its gradients reduced per layer."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  layers = 6
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  step, (ws, x) = scanned_stack(layers)
  loss = lambda ws, x: (step(ws, x) ** 2).sum()
  ws = jax.ShapeDtypeStruct(ws.shape, ws.dtype, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("fsdp", None)))
  compiled = jax.jit(jax.grad(loss), out_shardings=ws.sharding).lower(ws, x).compile()
  r = roofline.roofline(compiled, num_devices=8)
  ops = aot.collective_ops(compiled.as_text())
  listed = [(op.kind, op.result_bytes, op.group_size) for op in ops]
  return {"layers": layers, "roofline": r.to_dict(), "listed": listed}


def tpu_scanned_stack() -> dict:
  """A data-parallel forward and backward pass over a scanned bf16 matmul stack, compiled for v5p:2x2x1."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  topology = aot.parse_topology("v5p:2x2x1")
  mesh = jax.sharding.Mesh(np.array(aot.topology_devices(topology)), ("data",))
  layers = 8
  step, (ws, x) = scanned_stack(layers, jnp.bfloat16)
  loss = lambda ws, x: (step(ws, x).astype(jnp.float32) ** 2).sum()
  x = jax.ShapeDtypeStruct((4 * B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None)))
  ws = jax.ShapeDtypeStruct(ws.shape, ws.dtype, sharding=NamedSharding(mesh, P()))
  _, report = aot.compile_and_report(jax.grad(loss), (ws, x), in_shardings=(ws.sharding, x.sharding),
                                     out_shardings=ws.sharding, mesh=mesh, rules=(), topology=topology)
  return {"layers": layers, "roofline": report.roofline.to_dict(), "text": report.format()}


def run_here(mode: str, **env) -> dict:
  """Runs this file with `--<mode>` in a fresh interpreter and returns what it prints as JSON."""
  path = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])  # this checkout's alm_jax
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path, **env)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{mode}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.rpartition("RESULT ")[2])


def test_collectives_in_a_scan_count_per_iteration():
  result = run_here("collectives", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  layers, r = result["layers"], result["roofline"]
  gathers = [op for op in result["listed"] if op[0] == "all-gather"]
  reduces = [op for op in result["listed"] if op[0] == "all-reduce"]
  assert gathers and reduces and all(op[2] == 8 for op in gathers + reduces)
  # Listed once in the program text, executed once per layer: forward and backward gathers, gradient reductions.
  gathered = layers * sum(op[1] for op in gathers)
  reduced = layers * sum(op[1] for op in reduces)
  assert r["collectives"]["all-gather"]["count"] == layers * len(gathers)
  assert r["collectives"]["all-gather"]["result_bytes"] == gathered
  assert r["collectives"]["all-gather"]["wire_bytes"] == pytest.approx(gathered * 7 / 8)
  assert r["collectives"]["all-reduce"]["wire_bytes"] == pytest.approx(reduced * 2 * 7 / 8)
  assert r["flops"] == pytest.approx(3 * layers * 2 * (B // 8) * D * D)  # per device: its rows, forward + backward


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the [tpu] extra)")
def test_tpu_program_trip_counts_and_v5p_times():
  # libtpu is only read here (nothing runs on a TPU): another process holding its lock file does not matter.
  result = run_here("tpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  layers, r = result["layers"], result["roofline"]
  assert sorted(loop["trip_count"] for loop in r["loops"]) == [layers, layers], r["loops"]
  assert all(loop["source"] in ("known_trip_count", "induction variable") for loop in r["loops"])
  per_device = 3 * layers * LAYER_FLOPS  # forward, and two matmuls per layer backward, on B rows per chip
  assert r["flops"] == pytest.approx(per_device, rel=0.01)
  assert r["cost_analysis_flops"] < 0.5 * r["flops"]  # XLA's count sees one iteration of each loop
  assert r["peaks"]["name"] == "v5p" and r["seconds"] == max(r["compute_seconds"], r["memory_seconds"],
                                                              r["collective_seconds"])
  assert r["collectives"]["all-reduce"]["count"] >= layers  # the gradients, one layer at a time
  assert "on v5p (459 TFLOP/s" in result["text"]


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  run = {"--collectives": collectives_on_8_devices, "--tpu": tpu_scanned_stack}[sys.argv[1]]
  print("RESULT " + json.dumps(run(), default=str), flush=True)


MULTILINE_CONFIG_LOOP = """HloModule m

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %k = f32[8,8] custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "x",
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="pallas_call"}
  %y = f32[8,8] dot(%k, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,8]) tuple(%next, %y)
}

%cond (q: (s32[], f32[8,8])) -> pred[] {
  %q = (s32[], f32[8,8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[8,8]) -> (s32[], f32[8,8]) {
  %a = f32[8,8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]) tuple(%zero, %a)
  ROOT %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
}
"""


def test_a_custom_calls_multiline_backend_config_does_not_end_its_computation():
  """Splash's pallas_call carries a backend config whose lines start with `}}`: the loop body goes on after it,
  so its counter and dot are still found (the 7B train step's loops were all `?` before)."""
  r = roofline.analyse_hlo(MULTILINE_CONFIG_LOOP)
  assert [(loop.trip_count, loop.source) for loop in r.loops] == [(7, "induction variable")]
  assert r.flops == 7 * 2 * 8 * 8 * 8


# A KV cache [layers 4, rows 8, slots 64] written at one slot and read back (this layer's slice) in one fusion,
# as the TPU compiler fuses a decode step's cache update with the attention that reads it.
CACHE_UPDATE_AND_READ = """HloModule m

%fused (c: f32[4,8,64], u: f32[1,8,1], l: s32[], s: s32[], q: f32[8,64]) -> (f32[4,8,64], f32[8]) {
  %c = f32[4,8,64] parameter(0)
  %u = f32[1,8,1] parameter(1)
  %l = s32[] parameter(2)
  %s = s32[] parameter(3)
  %q = f32[8,64] parameter(4)
  %z = s32[] constant(0)
  %new = f32[4,8,64] dynamic-update-slice(%c, %u, %l, %z, %s)
  %layer = f32[1,8,64] dynamic-slice(%new, %l, %z, %z), dynamic_slice_sizes={1,8,64}
  %rows = f32[8,64] bitcast(%layer)
  %scores = f32[8] dot(%rows, %q), lhs_batch_dims={0}, lhs_contracting_dims={1}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT %out = (f32[4,8,64], f32[8]) tuple(%new, %scores)
}

ENTRY %main (c: f32[4,8,64], u: f32[1,8,1], l: s32[], s: s32[], q: f32[8,64]) -> (f32[4,8,64], f32[8]) {
  %c = f32[4,8,64] parameter(0)
  %u = f32[1,8,1] parameter(1)
  %l = s32[] parameter(2)
  %s = s32[] parameter(3)
  %q = f32[8,64] parameter(4)
  ROOT %f = (f32[4,8,64], f32[8]) fusion(%c, %u, %l, %s, %q), kind=kOutput, calls=%fused
}
"""


def test_a_cache_updated_in_place_and_read_back_in_one_fusion_reads_its_slice():
  """Writing one slot reads nothing of the cache, but slicing the updated cache for attention reads that layer's
  slice (the 7B decode step's KV read was missing from the compiled estimate when XLA fused the two)."""
  r = roofline.analyse_hlo(CACHE_UPDATE_AND_READ)
  layer_slice, update, query, scalars, written = 8 * 64 * 4, 8 * 4, 8 * 64 * 4, 2 * 4, 8 * 4 + 8 * 4
  assert r.hbm_bytes == layer_slice + update + query + scalars + written
  # A slice the compiler lands in VMEM (`S(1)`) is still read from the cache in HBM.
  in_vmem = CACHE_UPDATE_AND_READ.replace("%layer = f32[1,8,64] dynamic-slice", "%layer = f32[1,8,64]{2,1,0:S(1)} "
                                          "dynamic-slice")
  assert in_vmem != CACHE_UPDATE_AND_READ
  assert roofline.analyse_hlo(in_vmem).hbm_bytes == r.hbm_bytes


# ----------------------------------------------------------------------------
# Subtrees: one decode step of a generation-like program.

PREFIX_FLOPS = 2 * B * D * D  # the one matmul before the loop (a "prefill")


def decode_like(layers: int, loops: int = 1, nested: bool = False):
  """A matmul, then `loops` while loops stopping on a data-dependent condition, each body a scan of `layers`
  matmul layers (`nested`: the body also runs a data-dependent loop of its own)."""

  def fn(w0, ws, x, limit):
    h = jnp.tanh(x @ w0)
    for _ in range(loops):
      def body(state):
        i, h = state
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)
        if nested:
          h = jax.lax.while_loop(lambda h: jnp.sum(h) < limit, lambda h: h * 2.0, h)
        return i + 1, h

      _, h = jax.lax.while_loop(lambda s: (s[0] < 100) & (jnp.sum(s[1]) < limit), body, (jnp.int32(0), h))
    return h

  args = (jax.ShapeDtypeStruct((D, D), jnp.float32), jax.ShapeDtypeStruct((layers, D, D), jnp.float32),
          jax.ShapeDtypeStruct((B, D), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  return fn, args


def test_the_decode_loop_is_the_outermost_loop_of_unknown_count_and_its_body_a_subtree():
  layers = 5
  text = compile_cpu(*decode_like(layers)).as_text()
  module = roofline.parse_module(text)
  loop = roofline.outermost_unknown_loop(module)
  assert loop.trip_count is None and loop.source == "unknown" and loop.body in module.computations
  whole = roofline.analyse_hlo(text)
  step = roofline.analyse_hlo(text, root=loop.body)
  # One iteration: the inner layer scan counted by its trip count; the matmul before the loop left out.
  assert step.flops == layers * LAYER_FLOPS
  assert [(inner.trip_count, inner.source) for inner in step.loops] == [(layers, "known_trip_count")]
  assert whole.flops == PREFIX_FLOPS + layers * LAYER_FLOPS  # the unknown loop counted once
  assert 0 < step.hbm_bytes < whole.hbm_bytes
  prefill = whole.minus(step)
  assert prefill.flops == PREFIX_FLOPS and prefill.hbm_bytes == whole.hbm_bytes - step.hbm_bytes
  counts, _, _ = roofline.multipliers(module, root=loop.body)
  assert counts[loop.body] == 1.0 and module.entry not in counts and loop.computation not in counts
  with pytest.raises(KeyError, match="no computation named"):
    roofline.multipliers(module, root="nowhere")


def test_a_nested_unknown_loop_is_not_the_decode_loop():
  text = compile_cpu(*decode_like(3, nested=True)).as_text()
  module = roofline.parse_module(text)
  _, _, loops = roofline.multipliers(module)
  assert sorted(loop.trip_count is None for loop in loops) == [False, True, True]
  loop = roofline.outermost_unknown_loop(module)
  assert loop.computation == module.entry
  step = roofline.analyse_hlo(text, root=loop.body)
  assert step.flops == 3 * LAYER_FLOPS and len(step.unknown_loops) == 1  # the inner one, inside the step


def test_no_or_several_candidate_decode_loops_raise():
  two = roofline.parse_module(compile_cpu(*decode_like(2, loops=2)).as_text())
  with pytest.raises(roofline.LoopNotFound, match="2 outermost loops with unknown trip counts"):
    roofline.outermost_unknown_loop(two)
  none = roofline.parse_module(compile_cpu(*scanned_stack(4)).as_text())
  with pytest.raises(roofline.LoopNotFound, match="no while loop with an unknown"):
    roofline.outermost_unknown_loop(none)


DECODE_COLLECTIVES = """HloModule m

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %r = f32[8,8] all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,8]) tuple(%next, %r)
}

%cond (q: (s32[], f32[8,8])) -> pred[] {
  %q = (s32[], f32[8,8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %y = f32[8,8] get-tuple-element(%q), index=1
  %n = s32[] convert(%y)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[8,8]) -> (s32[], f32[8,8]) {
  %a = f32[8,8] parameter(0)
  %g = f32[32,8] all-gather(%a), replica_groups={{0,1,2,3}}, dimensions={0}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]) tuple(%zero, %a)
  ROOT %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
}
"""


def test_a_subtree_counts_only_its_own_collectives():
  module = roofline.parse_module(DECODE_COLLECTIVES)
  loop = roofline.outermost_unknown_loop(module)
  assert loop.name == "w" and loop.body == "body"
  step = roofline.analyse_hlo(DECODE_COLLECTIVES, num_devices=4, root=loop.body)
  assert step.collectives["all-gather"].count == 0 and step.collectives["all-reduce"].count == 1
  assert step.collective_bytes == pytest.approx(8 * 8 * 4 * 2 * 3 / 4)
  whole = roofline.analyse_hlo(DECODE_COLLECTIVES, num_devices=4)
  assert whole.collectives["all-gather"].count == 1 and whole.collectives["all-reduce"].count == 1
  assert whole.minus(step).collectives["all-reduce"].count == 0
