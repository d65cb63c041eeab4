"""The end-to-end demo at a reduced size: corpus → encoder tagging → pretrain → projector →
LoRA → full → evaluation, through the real commands; checks the chain, its checkpoints and
the report."""

import json
import os

import pytest

import numpy as np

from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.checkpoints.orbax import read_metadata
from tests.helpers import TINY, alm_jax


@pytest.mark.slow
def test_demo_chain_at_ci_scale(tmp_path):
  workdir = str(tmp_path / "demo")
  result = alm_jax("demo", "--workdir", workdir, "--scale", "ci", "--config", TINY + ":micro", timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for stage in ("encoder", "pretrain", "projector", "lora", "full"):
    meta = read_metadata(os.path.join(workdir, "stages", stage))
    assert meta.stage == stage
    trainable = [p for p, t in meta.mask.items() if t]
    if stage == "encoder":  # the encoders and their tagging head, nothing else
      assert any(p.startswith("tagger/") for p in trainable)
      assert trainable and all(p.startswith(("encoder/", "tagger/")) for p in trainable)
    if stage == "pretrain":  # the head is gone; the tagged encoders stay as they are
      assert not any(p.startswith("tagger/") for p in meta.mask)
      assert trainable and not any(p.startswith("encoder/") for p in trainable)
    if stage == "projector":
      assert trainable and all(p.startswith("bridge/") for p in trainable)
    if stage == "lora":
      assert any(p.endswith("lora_a") for p in trainable)
      assert all(p.startswith("bridge/") or p.endswith(("lora_a", "lora_b")) for p in trainable)
  # `pretrain` started from the tagging stage's encoders and kept them frozen.
  tagged, pretrained = (_encoder_params(os.path.join(workdir, "stages", s)) for s in ("encoder", "pretrain"))
  assert tagged.keys() == pretrained.keys() and tagged
  for path, value in tagged.items():
    np.testing.assert_array_equal(pretrained[path], value, err_msg=path)
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


def _encoder_params(stage_dir: str) -> dict:
  params = load_bundle(stage_dir).params
  return {p: np.asarray(v) for p, v in params.items() if p.startswith("encoder/")}
