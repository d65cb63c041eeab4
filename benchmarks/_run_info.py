"""When and where a benchmark ran: printed first and last by every script in `benchmarks/`, so a table
copied into the README carries its date, machine and load with it (`make benchmarks` runs them all)."""

from __future__ import annotations

import datetime
import os
import platform


def _cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> float:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    return float("nan")


def stamp(script: str, when: str) -> None:
  """Prints `[benchmark SCRIPT start|end] UTC time, CPU model, cores, memory, 1/5/15-min load averages`."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"[benchmark {os.path.basename(script)} {when}] {now}; {_cpu_model()}, {os.cpu_count()} cores, "
        f"{_memory_gib():.0f} GiB; load average (1/5/15 min) {load}", flush=True)
