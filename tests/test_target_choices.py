"""Per-target computation choices are config, never detected while tracing: the program `alm-jax compile`
builds for a TPU on a CPU host is the program the TPU runs (issue 21)."""

import ast
import os

import jax
import numpy as np
import pytest
from flax import nnx

from alm_jax.commands.compile import target_choices
from alm_jax.config import ConfigError, from_dict
from alm_jax.models.alm import ALMConfig, AudioLanguageModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What JAX answers about the machine running the trace, not about the target being compiled for.
MACHINE_QUERIES = {"default_backend", "device_count", "local_device_count", "devices", "local_devices",
                   "process_count", "process_index", "get_backend"}


def test_models_and_front_ends_never_ask_the_backend_or_device_count():
  found = []
  for package in ("alm_jax/models", "alm_jax/audio"):
    for name in sorted(os.listdir(os.path.join(REPO, package))):
      if not name.endswith(".py"):
        continue
      path = os.path.join(REPO, package, name)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MACHINE_QUERIES:
          found.append(f"{package}/{name}:{node.lineno} .{node.attr}")
  assert not found, found


# Whisper only: the BEATs front end shares the code path (`AudioEncoders._features`), and its fft and
# matmul spectra are compared with Kaldi in test_features.py.
MODEL = dict(
    encoders=("whisper",), audio_token_id=5, audio=dict(window_seconds=1.0, max_windows=1),
    whisper=dict(n_mels=80, d_model=32, num_layers=1, num_heads=4, ffn_dim=64, max_positions=50, mask_padding=True),
    bridge=dict(kind="mlp", mlp=dict(in_dim=32, out_dim=32)),
    llm=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2),
)


def test_cpu_and_tpu_choices_give_the_same_audio_frames():
  """The choices change how features and attention are computed, never what (float32 rounding apart)."""
  rng = np.random.default_rng(0)
  audio = (0.1 * rng.standard_normal((3, 2, 16000))).astype(np.float32)
  samples = np.array([[16000, 9000], [12000, 0], [5000, 16000]], np.int32)
  frames = {}
  for name, choices in [("tpu", {}), ("cpu", dict(frontend=dict(method="fft", examples_per_step=1),
                                                  whisper=dict(MODEL["whisper"], attention_block=16)))]:
    model = AudioLanguageModel(from_dict(ALMConfig, dict(MODEL, **choices)), rngs=nnx.Rngs(0))
    out, valid = jax.jit(lambda a, s, m=model: m.encode(a, s))(audio, samples)
    frames[name] = np.asarray(out)
  np.testing.assert_allclose(frames["cpu"], frames["tpu"], atol=2e-4, rtol=0)


def test_choices_are_validated_and_shown_by_compile():
  with pytest.raises(ConfigError, match="frontend.method"):
    from_dict(ALMConfig, dict(MODEL, frontend=dict(method="auto")))
  with pytest.raises(ConfigError, match="frontend.examples_per_step"):
    from_dict(ALMConfig, dict(MODEL, frontend=dict(examples_per_step=-1)))
  tpu = from_dict(ALMConfig, MODEL)
  cpu = from_dict(ALMConfig, dict(MODEL, frontend=dict(method="fft", examples_per_step=1)))
  assert "method=matmul examples_per_step=0, whisper attention_block=0" in target_choices(tpu, "tpu")
  assert "warning" not in target_choices(tpu, "tpu")
  assert "warning: these are CPU choices" in target_choices(cpu, "tpu")
  assert "warning" not in target_choices(cpu, "cpu")
