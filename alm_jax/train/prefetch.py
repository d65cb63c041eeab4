"""Device prefetch for the train loop: the next global batches are loaded and put on the
devices while the current step runs, and a checkpoint still saves the data iterator as
the *step* left it (not as the prefetching left it), so resume stays exact."""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable


class IteratorState:
  """A data iterator's state recorded at one point, in the shape the checkpointer saves.

  `get_state` returns the recorded state (what `TrainCheckpointer.save` writes);
  `set_state` passes through to the real iterator, so the same object also serves
  a restore. The state is captured when the batch is taken, so an asynchronous
  save can read it at any time later.
  """

  def __init__(self, iterator: Any, state: Any):
    self.iterator = iterator
    self.state = state

  def get_state(self) -> Any:
    return self.state

  def set_state(self, state: Any) -> None:
    self.iterator.set_state(state)


class BatchPrefetcher:
  """Keeps up to `depth` global batches ahead of the train step, each with the iterator state after it.

  `produce()` takes what one step consumes from `iterator` (one batch, or k
  micro-batches) and returns the global (device) batch. `next()` returns the
  oldest prefetched batch (producing it now when none is waiting) and remembers
  the iterator state that went with it; `fill()` tops the queue up to `depth`,
  and is called right after the step is dispatched, so the host loads and
  transfers while the device computes. At most `limit` batches are produced in
  all (the steps left), so the iterator is never read past the run's last step.
  `consumed_state()` is what a checkpoint after the last `next()` must save.
  With `depth` 0 nothing is read ahead.
  """

  def __init__(self, iterator: Any, produce: Callable[[], Any], depth: int, limit: int):
    self.iterator = iterator
    self.produce = produce
    self.depth = max(0, int(depth))
    self.remaining = max(0, int(limit))
    self._queue: collections.deque = collections.deque()
    self._consumed: Any = None

  def _produce_one(self) -> None:
    batch = self.produce()
    self.remaining -= 1
    # A copy: an iterator may hand out its live state, which the batches after this one would change.
    self._queue.append((batch, copy.deepcopy(self.iterator.get_state())))

  def fill(self) -> None:
    """Produces batches until `depth` are waiting (or none are left to produce)."""
    while len(self._queue) < self.depth and self.remaining > 0:
      self._produce_one()

  def next(self) -> Any:
    """The next step's global batch."""
    if not self._queue:
      if self.remaining <= 0:
        raise StopIteration("the prefetcher's limit of batches is used up")
      self._produce_one()
    batch, self._consumed = self._queue.popleft()
    return batch

  def consumed_state(self) -> IteratorState:
    """The data iterator as it was right after the last batch `next()` returned (for a checkpoint)."""
    if self._consumed is None:
      raise ValueError("no batch has been consumed yet")
    return IteratorState(self.iterator, self._consumed)

  @property
  def waiting(self) -> int:
    """Batches produced but not yet consumed."""
    return len(self._queue)
