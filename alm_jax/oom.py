"""Reading a compiler's out-of-memory error as numbers.

When a program needs more device memory than the target has, the TPU compiler
refuses it with a `RESOURCE_EXHAUSTED` error whose text says how much the HLO
temporaries need, how much HBM is available and, in its longer form, which
allocations are largest. `alm-jax compile` turns that text into the same memory
report a program that fits gets (`aot.compile_and_report`), instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import re

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
# "the total memory required for HLO temporaries (655.37G) exceeds available HBM (95.74G)"
_TEMPORARIES = [re.compile(r"HLO temporaries \(" + _SIZE + r"\)"), re.compile(r"HLO temp\s+" + _SIZE)]
_AVAILABLE = [re.compile(r"available HBM \(" + _SIZE + r"\)"), re.compile(r"Used " + _SIZE + r" of " + _SIZE + " hbm")]
_ALLOCATION = re.compile(r"^\s*\d+\.\s+Size:\s+" + _SIZE, re.MULTILINE)


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit.upper()])


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """What a compiler's out-of-memory message says (None where it does not say).

  Attributes:
    message: the message's first line.
    temporaries: bytes the program's temporaries need per device.
    available: bytes of device memory the compiler had.
    largest: the largest allocations it names, each `{"bytes", "shape", "op_name"}`.
  """

  message: str
  temporaries: int | None
  available: int | None
  largest: list[dict]


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is a compiler refusing a program for want of device memory."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text and ("memory" in text.lower() or "hbm" in text.lower())


def parse(text: str) -> OutOfMemory:
  """Reads an out-of-memory message (any of the TPU compiler's forms; unknown parts stay None)."""
  first = next((line.strip() for line in text.splitlines() if line.strip()), "")
  temporaries = available = None
  for pattern in _TEMPORARIES:
    m = pattern.search(text)
    if m:
      temporaries = _bytes(*m.groups()[:2])
      break
  for pattern in _AVAILABLE:
    m = pattern.search(text)
    if m:
      available = _bytes(*m.groups()[-2:])
      break
  largest = []
  matches = list(_ALLOCATION.finditer(text))
  for i, m in enumerate(matches):
    block = text[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
    shape = re.search(r"Shape:\s*(\S+)", block)
    op = re.search(r'op_name="([^"]*)"', block) or re.search(r"Operator:\s*(.*)", block)
    largest.append({"bytes": _bytes(*m.groups()), "shape": shape.group(1) if shape else "",
                    "op_name": op.group(1).strip() if op else ""})
  return OutOfMemory(first[:300], temporaries, available, largest)
