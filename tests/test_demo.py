"""The end-to-end demo at a reduced size: corpus → pretrain → projector → LoRA → full →
evaluation, through the real commands; checks the chain, its checkpoints and the report."""

import json
import os

import pytest

from alm_jax.checkpoints.orbax import read_metadata
from tests.helpers import TINY, alm_jax


@pytest.mark.slow
def test_demo_chain_at_ci_scale(tmp_path):
  workdir = str(tmp_path / "demo")
  result = alm_jax("demo", "--workdir", workdir, "--scale", "ci", "--config", TINY + ":micro", timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for stage in ("pretrain", "projector", "lora", "full"):
    meta = read_metadata(os.path.join(workdir, "stages", stage))
    assert meta.stage == stage
    trainable = [p for p, t in meta.mask.items() if t]
    if stage == "projector":
      assert trainable and all(p.startswith("bridge/") for p in trainable)
    if stage == "lora":
      assert any(p.endswith("lora_a") for p in trainable)
      assert all(p.startswith("bridge/") or p.endswith(("lora_a", "lora_b")) for p in trainable)
  with open(os.path.join(workdir, "stages", "lora", "metrics.jsonl")) as f:
    assert json.loads(f.readline())["step"] >= 1
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["benchmark"] == "mmau" and report["n"] > 0
  for scorer in ("official", "robust"):
    block = report["scores"][scorer]
    assert set(block["overall"]) >= {"accuracy", "random", "n"}
    assert block["by_category"]
  assert os.path.isfile(os.path.join(workdir, "report.md")) and os.path.isfile(os.path.join(workdir, "report.png"))
  assert "robust" in result.stdout and "random" in result.stdout  # the per-category table
  # A second run resumes: every stage is already complete, nothing retrains.
  again = alm_jax("demo", "--workdir", workdir, "--scale", "ci", "--config", TINY + ":micro", timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "nothing to do" in again.stdout + again.stderr
