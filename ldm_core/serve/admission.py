"""Admission: how many requests generate at once, how many may wait, for how long, and
which of them share one denoising loop.

Why it looks the way it does:

- Generation runs in a pool of ``serving.max_concurrency`` worker threads, so the event
  loop keeps answering health checks and ``/metrics`` while the model denoises. A slot runs
  one batch: the waiting requests that :mod:`~ldm_core.serve.batching` lets share a loop
  (``serving.max_batch_size`` samples; 1 = every request alone).
- At most ``serving.max_queue`` requests wait for a slot; any beyond that get 503 at once
  (with ``Retry-After``) instead of piling up until the device runs out of memory.
- ``serving.request_timeout_s`` bounds queueing plus denoising, per request (504), whether
  it waits alone or in a batch. A batch whose requests all gave up (timed out, or their
  clients went away) stops at its next denoising step, so its slot frees soon; one whose
  requests partly gave up runs on for the others. A slot counts as busy until its thread
  has really finished.
- A batch of several requests that fails is retried request by request: each runs alone,
  ahead of the queue and within its own deadline, so each gets the answer it would have got
  alone (an out-of-memory of eight requests together is no fault of a one-seed request's),
  and a request whose own generation fails gets its own exception, for the model to answer
  and log (a 5xx with its cause).
- When the server stops (:mod:`~ldm_core.serve.shutdown`), :meth:`Admission.drain` refuses
  new requests (503, :class:`ShuttingDown`) while those admitted run on, and
  :meth:`Admission.abort` ends what is left at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ldm_core.config import ServingConfig
from ldm_core.errors import LdmError
from ldm_core.serve.batching import BatchQueue
from ldm_core.serve.logs import log_event
from ldm_core.serve.metrics import BATCH_REQUESTS, BATCH_SAMPLES, IN_FLIGHT, QUEUED, REJECTED

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
T = TypeVar("T")


class RequestRejected(LdmError):
    """A valid request the server cannot take now; carries the HTTP status to answer with."""

    status = 503
    reason = "rejected"


class ServerBusy(RequestRejected):
    """Every generation slot and queue place is taken (or the device is out of memory)."""

    status = 503
    reason = "busy"


class ShuttingDown(RequestRejected):
    """The server is stopping: it takes no new work, and another replica can (gRPC
    ``UNAVAILABLE``, the code clients and meshes retry elsewhere)."""

    status = 503
    reason = "shutting_down"

    def __init__(self, why: str = "this server takes no new requests") -> None:
        super().__init__(f"shutting down: {why}; retry, another replica will answer")


class GenerationTimeout(RequestRejected):
    """The request did not finish within ``serving.request_timeout_s``."""

    status = 504
    reason = "timeout"


class Cancelled(Exception):
    """Raised inside the worker thread to stop a generation whose request gave up."""


class Progress:
    """What a running generation shares with its request, across threads: the steps done
    (for the 504 message) and whether the request gave up. Called by the sampler after
    every denoising step, as ``progress(done, total)``."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.total = total
        self._cancelled = threading.Event()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._cancelled.is_set():
            raise Cancelled()

    def cancel(self) -> None:
        self._cancelled.set()


BatchWork = Callable[[K, list[P], Progress], Sequence[T]]
"""Runs one batch in a worker thread: ``work(key, parts, progress)`` returns one result per
part, in order, calling ``progress`` after every denoising step."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one request gets back from the batch it ran in."""

    result: T
    seconds: float
    """How long its batch ran (a request's share of a batch cannot be told apart)."""
    batch_id: int
    batch_samples: int
    batch_requests: int


@dataclass(eq=False)
class _Ticket:
    """One admitted request: what the batching rule reads, and where its outcome goes."""

    key: Hashable
    size: int
    part: Any
    work: BatchWork
    steps: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)
    batch: _Batch | None = None


class _Batch:
    """Requests denoised in one loop, in one worker thread, sharing one :class:`Progress`."""

    def __init__(self, batch_id: int, tickets: list[_Ticket]) -> None:
        self.id = batch_id
        self.tickets = tickets
        self.samples = sum(t.size for t in tickets)
        self.progress = Progress(tickets[0].steps)
        self.started = time.monotonic()
        self._gone = 0

    def leave(self) -> None:
        """One of its requests gave up; the loop stops once all of them have."""
        self._gone += 1
        if self._gone == len(self.tickets):
            self.progress.cancel()


class Admission:
    """Runs work under the server's concurrency, queue, time and batching limits.

    Args:
        max_concurrency: worker threads, i.e. batches generating at the same time.
        max_queue: requests that may be admitted beyond ``max_concurrency``; more are
            refused with 503. Requests sharing a running batch count, as they hold memory.
        timeout_s: limit on waiting plus working, from the request's arrival (504).
        max_batch_size: samples one batch may hold; 1 = every request runs alone.
        max_batch_wait_s: how long a batch's first request waits for others to join.

    One instance per server process, used from its event loop only (nothing is locked);
    the limits are checked where the config is loaded. ``close`` when the server stops.
    """

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        timeout_s: float,
        max_batch_size: int = 1,
        max_batch_wait_s: float = 0.0,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.timeout_s = float(timeout_s)
        self._tickets: set[_Ticket] = set()
        """The requests admitted: generating or queued."""
        self._running = 0
        self._closed = False
        self._draining = False
        self._queue: BatchQueue[_Ticket] = BatchQueue(max_batch_size, max_batch_wait_s)
        self._batch_ids = itertools.count(1)
        self._wake: asyncio.TimerHandle | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="ldm-generate"
        )

    @classmethod
    def from_config(cls, serving: ServingConfig) -> Admission:
        return cls(
            serving.max_concurrency,
            serving.max_queue,
            serving.request_timeout_s,
            serving.max_batch_size,
            serving.max_batch_wait_ms / 1000.0,
        )

    async def run(
        self,
        work: BatchWork[K, P, T],
        part: P,
        *,
        key: K,
        size: int,
        request_id: str,
        started: float,
        steps: int,
    ) -> Outcome[T]:
        """This request's result of ``work(key, parts, progress)``, run in a worker thread
        over the ``part`` of every request in its batch once a slot is free and the
        batching rule (:mod:`~ldm_core.serve.batching`) lets the batch go.

        ``size`` is the samples ``part`` adds to a batch, ``started`` (``time.monotonic()``)
        when the request arrived, ``steps`` how many progress calls ``work`` will make.
        Requests with equal keys must pass the same ``work``: a batch runs its first one's.

        Raises:
            ShuttingDown: the server drains (:meth:`drain`), or stopped before it finished.
            ServerBusy: no slot and no queue place is free.
            GenerationTimeout: the deadline passed while queued or working.
            Exception: whatever ``work`` raised for this request alone (a batch of several
                that fails is retried, each request by itself).
        """
        if self._draining:
            raise ShuttingDown()
        if self.admitted >= self.max_concurrency + self.max_queue:
            REJECTED.labels("busy").inc()
            raise ServerBusy(
                f"busy: {self.admitted} requests generating or queued (serving.max_concurrency="
                f"{self.max_concurrency}, serving.max_queue={self.max_queue}); retry later"
            )
        deadline = started + self.timeout_s
        future = asyncio.get_running_loop().create_future()
        ticket = _Ticket(key, size, part, work, steps, future)
        self._tickets.add(ticket)
        self._queue.push(ticket)
        QUEUED.inc()
        try:
            self._dispatch()
            return await asyncio.wait_for(
                asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise self._timed_out(request_id, self._leave(ticket)) from None
        except asyncio.CancelledError:
            self._leave(ticket)  # the client went away
            raise
        finally:
            self._tickets.discard(ticket)

    def _dispatch(self) -> None:
        """Start every batch that may start now; if one waits for company while a slot is
        free, come back when its wait ends."""
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        while not self._closed and self._running < self.max_concurrency:
            tickets = self._queue.take(time.monotonic())
            if not tickets:
                break
            self._start(tickets)
        ready_at = self._queue.ready_at()
        if not self._closed and self._running < self.max_concurrency and ready_at is not None:
            delay = max(0.0, ready_at - time.monotonic())
            self._wake = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _start(self, tickets: list[_Ticket]) -> None:
        batch = _Batch(next(self._batch_ids), tickets)
        for ticket in tickets:
            ticket.batch = batch
        QUEUED.dec(len(tickets))
        IN_FLIGHT.inc(len(tickets))
        BATCH_SAMPLES.observe(batch.samples)
        BATCH_REQUESTS.observe(len(tickets))
        self._running += 1
        first = tickets[0]
        parts = [t.part for t in tickets]
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, first.work, first.key, parts, batch.progress
        )
        future.add_done_callback(lambda f: self._finish(batch, f))

    def _finish(self, batch: _Batch, future: asyncio.Future) -> None:
        # Runs on the event loop when the worker thread is really done (not when its
        # requests stopped waiting), so the slot count always matches the busy threads.
        self._running -= 1
        IN_FLIGHT.dec(len(batch.tickets))
        seconds = time.monotonic() - batch.started
        if future.cancelled():  # only when the server stops before the thread started it
            exc: BaseException | None = LdmError(f"server stopped before batch {batch.id} ran")
        else:
            exc = future.exception()  # retrieved even if nobody waits any more
        results = list(future.result()) if exc is None else []
        if exc is None and len(results) != len(batch.tickets):
            exc = LdmError(f"batch {batch.id}: {len(results)} results for {len(batch.tickets)}")
        waiting = [t for t in batch.tickets if not t.future.done()]
        if exc is not None and len(batch.tickets) > 1 and waiting and not self._closed:
            self._retry_alone(batch, waiting, exc)
            self._dispatch()
            return
        for i, ticket in enumerate(batch.tickets):
            if ticket.future.done():  # its request gave up
                continue
            if exc is not None:
                ticket.future.set_exception(exc)
            else:
                outcome = Outcome(results[i], seconds, batch.id, batch.samples, len(batch.tickets))
                ticket.future.set_result(outcome)
        self._dispatch()

    def _retry_alone(self, batch: _Batch, waiting: list[_Ticket], exc: BaseException) -> None:
        """Put the requests of a failed batch that still wait back in the queue, each to run
        by itself before anything else."""
        log_event(
            "batch_failed",
            logging.WARNING,
            batch_id=batch.id,
            batch_requests=len(batch.tickets),
            error=f"{type(exc).__name__}: {exc}",
            detail=f"retrying its {len(waiting)} waiting requests one by one",
        )
        for ticket in waiting:
            ticket.batch = None
            self._queue.push_alone(ticket)
            QUEUED.inc()

    def _leave(self, ticket: _Ticket) -> str:
        """Take a request that gave up out of the queue or its batch; says where it was."""
        ticket.future.cancel()
        if ticket.batch is None:
            self._queue.discard(ticket)
            QUEUED.dec()
            self._dispatch()  # the queue's first request may have changed
            return "waiting in the queue for a generation slot"
        ticket.batch.leave()
        progress = ticket.batch.progress
        return f"generating (step {progress.done} of {progress.total})"

    def _timed_out(self, request_id: str, what: str) -> GenerationTimeout:
        REJECTED.labels("timeout").inc()
        return GenerationTimeout(
            f"request {request_id} exceeded serving.request_timeout_s={self.timeout_s:g} s "
            f"while {what}"
        )

    @property
    def admitted(self) -> int:
        """Requests generating or queued now."""
        return len(self._tickets)

    def drain(self) -> None:
        """Admit nothing more (:class:`ShuttingDown`); what is admitted runs on."""
        self._draining = True

    async def idle(self, poll_s: float = 0.05) -> None:
        """Return once no admitted request is left; after :meth:`drain` it stays so."""
        while self._tickets:
            await asyncio.sleep(poll_s)

    def abort(self, why: str) -> int:
        """End every admitted request now with :class:`ShuttingDown` (``why``), start no
        batch again, and stop running ones at their next denoising step; how many ended."""
        self._draining = True
        self._closed = True
        left = [t for t in self._tickets if not t.future.done()]
        for ticket in left:
            ticket.future.set_exception(ShuttingDown(why))
            self._leave(ticket)
        return len(left)

    def close(self) -> None:
        """Stop taking work; queued requests are not started, running work finishes on its own."""
        self._closed = True
        if self._wake is not None:
            self._wake.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
