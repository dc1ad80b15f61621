"""Admission: how many requests generate at once, how many may wait, and for how long.

Why it looks the way it does:

- Generation runs in a pool of ``serving.max_concurrency`` worker threads, so the event
  loop keeps answering health checks and ``/metrics`` while the model denoises.
- At most ``serving.max_queue`` requests wait for a slot; any beyond that get 503 at once
  (with ``Retry-After``) instead of piling up until the device runs out of memory.
- ``serving.request_timeout_s`` bounds queueing plus denoising (504). A generation whose
  request gave up (timed out, or the client went away) stops at its next denoising step,
  so its slot frees soon; a slot counts as busy until its thread has really finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ldm_core.config import ServingConfig
from ldm_core.errors import LdmError
from ldm_core.serve.metrics import IN_FLIGHT, QUEUED, REJECTED

T = TypeVar("T")


class RequestRejected(LdmError):
    """A valid request the server cannot take now; carries the HTTP status to answer with."""

    status = 503
    reason = "rejected"


class ServerBusy(RequestRejected):
    """Every generation slot and queue place is taken (or the device is out of memory)."""

    status = 503
    reason = "busy"


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


class Admission:
    """Runs work under the server's concurrency, queue and time limits.

    Args:
        max_concurrency: worker threads, i.e. requests generating at the same time.
        max_queue: requests that may wait for a thread; more are refused with 503.
        timeout_s: limit on waiting plus working, from the request's arrival (504).

    One instance per server process, used from its event loop only (the counters are not
    locked); the limits are checked where the config is loaded. ``close`` when the server
    stops.
    """

    def __init__(self, max_concurrency: int, max_queue: int, timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.timeout_s = float(timeout_s)
        self._admitted = 0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="ldm-generate"
        )

    @classmethod
    def from_config(cls, serving: ServingConfig) -> Admission:
        return cls(serving.max_concurrency, serving.max_queue, serving.request_timeout_s)

    async def run(
        self, work: Callable[[Progress], T], *, request_id: str, started: float, steps: int
    ) -> tuple[T, float]:
        """``work(progress)`` in a worker thread once a slot is free; returns its result
        and the seconds it ran. ``started`` (``time.monotonic()``) is when the request
        arrived, ``steps`` how many progress calls ``work`` will make.

        Raises:
            ServerBusy: no slot and no queue place is free.
            GenerationTimeout: the deadline passed while queued or working.
        """
        if self._admitted >= self.max_concurrency + self.max_queue:
            REJECTED.labels("busy").inc()
            raise ServerBusy(
                f"busy: {self._admitted} requests generating or queued (serving.max_concurrency="
                f"{self.max_concurrency}, serving.max_queue={self.max_queue}); retry later"
            )
        deadline = started + self.timeout_s
        self._admitted += 1
        try:
            await self._acquire_slot(request_id, deadline)
            return await self._work(work, request_id, deadline, steps)
        finally:
            self._admitted -= 1

    async def _acquire_slot(self, request_id: str, deadline: float) -> None:
        QUEUED.inc()
        try:
            await asyncio.wait_for(
                self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise self._timed_out(
                request_id, "waiting in the queue for a generation slot"
            ) from None
        finally:
            QUEUED.dec()

    async def _work(
        self, work: Callable[[Progress], T], request_id: str, deadline: float, steps: int
    ) -> tuple[T, float]:
        progress = Progress(steps)
        IN_FLIGHT.inc()
        started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, progress)
        future.add_done_callback(self._release)
        try:
            result = await asyncio.wait_for(
                asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            progress.cancel()
            raise self._timed_out(
                request_id, f"generating (step {progress.done} of {progress.total})"
            ) from None
        except asyncio.CancelledError:
            progress.cancel()  # the client went away: stop at the next denoising step
            raise
        return result, time.monotonic() - started

    def _release(self, future: asyncio.Future) -> None:
        # Runs on the event loop when the worker thread is really done (not when the
        # request stopped waiting), so the slot count always matches the busy threads.
        IN_FLIGHT.dec()
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved here so abandoned failures are not logged as leaks

    def _timed_out(self, request_id: str, what: str) -> GenerationTimeout:
        REJECTED.labels("timeout").inc()
        return GenerationTimeout(
            f"request {request_id} exceeded serving.request_timeout_s={self.timeout_s:g} s "
            f"while {what}"
        )

    def close(self) -> None:
        """Stop taking work; queued work is dropped, running work finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
