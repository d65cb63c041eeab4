"""`alm-jax compile --mode generate`: the generation program compiled ahead of time, its decode loop found and
its step's roofline set beside the analytic HBM estimate."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from alm_jax import decode_roofline, roofline
from alm_jax.config import ConfigError
from alm_jax.infer import generate_program as gp
from alm_jax.run_config import load_run_config
from alm_jax.sharding import mesh_config_from
from tests.helpers import REPO, TINY, alm_jax

ROWS, PROMPT, NEW = 8, 32, 4


def test_compile_generate_finds_the_decode_loop_and_its_step(tmp_path):
  # The demo model on 8 CPU devices: the default serving mesh splits its 2 kv heads over `tensor`, rows over
  # `data`; a Whisper layer of 3 heads, which 2 does not divide, keeps its heads whole. A subprocess: the CPU
  # device count is fixed when JAX starts. The decode step scans its layers (the TPU choice; tiny.py's CPU
  # choice unrolls them), so the step holds the layer loop.
  out = tmp_path / "generate.json"
  result = alm_jax("compile", "--mode", "generate", "--config", TINY, "--topology", "cpu:8", "--generate-batch",
                   str(ROWS), "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--json", str(out),
                   "--config.model.whisper.num_layers=1", "--config.model.whisper.num_heads=3",
                   "--config.model.llm.decode_scan=True", timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  generate = report["generate"]
  assert generate["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2} and "tensor split" in generate["mesh_choice"]
  assert generate["unsplit"] and all(p.startswith("encoder/whisper/layers/self_attn/") for p in generate["unsplit"])
  decode = generate["decode"]
  assert decode["loop"]["trip_count"] is None and decode["loop"]["source"] == "unknown"
  assert decode["loop"]["op_name"].endswith("/while")
  # The whole program counts the decode loop once: prefill (and encoders) plus one step.
  whole, step = report["roofline"], decode["step"]
  assert any(loop["name"] == decode["loop"]["name"] and loop["trip_count"] is None for loop in whole["loops"])
  assert 0 < step["flops"] < whole["flops"] and 0 < step["hbm_bytes"] < whole["hbm_bytes"]
  assert decode["prefill"]["flops"] == pytest.approx(whole["flops"] - step["flops"])
  # One step runs the 3 scanned layers once each: the LLM's layer scan inside the body, by its trip count.
  assert [loop["trip_count"] for loop in step["loops"]] == [3]
  # Decode MFU's model FLOPs: 2·N per row per step over the devices, N = the decoder (tied: embedding included).
  assert step["model_flops"] > 0 and step["model_flops_source"].startswith("2·N·rows")
  # Analytic: each device's LLM weight shard and its K/V caches [3 layers, 8/4 rows, 32+4-1 slots, 2/2 kv heads,
  # 32 dims] in bf16 (the tied embedding table is the output projection, so it counts).
  analytic = decode["analytic"]
  assert analytic["kv_cache_bytes"] == 2 * 3 * (ROWS // 4) * (PROMPT + NEW - 1) * 1 * 32 * 2
  assert analytic["left_out"] == [] and 0 < analytic["weight_bytes"]
  assert decode["kv_cache"]["verdict"] == "sharded" and decode["kv_cache"]["device_shape"] == [3, 2, 35, 1, 32]
  assert analytic["seconds"] is None and decode["ratio"] is None  # CPU devices: no published peaks
  assert "decode loop: " in result.stdout and "decode step as compiled" in result.stdout
  assert report["memory"]["total"] > 0 and report["fits"] is not False


def test_the_serving_mesh_is_the_largest_tensor_split_every_parameter_divides():
  tiny = load_run_config(TINY)
  layout = gp.generate_layout(tiny.model)
  assert gp.tensor_mesh(layout, tiny.mesh, 8).shape == (4, 1, 2)  # 2 kv heads
  # Qwen2-Audio: the LLM's 32 heads split 8 ways; Whisper-large-v3's 20 heads do not, and stay whole.
  qwen = load_run_config(f"{REPO}/configs/qwen2_audio_7b.py:full")
  qwen_layout = gp.generate_layout(qwen.model)
  serving = gp.tensor_mesh(qwen_layout, qwen.mesh, 8)
  assert serving.shape == (1, 1, 8)
  devices = jax.devices()[:1] * 8  # shardings only: 8 stand-ins for one CPU device
  mesh = jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(1, 1, 8), ("data", "fsdp", "tensor"))
  shardings, whole = gp.serving_shardings(qwen_layout, mesh, serving.logical_rules)
  assert whole and all(p.startswith("encoder/whisper/") and "attn" in p for p in whole)
  q = "encoder/whisper/layers/self_attn/q_proj/kernel"
  assert shardings[q].spec[2] is None and shardings["llm/lm_head/kernel"].spec[1] == "tensor"  # heads whole
  with pytest.raises(ConfigError, match="--mesh: .* does not split LLM parameter"):
    gp.serving_shardings(gp.generate_layout(tiny.model), jax.sharding.Mesh(
        np.asarray(devices[:3], dtype=object).reshape(1, 1, 3), ("data", "fsdp", "tensor")), serving.logical_rules)
  assert gp.tensor_mesh(layout, mesh_config_from({"shape": (1, -1, 1)}), 3) is None  # nothing divides by 3
  assert gp.parse_mesh("1,-1,2", 8) == (1, 4, 2)
  with pytest.raises(ConfigError, match="--mesh"):
    gp.parse_mesh("1,3", 8)


def test_analytic_decode_step_and_ratio():
  peaks = roofline.ChipPeaks("test", flops_per_s=100e12, hbm_bytes_per_s=1e12, ici_bytes_per_s=100e9)
  analytic = decode_roofline.AnalyticDecode(batch=64, num_devices=8, weight_bytes=2 * 10**9,
                                            kv_cache_bytes=3 * 10**9, peaks=peaks)
  assert analytic.seconds == pytest.approx(5e-3)
  assert analytic.tokens_per_s_per_chip == pytest.approx(64 / 5e-3 / 8)
  step = roofline.Roofline(flops=1e11, hbm_bytes=6e9, collectives={}, peaks=peaks)
  loop = roofline.Loop("while", "main", "body", None, "unknown")
  cache = decode_roofline.KVCache((4, 64, 10, 8, 2), (4, 64, 10, 2, 2), 2, 2)
  assert cache.device_bytes == 2 * 4 * 64 * 10 * 2 * 2 * 2
  check = decode_roofline.KVCacheCheck(cache, 2, 0)
  report = decode_roofline.DecodeReport(loop, step, step, analytic, check, new_tokens=16)
  assert report.ratio == pytest.approx(1.2) and report.tokens_per_s_per_chip == pytest.approx(64 / 6e-3 / 8)
  assert "compiled / analytic decode step: 1.20" in report.format() and check.verdict == "sharded"
  whole = decode_roofline.KVCacheCheck(cache, 0, 2)
  assert whole.verdict.startswith("REPLICATED")
  json.dumps(report.to_dict(), default=str)


def test_generate_mode_refuses_train_batch_flags(capsys):
  from alm_jax import cli  # pylint: disable=import-outside-toplevel

  status = cli.main(["compile", "--mode", "generate", "--config", TINY, "--topology", "cpu:1", "--find-max-batch"])
  assert status == 2 and "--generate-batch" in capsys.readouterr().err
