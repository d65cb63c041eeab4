"""`alm-jax eval` over a mesh: every device of every process serves, and greedy answers equal one device's.

A tiny random Qwen2-Audio (transformers, imported with `alm-jax import-hf`) answers an MMAU file on one
device in this process; then on 8 CPU devices over the data, fsdp, tensor and mixed meshes in one
subprocess, and over 2 processes × 4 devices (batch split across the processes, and tensor split across
them so both processes answer the same items). Predictions must be identical item for item, the
weights must really be split (bytes per device), and a resumed run predicts only what is missing.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from alm_jax.cli import main as cli_main

from tests.helpers import REPO, cli_env

MESHES = {"data": "8,1,1", "fsdp": "1,8,1", "tensor": "1,1,8", "mixed": "2,2,2"}
FAST_XLA = cli_env()["XLA_FLAGS"]
N_ITEMS = 11  # not a multiple of any batch: padding rows and a short last batch
BATCH, NEW = 4, 6
EVAL_ARGS = ("--benchmark", "mmau", "--batch-size", str(BATCH), "--max-new-tokens", str(NEW))

WORKER = textwrap.dedent("""
    import json, os, sys
    from alm_jax.eval.predictor import ALMPredictor
    from alm_jax.eval.runner import EvalOptions, run_eval
    from alm_jax.infer import placement
    from alm_jax.infer.alm_generate import ALMGenerator
    run, data, root, out = sys.argv[1:5]
    for name, mesh in json.loads(os.environ["MESHES"]).items():  # what `alm-jax eval --mesh` does, per mesh
      bundle = placement.load_for_generation(run, mesh)
      table = bundle.params["llm/embed/embedding"]
      print("EMBED", name, table.size, table.addressable_shards[0].data.size, flush=True)
      generator = ALMGenerator(bundle, max_new_tokens=int(os.environ["NEW"]), batch_size=int(os.environ["BATCH"]))
      run_eval(ALMPredictor(generator), "mmau", data, root, f"{out}/{name}/report.json",
               EvalOptions(checkpoint=bundle.source, batch_size=generator.batch_size, progress=False, chart=False))
    """)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An imported tiny Qwen2-Audio run directory and an MMAU file of `N_ITEMS` items with their clips."""
  from tests.test_hf_alm import reference  # pylint: disable=import-outside-toplevel

  root = tmp_path_factory.mktemp("mesh_eval")
  # 8 heads and 8 key/value heads in both towers, so a tensor axis of 8 splits them.
  reference("qwen2-audio", str(root / "hf"), text_overrides=dict(num_attention_heads=8, num_key_value_heads=8),
            encoder_overrides=dict(encoder_attention_heads=8))
  assert cli_main(["import-hf", str(root / "hf"), str(root / "run")]) == 0
  rng = np.random.default_rng(0)
  records = []
  os.makedirs(root / "audio")
  for i in range(N_ITEMS):
    seconds = 1.0  # one prompt shape: one program per mesh
    sf.write(root / "audio" / f"c{i}.wav", (0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32),
             16000)
    records.append({"id": f"q{i}", "audio_id": f"audio/c{i}.wav", "question": "What is it?",
                    "choices": ["yes", "no", "maybe"], "answer": "yes", "task": "sound", "difficulty": "easy"})
  data = root / "mmau.json"
  data.write_text(json.dumps(records))
  return str(root / "run"), str(data), str(root)


def predictions(report: str) -> dict[str, str]:
  """id -> prediction from a report's saved predictions (every process's file)."""
  directory = os.path.splitext(report)[0] + ".predictions"
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name)) as f:
      for line in f:
        record = json.loads(line)
        assert record["id"] not in out, f"{record['id']} predicted twice"
        out[record["id"]] = record["prediction"]
  return out


@pytest.fixture(scope="module")
def one_device(checkpoint, tmp_path_factory):
  run, data, root = checkpoint
  out = str(tmp_path_factory.mktemp("one") / "report.json")
  assert cli_main(["eval", "--ckpt", run, "--data", data, "--audio-root", root, "--out", out, "--mesh", "1,1,1",
                   *EVAL_ARGS]) == 0
  answers = predictions(out)
  assert len(answers) == N_ITEMS and any(answers.values())
  return answers


def test_every_mesh_of_8_devices_answers_like_one_device(checkpoint, one_device, tmp_path):
  run, data, root = checkpoint
  worker = tmp_path / "worker.py"
  worker.write_text(WORKER)
  env = cli_env(XLA_FLAGS=FAST_XLA + " --xla_force_host_platform_device_count=8", MESHES=json.dumps(MESHES),
                BATCH=str(BATCH), NEW=str(NEW))
  done = subprocess.run([sys.executable, str(worker), run, data, root, str(tmp_path)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  embed = {line.split()[1]: [int(v) for v in line.split()[2:]] for line in done.stdout.splitlines()
           if line.startswith("EMBED")}
  assert embed["data"][1] == embed["data"][0]  # data parallel: every device holds the whole table
  for name in ("fsdp", "tensor", "mixed"):  # split weights: a fraction of the table per device
    assert embed[name][1] < embed[name][0], name
  for name in MESHES:
    assert predictions(str(tmp_path / name / "report.json")) == one_device, name


@pytest.mark.parametrize("mesh,files,resume", [("2,2,2", 2, True), ("1,1,8", 1, False)])
def test_two_processes_answer_like_one_device(checkpoint, one_device, tmp_path, mesh, files, resume):
  """2 × 4 devices: `2,2,2` splits the batch across the processes (each answers its items), and is
  first run over the first 5 items, then the whole file (a resume: only the rest is predicted);
  `1,1,8` splits the heads across them (both answer the same items, process 0 saves them)."""
  run, data, root = checkpoint
  out = str(tmp_path / "report.json")

  def launch(*extra: str) -> None:
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "alm_jax", "eval", "--ckpt", run, "--data", data, "--audio-root", root, "--out", out,
         "--mesh", mesh, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         *EVAL_ARGS, *extra],
        env=cli_env(XLA_FLAGS=FAST_XLA + " --xla_force_host_platform_device_count=4"), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
      logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
      for proc in procs:
        proc.kill()
    for proc, log in zip(procs, logs):
      assert proc.returncode == 0, log[-3000:]

  if resume:
    launch("--limit", "5")
    assert sorted(predictions(out)) == sorted(f"q{i}" for i in range(5))
  launch()
  answers = predictions(out)
  assert answers == one_device
  directory = os.path.splitext(out)[0] + ".predictions"
  written = [name for name in os.listdir(directory) if os.path.getsize(os.path.join(directory, name))]
  assert len(written) == files  # one writer per batch group
