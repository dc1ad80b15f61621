"""Which waiting requests share one denoising loop, and when that loop starts.

Concurrent requests that ask for the same loop (a :class:`LoopKey`: sampler, steps, eta,
precision) are denoised as one batch: the UNet runs once per step over all their samples
instead of once per request. Each sample still starts from its own seed's noise and draws
its step noise from its own generator (:mod:`ldm_core.sample`), so a seed gives the same
volume alone or in a batch, up to the rounding of batched convolutions.

The rule is the one of Triton's dynamic batcher and KServe's batcher sidecar (``maxBatchSize``
/ ``maxLatency``: a batch goes when it is full or when its wait is over):

- when a generation slot is free, the oldest waiting request leads the next batch; waiting
  requests with its key join it in arrival order while their samples fit within
  ``serving.max_batch_size`` (a request's own samples count; a request larger than that runs
  alone, it is never split);
- the batch starts at once when it is full, else once its leader has waited
  ``serving.max_batch_wait_ms`` since it joined the queue (so a request that waited longer
  than that for a slot starts with whatever company it has);
- requests with another key wait for a later batch, in their turn;
- a request put back to run alone (its batch failed, :mod:`~ldm_core.serve.admission`
  retries each of its requests by itself) goes before every waiting request, in a batch of
  its own, at once.

Plain bookkeeping, no asyncio and no threads: :mod:`~ldm_core.serve.admission` runs it on
its event loop.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class LoopKey:
    """Everything a denoising loop runs with except the seeds: requests with equal keys can
    share one loop, requests that differ in any field cannot."""

    sampler: str
    steps: int
    eta: float
    precision: str


class Waiting(Protocol):
    """A queued request as the batching rule sees it."""

    @property
    def key(self) -> Hashable: ...

    @property
    def size(self) -> int:
        """Samples it adds to a batch."""
        ...

    @property
    def queued_at(self) -> float:
        """``time.monotonic()`` when it joined the queue."""
        ...


W = TypeVar("W", bound=Waiting)


class BatchQueue(Generic[W]):
    """Waiting requests in arrival order, and the rule that takes the next batch off.

    Args:
        max_batch_size: samples one batch may hold (``serving.max_batch_size``, >= 1).
        max_wait_s: how long a batch's leader waits for company (``serving.max_batch_wait_ms``
            in seconds, >= 0).
    """

    def __init__(self, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"serving.max_batch_size: must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"serving.max_batch_wait_ms: must be >= 0, got {max_wait_s * 1000:g}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._items: list[W] = []
        self._alone: list[W] = []

    def __len__(self) -> int:
        return len(self._alone) + len(self._items)

    def push(self, item: W) -> None:
        self._items.append(item)

    def push_alone(self, item: W) -> None:
        """Queue ``item`` to run by itself, ahead of every request waiting to be batched."""
        self._alone.append(item)

    def discard(self, item: W) -> bool:
        """Take ``item`` out if it still waits (its request gave up); whether it did."""
        for items in (self._alone, self._items):
            for i, waiting in enumerate(items):
                if waiting is item:
                    del items[i]
                    return True
        return False

    def ready_at(self) -> float | None:
        """When the next batch may start (monotonic seconds; at once for a request that runs
        alone, else when the leader's wait for company ends); None if none waits."""
        if self._alone:
            return self._alone[0].queued_at
        return self._items[0].queued_at + self.max_wait_s if self._items else None

    def take(self, now: float) -> list[W]:
        """The next batch, taken off the queue, if it should start at ``now``; else ``[]``
        (ask again at :meth:`ready_at`, or when a request arrives)."""
        if self._alone:
            return [self._alone.pop(0)]
        if not self._items:
            return []
        leader = self._items[0]
        batch, size = [leader], leader.size
        for item in self._items[1:]:
            if size >= self.max_batch_size:
                break
            if item.key == leader.key and size + item.size <= self.max_batch_size:
                batch.append(item)
                size += item.size
        if size < self.max_batch_size and now < leader.queued_at + self.max_wait_s:
            return []
        for item in batch:
            self.discard(item)
        return batch
