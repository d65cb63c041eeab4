"""The audio-language model's production train step in bf16 compute with two accumulated micro-batches on
five kinds of mesh of 8 CPU devices (data, FSDP, tensor, all three, and one device): each equals the 1-device float32 step within bf16 tolerance, and the frozen
weights stay float32 (the float32 half of the matrix is test_alm_sharding.py). This half runs the choices a
CPU config makes (`CPU_CHOICES`), the float32 half those of a TPU config."""

import numpy as np
import pytest

from test_alm_sharding import (BF16_MESHES, BF16_RUNS, BF16_TOLERANCE, BF16_WEAK_SCALING,
                               assert_activation_collectives_do_not_grow)


@pytest.fixture(scope="module")
def matrix():
  from parity_harness import run_step_in_subprocess  # pylint: disable=import-outside-toplevel

  return {r.key: r for r in run_step_in_subprocess("test_alm_sharding:alm_case_cpu_choices", BF16_RUNS)}


@pytest.mark.slow
@pytest.mark.parametrize("shape", BF16_MESHES)
def test_bf16_accumulated_step_on_every_mesh_equals_one_device_float32(matrix, shape):
  from parity_harness import assert_same_training  # pylint: disable=import-outside-toplevel

  reference = matrix[((1, 1, 1), "float32", 1)]
  result = matrix[(shape, "bfloat16", 2)]
  assert_same_training(result, reference, BF16_TOLERANCE)
  # The frozen weights go into the step as loaded (float32) and come out untouched.
  assert set(result.frozen_dtypes.values()) == {"float32"}
  for path in result.frozen_dtypes:
    np.testing.assert_array_equal(result.params[path], reference.params[path])




@pytest.mark.slow
def test_bf16_step_with_cpu_choices_communicates_weights_not_the_global_batch(matrix):
  # rfft and a per-window loop in the front end, blocked Whisper attention: each runs per device shard.
  small, large = BF16_WEAK_SCALING
  assert_activation_collectives_do_not_grow(matrix[(small, "bfloat16", 2)], matrix[(large, "bfloat16", 2)])
