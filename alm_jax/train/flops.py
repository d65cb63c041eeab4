"""FLOP counts and per-device peaks, for the MFU estimate.

MFU = (FLOPs one device executes per step, from XLA's cost analysis of the SPMD
program) / step time / (that device's peak). The peak is the chip's published
dense bf16 figure where the device kind is known (TPU, NVIDIA GPU), else a
measured float32 matmul (CPU); `peak_flops` says which it used.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (0 if unknown)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def memory_summary(compiled: Any) -> str:
  """One line of per-device memory from the compiled program's memory analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    m = None
  if m is None:
    return "memory analysis unavailable"
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  return (f"per device: arguments {gib(m.argument_size_in_bytes)}, outputs {gib(m.output_size_in_bytes)}, "
          f"temporaries {gib(m.temp_size_in_bytes)}")


@functools.lru_cache(maxsize=None)
def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of one device (an n×n by n×n product), measured once."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


# Dense bf16 peak FLOP/s per device from the vendors' spec sheets, by a lower-case fragment of
# `device.device_kind` (first match wins, so the more specific names come first).
PUBLISHED_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu7x", 2307e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
)


def published_peak_flops(device_kind: str) -> float | None:
  """The published dense bf16 peak of a device kind (`jax.Device.device_kind`), or None if unknown."""
  kind = device_kind.lower()
  for fragment, peak in PUBLISHED_BF16_PEAKS:
    if fragment in kind:
      return peak
  return None


def peak_flops(devices: Sequence[Any], override: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of ONE device of `devices` and where the number comes from (for the log line)."""
  if override > 0:
    return override, "config.train.peak_flops_per_device"
  kind = getattr(devices[0], "device_kind", "") if devices else ""
  published = published_peak_flops(kind)
  if published is not None:
    return published, f"published bf16 peak of {kind}"
  return measured_peak_flops(), f"measured float32 1024x1024 matmul on {kind or 'this device'}"


def mfu(flops_per_device: float, seconds: float, peak_per_device: float) -> float:
  """Model FLOPs utilisation of one device: its executed FLOPs per second over its peak."""
  return flops_per_device / seconds / peak_per_device if seconds > 0 and peak_per_device > 0 else 0.0
