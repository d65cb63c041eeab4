"""bf16 runs keep the weights they loaded, and MFU is per device against the right peak."""

import json
import os
import types

import numpy as np
import pytest

from alm_jax.train import flops


def _run_stage(corpus: str, workdir: str, *overrides: str):
  from alm_jax.config import load_config  # pylint: disable=import-outside-toplevel
  from alm_jax.run_config import validate  # pylint: disable=import-outside-toplevel
  from alm_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  from tests.helpers import TINY  # pylint: disable=import-outside-toplevel

  config = load_config(TINY + ":micro,projector")
  config.data.path = corpus
  config.data.batch_size = 4
  config.data.tasks = ("caption", "transcribe")
  config.train.update(steps=1, log_every=1, checkpoint_every=1, eval_batches=0)
  config.train.optimizer.warmup_steps = 0  # the first step moves the bridge
  for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    config[section][name] = value
  trainer = Trainer(validate(config), workdir, quiet=True)
  trainer.run()
  return trainer


@pytest.mark.slow
def test_bf16_projector_stage_saves_the_frozen_weights_it_loaded_bit_for_bit(tmp_path):
  from alm_jax.checkpoints import orbax as ckpt_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import make_corpus  # pylint: disable=import-outside-toplevel

  corpus = make_corpus(str(tmp_path / "corpus"), n=16)
  first, second = str(tmp_path / "f32"), str(tmp_path / "bf16")
  _run_stage(corpus, first)
  trainer = _run_stage(corpus, second, "train.compute_dtype=bfloat16", f"train.init_from={first}")
  abstract = trainer.layout.abstract_sharded(trainer.mesh, trainer.rules)
  loaded = {p: np.asarray(v) for p, v in ckpt_lib.restore_params_only(first, abstract).items()}
  saved = {p: np.asarray(v) for p, v in ckpt_lib.restore_params_only(second, abstract).items()}
  meta = ckpt_lib.read_metadata(second)
  frozen = [p for p, trainable in meta.mask.items() if not trainable]
  assert frozen and any(p.startswith("llm/") for p in frozen) and any(p.startswith("encoder/") for p in frozen)
  for path in frozen:  # a bf16 copy saved in their place would differ in the low mantissa bits
    np.testing.assert_array_equal(saved[path], loaded[path], err_msg=path)
  # ... while the trainable bridge did move, and stays float32 too.
  moved = [p for p, t in meta.mask.items() if t and not np.array_equal(saved[p], loaded[p])]
  assert moved
  with open(os.path.join(second, "metrics.jsonl")) as f:
    record = json.loads(f.readline())
  assert record["mfu"] > 0


def test_published_bf16_peaks_by_device_kind():
  assert flops.published_peak_flops("TPU v5 lite") == 197e12
  assert flops.published_peak_flops("TPU v5") == 459e12
  assert flops.published_peak_flops("TPU v6 lite") == 918e12
  assert flops.published_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.published_peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.published_peak_flops("cpu") is None


def test_peak_names_its_source():
  tpu = [types.SimpleNamespace(device_kind="TPU v5 lite")] * 8
  peak, source = flops.peak_flops(tpu)
  assert peak == 197e12 and "published bf16 peak of TPU v5 lite" in source
  peak, source = flops.peak_flops(tpu, override=1e12)
  assert peak == 1e12 and "config.train.peak_flops_per_device" in source
  peak, source = flops.peak_flops([types.SimpleNamespace(device_kind="cpu")])
  assert peak > 0 and "measured float32" in source


def test_mfu_is_per_device():
  # XLA's cost analysis of an SPMD program counts one device's FLOPs; the same step on 8 devices that each
  # run 1/8 of the work at the same speed has the same MFU as on one device.
  one = flops.mfu(8e12, 1.0, 100e12)
  eight = flops.mfu(1e12, 1.0 / 8, 100e12)
  assert one == pytest.approx(0.08) and eight == pytest.approx(one)
  assert flops.mfu(1e12, 0.0, 100e12) == 0.0
