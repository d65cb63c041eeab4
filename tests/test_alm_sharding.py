"""The audio-language model trained on device meshes and across processes: every layout
gives the 1-device loss and updated parameters (the harness lives in test_sharding.py).

Also: the same `alm-jax train` command on 1 device, on 8 CPU devices with FSDP, and as
2 processes over loopback writes the same loss curve.
"""

import json
import os
import subprocess
import sys

import numpy as np
import optax
import pytest

from alm_jax.config import from_dict
from alm_jax.models.alm import ALMConfig, AudioLanguageModel
from alm_jax.models.audio_slots import num_audio_tokens

PLACEHOLDER = 5

# Every sharded dimension divides 8 (heads, kv heads, widths, vocabulary), so any mesh of 8 devices fits.
MODEL = dict(
    encoders=("whisper", "beats"), fusion="aligned", encoder_norm=True, audio_token_id=PLACEHOLDER,
    audio=dict(window_seconds=1.0, max_windows=1),
    whisper=dict(n_mels=80, d_model=32, num_layers=1, num_heads=8, ffn_dim=64, max_positions=50),
    beats=dict(patch_dim=16, width=32, num_layers=1, num_heads=8, ffn_dim=64, conv_pos=8, conv_pos_groups=2,
               num_buckets=16, max_distance=32),
    bridge=dict(kind="qformer", qformer=dict(mode="window", encoder_dim=64, hidden_size=32, num_layers=1,
                                             num_heads=8, intermediate_size=64, queries=1, window=5, llm_dim=32)),
    llm=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=8,
             rope_theta=10000.0, lora_rank=8, lora_targets=("q", "v")),
)


def alm_batch(rows: int = 8) -> dict:
  """One clip (one window) per example, so windows line up with rows for per-process slicing."""
  cfg = from_dict(ALMConfig, MODEL)
  spec = cfg.token_spec()
  rng = np.random.default_rng(0)
  length = 32
  tokens = rng.integers(8, 256, (rows, length)).astype(np.int32)
  token_mask = np.zeros((rows, length), bool)
  loss_mask = np.zeros((rows, length), np.float32)
  samples = rng.integers(6000, spec.window_samples + 1, rows).astype(np.int32)
  audio = np.zeros((rows, spec.window_samples), np.float32)
  for i, n in enumerate(samples):
    audio[i, :n] = rng.normal(size=n) * 0.1
    k = num_audio_tokens(int(n), spec)
    tokens[i, 2 : 2 + k] = PLACEHOLDER
    real = 2 + k + 6 + i % 4
    token_mask[i, :real] = True
    loss_mask[i, 2 + k + 3 : real] = 1.0
  tokens[~token_mask] = 0
  return dict(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, audio=audio, audio_samples=samples,
              audio_clip=np.arange(rows, dtype=np.int32))


def alm_case():
  """A `StepCase` for the harness: the ALM, a real batch, AdamW with clipping."""
  from test_sharding import StepCase  # pylint: disable=import-outside-toplevel

  cfg = from_dict(ALMConfig, MODEL)
  # eps well above float noise: Adam turns a near-zero gradient into a +-lr step, so reduction-order noise in
  # such gradients would show as lr-sized parameter differences that say nothing about the sharding.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3, weight_decay=0.01))
  axes = {"audio_samples": ("batch",), "audio_clip": ("batch",)}
  return StepCase(lambda rngs: AudioLanguageModel(cfg, rngs=rngs), lambda model, batch: model.loss(batch)[0],
                  alm_batch(), tx, batch_axes=axes)


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8)]


@pytest.mark.slow
def test_alm_training_step_matches_one_device_on_every_mesh():
  from test_sharding import assert_same_training, run_step_in_subprocess  # pylint: disable=import-outside-toplevel

  results = {tuple(r.mesh.values()): r for r in run_step_in_subprocess("test_alm_sharding:alm_case", MESHES)}
  reference = results[(1, 1, 1)]
  assert reference.losses[1] < reference.losses[0]
  for shape in MESHES[1:]:
    assert_same_training(results[shape], reference)
  one, fsdp = reference.state_bytes_per_device, results[(1, 8, 1)].state_bytes_per_device
  # params + optimizer state per device: 1/8, plus the replicated norms, biases and small kernels (~3 % here)
  assert fsdp <= one / 8 * 1.30, (fsdp, one)
  assert results[(1, 8, 1)].collectives["all-gather"] > 0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known bug: on data=2 x fsdp=2 x tensor=2 the BEATs pos_conv update differs "
                   "from one device by ~3e-4 (losses of step 2 by 7e-5); every 1-axis mesh matches to 1e-7")
def test_alm_training_step_on_a_three_axis_mesh_matches_one_device():
  from test_sharding import assert_same_training, run_step_in_subprocess  # pylint: disable=import-outside-toplevel

  reference, result = run_step_in_subprocess("test_alm_sharding:alm_case", [(1, 1, 1), (2, 2, 2)])
  assert_same_training(result, reference)


@pytest.mark.slow
@pytest.mark.multihost
def test_alm_training_step_on_two_processes_matches_one_device():
  from test_sharding import assert_same_training, run_step_in_subprocess  # pylint: disable=import-outside-toplevel

  results = run_step_in_subprocess("test_alm_sharding:alm_case", [(1, 1, 1), (1, -1, 1), (2, 2, 1)], devices=2,
                                   processes=2)
  for result in results[1:]:
    assert_same_training(result, results[0])


def _train(corpus, workdir, *extra, env=None, processes=1):
  from tests.helpers import REPO, TINY, cli_env  # pylint: disable=import-outside-toplevel  (workers lack `tests`)

  args = [sys.executable, "-m", "alm_jax", "train", "--config", TINY + ":micro", "--workdir", workdir,
          f"--config.data.path={corpus}", "--config.train.steps=3", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.eval_batches=0", "--config.data.batch_size=8",
          "--config.data.length_buckets=(128,)", "--config.data.window_buckets=(24,)",
          "--config.train.optimizer.eps=1e-6", *extra]
  if processes > 1:
    args = [os.path.join(REPO, "launch", "local.sh"), str(processes)] + args
  proc = subprocess.run(args, env=env or cli_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.multihost
def test_train_command_same_losses_on_one_device_eight_devices_and_two_processes(tmp_path):
  from tests.helpers import cli_env, make_corpus  # pylint: disable=import-outside-toplevel

  corpus = make_corpus(str(tmp_path / "corpus"), n=40)
  one = _train(corpus, str(tmp_path / "one"), "--config.mesh.shape=(1,1,1)")
  eight_env = cli_env(XLA_FLAGS="--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8")
  eight = _train(corpus, str(tmp_path / "eight"), "--config.mesh.shape=(1,8,1)", env=eight_env)
  multi_env = cli_env(ALM_JAX_DEVICES_PER_PROCESS="1", ALM_JAX_INIT_TIMEOUT="120")
  two = _train(corpus, str(tmp_path / "two"), "--config.mesh.shape=(1,-1,1)", env=multi_env, processes=2)
  assert len(one) == 3 and one[-1] < one[0]
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
  np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
