"""The audio-language model's production train step on every mesh of 8 CPU devices, in float32 and
bf16 compute, with and without gradient accumulation: each equals the 1-device float32 step (the harness
lives in parity_harness.py; two processes are in test_multihost.py).
"""

import re

import numpy as np
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
    llm=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=8, num_kv_heads=8,
             rope_theta=10000.0, lora_rank=8, lora_targets=("q", "v")),
)


def alm_batch(rows: int = 16) -> dict:
  """Per-row clip slots (the pipeline's contract): every third row holds two clips, the others one."""
  cfg = from_dict(ALMConfig, MODEL)
  spec = cfg.token_spec()
  rng = np.random.default_rng(0)
  length, slots = 40, 2
  tokens = rng.integers(8, 256, (rows, length)).astype(np.int32)
  token_mask = np.zeros((rows, length), bool)
  loss_mask = np.zeros((rows, length), np.float32)
  audio = np.zeros((rows, slots, spec.window_samples), np.float32)
  samples = np.zeros((rows, slots), np.int32)
  clip = np.full((rows, slots), -1, np.int32)
  for i in range(rows):
    start = 2
    for c in range(2 if i % 3 == 0 else 1):
      n = int(rng.integers(6000, spec.window_samples + 1))
      audio[i, c, :n] = rng.normal(size=n) * 0.1
      samples[i, c], clip[i, c] = n, c
      k = num_audio_tokens(n, spec)
      tokens[i, start : start + k] = PLACEHOLDER
      start += k + 1
    real = start + 6 + i % 4
    token_mask[i, :real] = True
    loss_mask[i, start + 3 : real] = 1.0
  tokens[~token_mask] = 0
  return dict(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, audio=audio, audio_samples=samples,
              audio_clip=clip)


# What a CPU config selects (configs/tiny.py): rfft, the front end walking one window at a time and blocked
# Whisper attention. MODEL itself keeps the defaults a TPU config uses (matmul DFT, all windows at once, fused
# attention); the float32 matrix runs those, the bf16 matrix these, so both paths are proven on every mesh.
CPU_CHOICES = dict(frontend=dict(method="fft", examples_per_step=1), whisper=dict(MODEL["whisper"], attention_block=16))


def alm_case(choices: str = "tpu"):
  """A `StepCase` for the harness: the ALM (the LLM's embedding frozen), a real batch, the production AdamW.

  `choices`: "tpu" (MODEL's defaults) or "cpu" (`CPU_CHOICES`).
  """
  from parity_harness import StepCase  # pylint: disable=import-outside-toplevel

  from alm_jax.train.optimizer import OptimizerConfig  # pylint: disable=import-outside-toplevel

  cfg = from_dict(ALMConfig, dict(MODEL, **(CPU_CHOICES if choices == "cpu" else {})))
  # eps well above float noise: Adam turns a near-zero gradient into a +-lr step, so reduction-order noise in
  # such gradients would show as lr-sized parameter differences that say nothing about the sharding.
  optimizer = OptimizerConfig(learning_rate=1e-3, eps=1e-3, weight_decay=0.01, decay="constant")
  return StepCase(lambda rngs: AudioLanguageModel(cfg, rngs=rngs), alm_batch(), optimizer, frozen=r"^llm/embed/")


def alm_case_cpu_choices():
  """`alm_case` with `CPU_CHOICES` (a zero-argument case for the harness)."""
  return alm_case("cpu")


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (2, 4, 1), (1, 4, 2)]
# Every mesh in float32 (here) and the five kinds of mesh in bf16 compute with two accumulated micro-batches
# (test_alm_sharding_bf16.py, so the two halves run on both pytest workers), plus 1-device references that
# separate the effects. A run compiles its own step (~15-25 s on 2 cores), so the full product (28 runs)
# would cost twice as much for little more. The (1, 8, 1) run creates its parameters in their shards and
# checks them against the 1-device initialisation placed shard by shard (the checkpoint-import path).
# Half the rows on half the devices, compiled only: the same rows per device as the 8-device runs of
# data and FSDP parallelism, so a collective that carries the global batch grows and one that carries a
# device's own share does not (`assert_activation_collectives_do_not_grow`).
# Data parallelism with the TPU choices (float32 half), FSDP with the CPU choices (bf16 half).
F32_WEAK_SCALING = ((4, 1, 1), (8, 1, 1))
BF16_WEAK_SCALING = ((1, 4, 1), (1, 8, 1))
# bf16 on the meshes that differ in kind (the float32 half covers the mixed ones too).
BF16_MESHES = [m for m in MESHES if m not in ((2, 4, 1), (1, 4, 2))]
F32_RUNS = ([{"shape": m, "dtype": "float32", "accum": 1} for m in MESHES if m != (1, 8, 1)]
            + [{"shape": (1, 8, 1), "dtype": "float32", "accum": 1, "init": "mesh"},
               {"shape": (1, 1, 1), "dtype": "float32", "accum": 2},
               {"shape": F32_WEAK_SCALING[0], "dtype": "float32", "accum": 1, "rows": 8, "steps": 0}])
BF16_RUNS = ([{"shape": (1, 1, 1), "dtype": "float32", "accum": 1}]
             + [{"shape": m, "dtype": "bfloat16", "accum": 2} for m in BF16_MESHES]
             + [{"shape": BF16_WEAK_SCALING[0], "dtype": "bfloat16", "accum": 2, "rows": 8, "steps": 0}])
# float32: the meshes differ only in reduction order (~1e-7 relative); Adam with eps 1e-3 keeps that far below
# 1e-5 in the updated parameters, so the float32 half catches subtle gradient errors (the grouped-conv
# partitioning bug, docs/grouped_conv_sharding.md, moved parameters by 3e-4). bf16 compute rounds every
# activation to 8 bits of mantissa (~4e-3 relative): measured against the float32 run, the loss moves by
# ~3e-4 and the updated parameters by ~3e-4 (a third of the learning rate); the bf16 tolerance leaves room for
# other seeds and meshes while still catching a dropped micro-batch or a step that does not train.
F32_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def matrix():
  from parity_harness import run_step_in_subprocess  # pylint: disable=import-outside-toplevel

  return {r.key: r for r in run_step_in_subprocess("test_alm_sharding:alm_case", F32_RUNS)}


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES[1:])
def test_float32_step_on_every_mesh_equals_one_device(matrix, shape):
  from parity_harness import assert_same_training  # pylint: disable=import-outside-toplevel

  reference = matrix[((1, 1, 1), "float32", 1)]
  assert reference.losses[1] < reference.losses[0]
  assert_same_training(matrix[(shape, "float32", 1)], reference, F32_TOLERANCE)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(matrix):
  from parity_harness import assert_same_training  # pylint: disable=import-outside-toplevel

  # Two micro-batches of 8 rows with different numbers of answer tokens: a plain mean of their mean
  # gradients would differ; the token-weighted accumulation inside the step does not.
  assert_same_training(matrix[((1, 1, 1), "float32", 2)], matrix[((1, 1, 1), "float32", 1)], F32_TOLERANCE)


@pytest.mark.slow
def test_state_is_created_and_placed_sharded(matrix):
  fsdp = matrix[((1, 8, 1), "float32", 1)]
  assert fsdp.placed_matches_init  # host arrays placed shard by shard == sharded init
  assert fsdp.largest_host_read_fraction <= 1 / 8  # each device reads at most its 1/8 of a host array


@pytest.mark.slow
def test_fsdp_memory_per_device_is_an_eighth(matrix):
  one = matrix[((1, 1, 1), "float32", 1)].state_bytes_per_device
  fsdp = matrix[((1, 8, 1), "float32", 1)].state_bytes_per_device
  data = matrix[((8, 1, 1), "float32", 1)].state_bytes_per_device
  # params + optimizer state per device: 1/8, plus the replicated norms, biases and small kernels
  assert fsdp <= one / 8 * 1.30, (fsdp, one)
  assert data >= one * 0.99  # data parallelism replicates the state: the comparison can fail


def _hlo_param_path(op_name: str) -> tuple[str, str]:
  """`opt_state[0][1][0].mu['llm/...']` -> (`mu`, `llm/...`); `trainable['llm/...']` -> (`params`, `llm/...`)."""
  m = re.match(r"^(trainable|frozen|opt_state.*\.(mu|nu))\['([^']+)'\]$", op_name)
  if not m:
    return "", ""
  return m.group(2) or "params", m.group(3)


@pytest.mark.slow
def test_fsdp_hlo_gathers_weights_and_keeps_parameters_sharded(matrix):
  fsdp = matrix[((1, 8, 1), "float32", 1)]
  assert fsdp.collectives["all-gather"] > 0
  assert fsdp.collectives["reduce-scatter"] + fsdp.collectives["all-reduce"] > 0  # gradient reduction
  # Every fsdp-sharded parameter, and its Adam moments, enters the step as its 1/8 shard.
  entry = {_hlo_param_path(name): shape for name, shape in fsdp.entry_params}
  sharded = [path for path, leaf in fsdp.leaves.items() if "fsdp" in leaf["spec"]]
  assert len(sharded) >= 10
  for path in sharded:
    leaf = fsdp.leaves[path]
    kinds = ("params",) if path in fsdp.frozen_dtypes else ("params", "mu", "nu")
    for kind in kinds:
      assert entry[(kind, path)] == leaf["shard_shape"] != leaf["shape"], (kind, path, entry.get((kind, path)), leaf)
  full_kernels = {tuple(fsdp.leaves[p]["shape"]) for p in sharded if len(fsdp.leaves[p]["shape"]) >= 2}
  # (A replicated leaf may share a sharded one's shape: stacked norm scales [layers, d] vs biases [layers, d].)
  replicated = {p for p, leaf in fsdp.leaves.items() if "fsdp" not in leaf["spec"]}
  full = [n for n, s in fsdp.entry_params if s in full_kernels and _hlo_param_path(n)[1] not in replicated]
  assert not full, f"a full-size weight is an input: {full}"


def assert_activation_collectives_do_not_grow(small, large) -> None:
  """`large` runs twice the rows on twice the devices of `small`: its collectives must carry no more data.

  Weights, gradients and optimizer state (parameter-sized results) are what data/FSDP parallelism
  communicates; anything else (activations) may only be a device's own share, which is the same on both
  meshes. A collective of the global batch (all clips' PCM, every window's attention, every row's audio
  tokens) doubles. Token ids are the exception, in integers: under FSDP the embedding lookup gathers every
  row's ids (4 bytes a token) rather than the whole table and sends each device its rows' embeddings back
  (an all-to-all of its own share), as MaxText's does.
  """
  def floats(result):
    return [op for op in result.activation_collectives if not op["integer"]]

  def describe(ops):
    return "\n".join(f"  {op['kind']} {op['arrays']} {op['bytes']} B from {op['op_name'][:120]}" for op in ops)

  small_ops, large_ops = floats(small), floats(large)
  small_bytes, large_bytes = sum(op["bytes"] for op in small_ops), sum(op["bytes"] for op in large_ops)
  assert large_bytes <= small_bytes * 1.01 + 64, (
      f"activation collectives grow with the global batch: {small_bytes} B on {small.mesh}, {large_bytes} B on "
      f"{large.mesh}\n{describe(large_ops)}")
  assert max((op["bytes"] for op in large_ops), default=0) <= max((op["bytes"] for op in small_ops), default=0)
  tokens = int(np.prod(alm_batch()["tokens"].shape))
  for op in large.activation_collectives:
    if op not in large_ops:
      assert op["bytes"] <= 4 * tokens, f"an integer collective beyond the token ids:\n{describe([op])}"


@pytest.mark.slow
def test_float32_step_communicates_weights_not_the_global_batch(matrix):
  small, large = F32_WEAK_SCALING
  assert_activation_collectives_do_not_grow(matrix[(small, "float32", 1)], matrix[(large, "float32", 1)])
