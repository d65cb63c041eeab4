"""Decode speed of our jitted generation vs transformers `generate` (PyTorch CPU), same random weights, and of
our generation over 8 CPU devices (data- and tensor-parallel meshes) vs one device.

A random Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads / 2 kv
heads, FFN 4864, vocab 151936, tied, float32) generates greedy tokens from a
32-token prompt with no stop token, so every side does all the steps. Decode
tokens/s = batch × (new − 1) / (time for `new` new tokens − time for 1 new
token), i.e. the prefill and first token are excluded; compilation is timed
separately (ahead of time) and excluded.

Part 1, ours vs transformers at batch 1, 8 and 32 (128 new tokens):
transformers runs under `torch.inference_mode` with the faster of 1 or all
torch threads (its OpenMP threads degrade sharply when other processes share
the cores); the two sides are interleaved so they see the same load.

Part 2, meshes: a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`
(the flag must be set before jax starts) rebuilds the same model and runs
`generate(..., mesh=...)` on
  * data parallel, mesh (8, 1, 1): the batch (32) split 8 ways, weights replicated;
  * tensor parallel, mesh (1, 1, 8): FFN (4864) and vocabulary (151936) split 8
    ways at batch 8; the 14 query / 2 KV heads do not divide by 8, so these
    rules keep attention whole (replicated) and only the MLP and logits split;
  * tensor parallel, mesh (1, 1, 2), default rules: everything Megatron-split
    (7 query heads, 1 KV head, half the FFN and vocabulary per device);
each against the same program on a (1, 1, 1) mesh over one of those devices,
interleaved. The 8 "devices" are threads sharing this machine's cores and
memory, so this measures the partitioned program's overheads on one host, not
the speed-up of 8 real chips. Data parallelism keeps 8 copies of the weights
(8 × 2 GB); with less free memory than that the subprocess says so and uses
fewer layers for every mesh row.

Prints Markdown tables.

  python benchmarks/generate.py [--batches 1 8 32] [--new 128] [--repeats 3] [--no-mesh] [--mesh-rows dp tp tp2]
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_DEVICES = 8
# Each mesh row: (label, mesh shape, which batch, logical-rule overrides).
MESH_ROWS = {
    "dp": ("data parallel", (8, 1, 1), "dp", {}),
    "tp": ("tensor parallel: FFN + vocab (heads whole)", (1, 1, 8), "tp", {"heads": None, "kv_heads": None}),
    "tp2": ("tensor parallel: all (Megatron)", (1, 1, 2), "tp", {}),
}


def build_models(layers: int, decode_scan: bool):
  """(transformers model, our graphdef, our state) with the same random Qwen2-0.5B-shaped weights (seed 0).

  `decode_scan` is `LLMConfig.decode_scan`: off (the CPU choice) cuts the stacked
  layers apart once per call and decodes unrolled; on runs the decode step as
  a scan over the stacked weights (the TPU choice, which XLA:CPU pays for by
  copying every layer's weights out of the stack each step).
  """
  import dataclasses  # pylint: disable=import-outside-toplevel

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from alm_jax.checkpoints import hf_llm, mapping  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(
      hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
      max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=0,
  )
  ref = transformers.Qwen2ForCausalLM(hf_cfg).eval()
  cfg = dataclasses.replace(hf_llm.llm_config_from_hf(hf_cfg.to_dict()), decode_scan=decode_scan)
  model = hf_llm.import_hf(mapping.DictReader(ref.state_dict(), "torch state dict"), cfg)
  graphdef, state = nnx.split(model)
  return ref, graphdef, state


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def decode_rate(batch: int, new: int, seconds_1: float, seconds_n: float) -> float:
  """Decode tokens/s: the `new - 1` steps after the first token, all rows."""
  return batch * (new - 1) / (seconds_n - seconds_1)


def versus_transformers(args) -> None:
  """Part 1: ours vs transformers `generate` at each batch size, one table."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from alm_jax.infer import generate as gen  # pylint: disable=import-outside-toplevel

  ref, graphdef, state = build_models(args.layers, args.decode_scan)
  vocab = ref.config.vocab_size

  def run_ours(ids: np.ndarray, new: int):
    out = gen.generate((graphdef, state), ids, max_new_tokens=new, stop_tokens=(), length_bucket=1)
    out.tokens.block_until_ready()
    return out

  def compile_seconds(ids: np.ndarray, new: int) -> float:
    """Ahead-of-time compile of the program `generate` runs (timed on its own)."""
    t0 = time.perf_counter()
    gen.lower((graphdef, state), ids, max_new_tokens=new, stop_tokens=(), length_bucket=1).compile()
    return time.perf_counter() - t0

  def run_hf(x, new: int):
    return ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, pad_token_id=0,
                        eos_token_id=None)

  def best_torch_threads(x) -> int:
    """torch's OpenMP threads suffer badly from other load on few cores: use whichever count is faster."""
    timings = {}
    for threads in sorted({1, torch.get_num_threads()}):
      torch.set_num_threads(threads)
      run_hf(x, 4)
      t0 = time.perf_counter()
      run_hf(x, 12)
      timings[threads] = time.perf_counter() - t0
    return min(timings, key=timings.get)

  def measure(ids: np.ndarray) -> dict:
    """Median wall times of 1 and `new` new tokens, both sides interleaved so they see the same machine load."""
    ids32 = ids.astype(np.int32)
    x = torch.from_numpy(ids)
    run_ours(ids32, 1)  # compile + warm-up
    run_ours(ids32, args.new)
    with torch.inference_mode():
      run_hf(x, 2)
      times = {"ours_1": [], "ours_n": [], "hf_1": [], "hf_n": []}
      for _ in range(args.repeats):
        for name, fn in (("ours_1", lambda: run_ours(ids32, 1)), ("hf_1", lambda: run_hf(x, 1)),
                         ("ours_n", lambda: run_ours(ids32, args.new)), ("hf_n", lambda: run_hf(x, args.new))):
          seconds, out = timed(fn)
          times[name].append(seconds)
          if name == "ours_n":
            times["ours_tokens"] = np.asarray(out.tokens)
          elif name == "hf_n":
            times["hf_tokens"] = out[:, ids.shape[1]:].numpy()
    return {k: (statistics.median(v) if k.endswith(("_1", "_n")) else v) for k, v in times.items()}

  rows = []
  load_before = os.getloadavg()[0]
  all_threads = torch.get_num_threads()
  rng = np.random.default_rng(0)
  for batch in args.batches:
    ids = rng.integers(1, vocab, (batch, args.prompt)).astype(np.int64)
    compile_n = compile_seconds(ids.astype(np.int32), args.new)
    torch.set_num_threads(all_threads)
    with torch.inference_mode():
      threads = best_torch_threads(torch.from_numpy(ids))
    torch.set_num_threads(threads)
    m = measure(ids)
    ours_tps = decode_rate(batch, args.new, m["ours_1"], m["ours_n"])
    hf_tps = decode_rate(batch, args.new, m["hf_1"], m["hf_n"])
    agree = float((m["ours_tokens"] == m["hf_tokens"]).mean())
    rows.append((batch, ours_tps, hf_tps, ours_tps / hf_tps, m["ours_n"], m["hf_n"], compile_n, threads, agree))
    print(f"batch {batch}: ours {ours_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s ({threads} torch threads)",
          flush=True)
  torch.set_num_threads(all_threads)

  print()
  print(f"Decode speed, random Qwen2-0.5B-shaped model ({args.layers} layers), float32, CPU "
        f"({os.cpu_count()} cores, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}), "
        f"prompt {args.prompt}, {args.new} new tokens, greedy, median of {args.repeats}, "
        f"decode_scan={args.decode_scan}; "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
  print()
  print("| batch | ours decode tok/s | transformers decode tok/s | ratio | ours total s | transformers total s "
        "| ours compile s | torch threads | same tokens |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for batch, o, h, r, on, hn, cn, threads, agree in rows:
    print(f"| {batch} | {o:.1f} | {h:.1f} | {r:.2f}x | {on:.2f} | {hn:.2f} | {cn:.1f} | {threads} | {agree:.0%} |")
  print(flush=True)


def available_bytes() -> int:
  """MemAvailable from /proc/meminfo (0 where unknown)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def mesh_layers(requested: int, decode_scan: bool) -> int:
  """The most layers (up to `requested`) whose 8 data-parallel weight copies, plus one, fit in 85 % of free memory
  (each copy twice while generating with `decode_scan` off: the per-layer weights are cut out of the stack)."""
  per_layer = 4 * (896 * (896 + 2 * 128 + 896) + 3 * 896 * 4864 + 896 + 2 * 128 + 2 * 896)
  embedding = 4 * 151936 * 896
  budget = 0.85 * available_bytes()
  copies = MESH_DEVICES + 1  # the data-parallel replicas and the one-device state
  layer_copies = copies * (1 if decode_scan else 2)
  layers = requested
  while layers > 1 and copies * embedding + layer_copies * layers * per_layer > budget:
    layers -= 1
  return layers


def mesh_worker(args) -> None:
  """Part 2 (run in the subprocess with 8 CPU devices): each mesh row against one device, one table."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from alm_jax import sharding  # pylint: disable=import-outside-toplevel
  from alm_jax.infer import generate as gen  # pylint: disable=import-outside-toplevel

  layers = mesh_layers(args.layers, args.decode_scan)
  if layers < args.layers:
    print(f"mesh rows: {available_bytes() / 2**30:.1f} GiB free cannot hold {MESH_DEVICES} data-parallel copies "
          f"of {args.layers} layers; every mesh row uses {layers} layers", flush=True)
  ref, graphdef, state = build_models(layers, args.decode_scan)
  vocab = ref.config.vocab_size
  del ref
  gc.collect()
  one = sharding.make_mesh({"shape": (1, 1, 1)}, jax.devices()[:1])
  rules_one = sharding.make_rules()
  state_one = gen.place_state(state, one, rules_one)
  del state
  rng = np.random.default_rng(0)
  prompts = {name: rng.integers(1, vocab, (batch, args.prompt)).astype(np.int32)
             for name, batch in (("dp", args.dp_batch), ("tp", args.tp_batch))}
  new = args.mesh_new
  load_before = os.getloadavg()[0]

  def runner(mesh, rules, placed, ids):
    def run(n: int):
      out = gen.generate((graphdef, placed), ids, max_new_tokens=n, stop_tokens=(), length_bucket=1, mesh=mesh,
                         rules=rules)
      out.tokens.block_until_ready()
      return out
    return run

  def compile_seconds(mesh, rules, placed, ids) -> float:
    t0 = time.perf_counter()
    gen.lower((graphdef, placed), ids, max_new_tokens=new, stop_tokens=(), length_bucket=1, mesh=mesh,
              rules=rules).compile()
    return time.perf_counter() - t0

  rows = []
  for label, shape, which, overrides in (MESH_ROWS[name] for name in args.mesh_rows):
    ids = prompts[which]
    mesh = sharding.make_mesh({"shape": shape}, jax.devices()[: int(np.prod(shape))])
    rules = sharding.make_rules(overrides)
    placed = gen.place_state(state_one, mesh, rules)
    compile_mesh = compile_seconds(mesh, rules, placed, ids)
    compile_one = compile_seconds(one, rules_one, state_one, ids)
    sides = {"one": runner(one, rules_one, state_one, ids), "mesh": runner(mesh, rules, placed, ids)}
    for run in sides.values():  # compile + warm-up
      run(1)
      run(new)
    times = {f"{side}_{n}": [] for side in sides for n in ("1", "n")}
    tokens = {}
    for _ in range(args.mesh_repeats):
      for side, run in sides.items():
        times[f"{side}_1"].append(timed(lambda run=run: run(1))[0])
        seconds, out = timed(lambda run=run: run(new))
        times[f"{side}_n"].append(seconds)
        tokens[side] = np.asarray(out.tokens)
    m = {k: statistics.median(v) for k, v in times.items()}
    one_tps = decode_rate(len(ids), new, m["one_1"], m["one_n"])
    mesh_tps = decode_rate(len(ids), new, m["mesh_1"], m["mesh_n"])
    agree = float((tokens["one"] == tokens["mesh"]).mean())
    rows.append((label, shape, len(ids), mesh_tps, one_tps, mesh_tps / one_tps, m["mesh_n"], m["one_n"],
                 compile_mesh, compile_one, agree))
    print(f"{label} {shape} batch {len(ids)}: {mesh_tps:.1f} tok/s vs {one_tps:.1f} on one device", flush=True)
    del placed, sides
    gc.collect()

  print()
  print(f"Decode speed over a mesh of {MESH_DEVICES} CPU devices (--xla_force_host_platform_device_count, all "
        f"sharing {os.cpu_count()} cores; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}) vs the same "
        f"program on a (1, 1, 1) mesh: random Qwen2-0.5B-shaped model ({layers} layers), float32, prompt "
        f"{args.prompt}, {new} new tokens, greedy, median of {args.mesh_repeats}; jax {jax.__version__}")
  print()
  print("| parallelism | mesh (data, fsdp, tensor) | batch | mesh decode tok/s | 1-device decode tok/s | ratio "
        "| mesh total s | 1-device total s | mesh compile s | 1-device compile s | same tokens |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for label, shape, batch, mt, ot, r, mn, on, cm, co, agree in rows:
    print(f"| {label} | {shape} | {batch} | {mt:.1f} | {ot:.1f} | {r:.2f}x | {mn:.2f} | {on:.2f} | {cm:.1f} "
          f"| {co:.1f} | {agree:.0%} |")
  print(flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--new", type=int, default=128, help="new tokens per row (ours vs transformers)")
  parser.add_argument("--prompt", type=int, default=32, help="prompt length")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--layers", type=int, default=24, help="fewer for a quick smoke run")
  parser.add_argument("--decode-scan", action="store_true",
                      help="decode with a scan over the stacked layers (the TPU choice; default: the CPU choice)")
  parser.add_argument("--no-mesh", dest="mesh", action="store_false", help="skip the 8-device mesh rows")
  parser.add_argument("--no-transformers", dest="versus", action="store_false", help="only the mesh rows")
  parser.add_argument("--dp-batch", type=int, default=32, help="batch of the data-parallel rows")
  parser.add_argument("--tp-batch", type=int, default=8, help="batch of the tensor-parallel rows")
  parser.add_argument("--mesh-new", type=int, default=32, help="new tokens per row in the mesh rows")
  parser.add_argument("--mesh-repeats", type=int, default=2)
  parser.add_argument("--mesh-rows", nargs="+", choices=list(MESH_ROWS), default=list(MESH_ROWS))
  parser.add_argument("--mesh-worker", action="store_true", help=argparse.SUPPRESS)  # the 8-device subprocess
  args = parser.parse_args()

  if args.mesh_worker:
    mesh_worker(args)
    return
  if args.versus:
    versus_transformers(args)
  if args.mesh:
    gc.collect()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={MESH_DEVICES}".strip()
    forwarded = ["--prompt", str(args.prompt), "--layers", str(args.layers), "--dp-batch", str(args.dp_batch),
                 "--tp-batch", str(args.tp_batch), "--mesh-new", str(args.mesh_new), "--mesh-repeats",
                 str(args.mesh_repeats), "--mesh-rows", *args.mesh_rows, *(["--decode-scan"] * args.decode_scan)]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--mesh-worker", *forwarded], env=env,
                          check=False)
    if proc.returncode:
      print(f"mesh rows failed (exit {proc.returncode})", flush=True)
      sys.exit(proc.returncode)


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
