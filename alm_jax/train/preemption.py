"""Preemption for the train loop: SIGTERM becomes a flag polled once per step, so a
preempted run saves a checkpoint and exits cleanly, every process at the same step."""

from __future__ import annotations

import signal
import threading
from typing import Any, Iterable

import jax
import numpy as np


class PreemptionWatcher:
  """Turns SIGTERM (a preemption notice) into a flag the train loop polls.

  The loop calls `should_stop(step)` once per step on every process; when it
  returns True the loop saves a checkpoint and exits cleanly. Multi-host runs
  agree on the answer: JAX's preemption sync point is used where the JAX
  preemption service runs, and otherwise the local flags are all-gathered
  every `sync_every` steps (and whenever the caller passes `sync=True`, e.g. at
  a checkpoint step), so all processes stop at the same step. The all-gather
  waits for the devices, which is why it does not run every step.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), sync_every: int = 1):
    self.signals = tuple(signals)
    self.sync_every = max(1, int(sync_every))
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    """Whether this process has received a preemption signal."""
    return self._event.is_set()

  def request(self) -> None:
    """Sets the flag, as a signal would (for callers with their own notice)."""
    self._event.set()

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self._event.set()

  def install(self) -> "PreemptionWatcher":
    """Installs the handlers (main thread only); a handler set outside Python
    (JAX's own preemption notifier) is left in place and its sync point used."""
    for sig in self.signals:
      previous = signal.getsignal(sig)
      if previous is None:  # installed from C: JAX's preemption service owns it
        continue
      self._previous[sig] = previous
      signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts back the handlers that were there before `install`."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def __enter__(self) -> "PreemptionWatcher":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def should_stop(self, step: int, sync: bool = False) -> bool:
    """True when the run should save at `step` and exit (same answer on every process).

    With one process a requested stop is seen at once. With several, the flags
    are compared only when `step` is a multiple of `sync_every` or `sync` is
    True; every process must pass the same `sync` for the same step.
    """
    from jax.experimental import multihost_utils  # deferred: jax.experimental is heavy-ish

    try:
      synced = bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # no preemption service in this run
      synced = False
    if jax.process_count() == 1:
      return synced or self.requested
    if step % self.sync_every and not sync:
      return synced
    flags = multihost_utils.process_allgather(np.asarray(self.requested, dtype=np.int32))
    return synced or bool(np.any(flags))


def install_preemption_handler(signals: Iterable[int] = (signal.SIGTERM,), sync_every: int = 1) -> PreemptionWatcher:
  """Installs a `PreemptionWatcher` for SIGTERM and returns it (poll `should_stop(step)`)."""
  return PreemptionWatcher(signals, sync_every).install()
