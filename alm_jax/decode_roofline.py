"""How fast a compiled generation program decodes: an analytic HBM roofline of one decode step beside the
roofline of the compiled decode loop's body.

A decode step reads every LLM weight and the whole KV cache once per token for the whole batch, and
does ~2 FLOPs per weight per row: at serving batch sizes it is bound by HBM bandwidth. The analytic
figure is (LLM weight bytes + KV-cache bytes) per device / the chip's published HBM bandwidth (an
assumption: `roofline.ChipPeaks`). The compiled figure is `roofline.analyse_hlo` of the decode loop's
body alone (found as the program's outermost loop with a data-dependent trip count), with its layer
scan counted by its trip count: measured FLOPs, estimated HBM and collective bytes, each over the same
peaks. Their ratio says how far the compiled step is from reading each byte once (a ratio near 1), or
what it adds: weights gathered over the network, the cache copied rather than updated in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from alm_jax import aot, roofline

RATIO_TARGET = 1.5  # compiled step / analytic step above this is worth a look


@dataclasses.dataclass(frozen=True)
class AnalyticDecode:
  """One decode step by bytes alone, per device: LLM weights and the KV cache read once."""

  batch: int
  num_devices: int
  weight_bytes: int
  kv_cache_bytes: int
  peaks: roofline.ChipPeaks | None
  left_out: tuple[str, ...] = ()  # weights not read per step (an untied input embedding table)

  @property
  def hbm_bytes(self) -> int:
    return self.weight_bytes + self.kv_cache_bytes

  @property
  def seconds(self) -> float | None:
    return self.hbm_bytes / self.peaks.hbm_bytes_per_s if self.peaks else None

  @property
  def tokens_per_s_per_chip(self) -> float | None:
    return tokens_per_s_per_chip(self.batch, self.seconds, self.num_devices)


def tokens_per_s_per_chip(batch: int, step_seconds: float | None, num_devices: int) -> float | None:
  """Tokens every row gains per step, over the step's time, per chip."""
  return batch / step_seconds / num_devices if step_seconds else None


@dataclasses.dataclass(frozen=True)
class KVCache:
  """The K and V arrays a decode loop carries: global and per-device shape, how many (2, or 2 per layer when
  layers are unrolled) and bytes per element."""

  global_shape: tuple[int, ...]
  device_shape: tuple[int, ...]
  arrays: int
  itemsize: int

  @property
  def device_bytes(self) -> int:
    return self.arrays * math.prod(self.device_shape) * self.itemsize


@dataclasses.dataclass(frozen=True)
class KVCacheCheck:
  """Whether the decode loop carries the KV cache split as its logical axes say (element counts of the
  arrays in the loop's state: HLO shapes may be reshaped, not resized)."""

  cache: KVCache
  found_sharded: int  # arrays of the per-device size in the decode loop's state
  found_whole: int  # arrays of the global size (replicated)

  @property
  def verdict(self) -> str:
    if self.cache.global_shape == self.cache.device_shape:
      return "not split (the mesh does not split its axes)"
    if self.found_sharded >= self.cache.arrays:
      return "sharded"
    if self.found_whole:
      return "REPLICATED: the loop carries whole caches"
    return "not found in the loop state at its per-device size"


DECODE_FLOPS_SOURCE = "2·N·rows per decode step, N = LLM parameters less the input embedding"


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  """A generation program's decode: its loop, the compiled step's roofline, and the analytic estimate."""

  loop: roofline.Loop
  step: roofline.Roofline  # the loop body, one iteration
  whole: roofline.Roofline  # the program with the decode loop counted once
  analytic: AnalyticDecode
  kv_cache: KVCacheCheck
  new_tokens: int

  @property
  def ratio(self) -> float | None:
    """Compiled decode step time / analytic estimate."""
    compiled, analytic = self.step.seconds, self.analytic.seconds
    return compiled / analytic if compiled and analytic else None

  @property
  def tokens_per_s_per_chip(self) -> float | None:
    return tokens_per_s_per_chip(self.analytic.batch, self.step.seconds, self.analytic.num_devices)

  @property
  def prefill(self) -> roofline.Roofline:
    """The program less one decode step: features, encoders, bridge, prefill and the first token."""
    return self.whole.minus(self.step)

  def format(self) -> str:
    a = self.analytic
    gib = aot.human_bytes
    cache = self.kv_cache.cache
    where = f"{self.loop.name} in {self.loop.computation}" + (f" ({self.loop.op_name})" if self.loop.op_name else "")
    lines = [f"decode loop: {where}, trip count unknown (data-dependent): the whole-program roofline above counts "
             "it once, so it is prefill plus one decode step",
             f"KV cache per device: 2 x {list(cache.device_shape)}{' per layer' if cache.arrays > 2 else ''} "
             f"(global {list(cache.global_shape)}): {self.kv_cache.verdict}",
             "decode step, analytic (bytes / published HBM bandwidth; assumed peaks): LLM weights "
             f"{gib(a.weight_bytes)}"
             + (f" (less {', '.join(a.left_out)}: a lookup)" if a.left_out else "")
             + f" + KV cache {gib(a.kv_cache_bytes)} = {gib(a.hbm_bytes)} per device"]
    if a.peaks:
      lines[-1] += (f" / {a.peaks.hbm_bytes_per_s / 1e9:g} GB/s = {roofline.duration(a.seconds)} per step, "
                    f"{a.tokens_per_s_per_chip:.0f} tokens/s per chip")
    step = self.step.format().replace("roofline per device per step", "decode step as compiled: roofline of the "
                                      "loop body per device per iteration", 1)
    lines.append(step)
    if self.ratio is not None:
      flag = "" if self.ratio <= RATIO_TARGET else f" (above the {RATIO_TARGET:g} target)"
      lines.append(f"  compiled / analytic decode step: {self.ratio:.2f}{flag}; "
                   f"{self.tokens_per_s_per_chip:.0f} tokens/s per chip as compiled")
    prefill = self.prefill
    lines.append(f"prefill (the program less one decode step): {prefill.flops:.3e} dot FLOPs, HBM "
                 f"{gib(prefill.hbm_bytes)}, collectives {gib(prefill.collective_bytes)}"
                 + (f": >= {roofline.duration(prefill.seconds)} ({prefill.bound}-bound)" if prefill.peaks else ""))
    if prefill.seconds and self.step.seconds:
      total = prefill.seconds + (self.new_tokens - 1) * self.step.seconds
      lines.append(f"  a whole batch ({self.new_tokens} new tokens, none stopping early): "
                   f">= {roofline.duration(total)}")
    return "\n".join(lines)

  def to_dict(self) -> dict:
    a = self.analytic
    return {
        "loop": dataclasses.asdict(self.loop),
        "kv_cache": {**dataclasses.asdict(self.kv_cache.cache), "found_sharded": self.kv_cache.found_sharded,
                     "found_whole": self.kv_cache.found_whole, "verdict": self.kv_cache.verdict},
        "analytic": {"weight_bytes": a.weight_bytes, "kv_cache_bytes": a.kv_cache_bytes, "hbm_bytes": a.hbm_bytes,
                     "left_out": list(a.left_out), "seconds": a.seconds,
                     "tokens_per_s_per_chip": a.tokens_per_s_per_chip},
        "step": self.step.to_dict(),
        "ratio": self.ratio,
        "tokens_per_s_per_chip": self.tokens_per_s_per_chip,
        "prefill": self.prefill.to_dict(),
    }


def decode_report(hlo_text: str, whole: roofline.Roofline, *, batch: int, new_tokens: int, num_devices: int,
                  weight_bytes: int, kv_cache: KVCache, left_out: tuple[str, ...] = (),
                  llm_parameters: int | None = None) -> DecodeReport:
  """Finds the decode loop of a compiled generation program (`compiled.as_text()`, whose whole-program
  roofline is `whole`) and sets the roofline of its body beside the analytic estimate from `weight_bytes`
  (LLM weights one device reads per step) and `kv_cache`. Raises `roofline.LoopNotFound` when the loop is
  not unique. With `llm_parameters` (N, less the input embedding) the step's MFU counts 2·N FLOPs per row."""
  module = roofline.parse_module(hlo_text)
  loop = roofline.outermost_unknown_loop(module)
  model_flops = 2.0 * llm_parameters * batch / max(num_devices, 1) if llm_parameters else None
  step = roofline.analyse_hlo(hlo_text, num_devices, whole.peaks, model_flops=model_flops,
                              model_flops_source=DECODE_FLOPS_SOURCE if model_flops else "", root=loop.body)
  analytic = AnalyticDecode(batch, num_devices, weight_bytes, kv_cache.device_bytes, whole.peaks, tuple(left_out))
  state = module.computations[loop.computation].by_name[loop.name].shape
  sizes = [math.prod(dims) for _, dims in aot._arrays(state)]  # pylint: disable=protected-access
  check = KVCacheCheck(kv_cache, sizes.count(math.prod(kv_cache.device_shape)),
                       sizes.count(math.prod(kv_cache.global_shape)))
  return DecodeReport(loop, step, whole, analytic, check, new_tokens)
