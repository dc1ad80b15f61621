"""Stopping the server the way Kubernetes stops a pod: drain what was admitted, then exit.

When a pod is deleted (a rolling update, a scale-down) the kubelet runs the container's
``preStop`` hook, then sends SIGTERM, and sends SIGKILL once the pod's
``terminationGracePeriodSeconds`` (counted from the deletion, hook included) have passed.
Meanwhile the pod leaves its Services' endpoints, which proxies (kube-proxy, Envoy) learn
of a little later, so a few requests may still arrive after the signal. On SIGTERM (or
SIGINT) the server:

1. stops being ready (``/v2/health/ready``, model readiness, gRPC ``ServerReady`` and
   ``ModelReady``), while liveness still answers 200: a failing liveness probe would have
   the kubelet restart the container instead of letting it finish
   (:mod:`~ldm_core.serve.dataplane`);
2. answers every new generation request 503 (gRPC ``UNAVAILABLE``) saying it is shutting
   down, a retryable answer that a mesh retries on another replica; health, metadata and
   ``/metrics`` still answer;
3. lets what it admitted, generating or queued, finish. An admitted request ends within
   ``serving.request_timeout_s`` of its arrival (504 past it), so that is the drain's
   deadline too. Once none is left both transports stop, after sending the answers in
   flight, and the process exits 0;
4. ends at once on a second signal, or at the deadline: every request left is answered 503,
   running denoising loops stop at their next step, and the process exits non-zero if it
   abandoned any, saying how many.

Upstream, neither does this: uvicorn (0.54, ``Server.handle_exit`` / ``shutdown``) closes
its listening socket at the first signal, so readiness cannot be answered and new requests
are refused at connect, then waits for requests in flight for ``timeout_graceful_shutdown``
(KServe's ``grace_period``, 30 s) and cancels them; KServe's ``ModelServer.stop`` (0.21),
which uvicorn's re-raised signal reaches, then unloads every model. Hence the signals are
this module's, on the event loop, and uvicorn's own handlers are off
(:class:`~ldm_core.serve.rest.HttpServer`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from ldm_core.serve.admission import Admission
from ldm_core.serve.dataplane import ModelAwareDataPlane
from ldm_core.serve.logs import log_event

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulShutdown:
    """The server's stop, from the first signal to the transports' end.

    Args:
        admission: refuses new work once the drain starts, and says when nothing is left.
        dataplane: whose readiness turns false (and model routes refuse new work).
        http: the REST server, told to stop (``should_exit``) once drained.
        deadline_s: how long the drain may take (``serving.request_timeout_s``).

    Use from the server's event loop: :meth:`install` there, then read :attr:`forced` and
    :meth:`grace_s` when the transports stop.
    """

    def __init__(
        self,
        admission: Admission,
        dataplane: ModelAwareDataPlane,
        http: uvicorn.Server,
        deadline_s: float,
    ) -> None:
        self.admission = admission
        self.dataplane = dataplane
        self.http = http
        self.deadline_s = float(deadline_s)
        self.forced = ""
        """Why the drain was cut short (a second signal, the deadline); empty if it was not."""
        self.unfinished = 0
        """Requests the forced stop ended before they finished."""
        self._started: float | None = None
        self._drain: asyncio.Task | None = None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT on the running event loop (until it closes)."""
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)

    def on_signal(self, signum: int) -> None:
        """The first signal starts the drain; a second one ends it at once."""
        name = signal.Signals(signum).name
        if self._started is None:
            self.start(name)
        else:
            self.force(f"a second signal ({name}) ended the drain")

    def start(self, cause: str) -> None:
        """Stop being ready, refuse new work, and stop the transports once nothing is left."""
        self._started = time.monotonic()
        self.dataplane.draining = True
        self.admission.drain()
        log_event(
            "shutdown_started",
            cause=cause,
            admitted=self.admission.admitted,
            deadline_s=self.deadline_s,
        )
        self._drain = asyncio.ensure_future(self._stop_when_drained())

    async def _stop_when_drained(self) -> None:
        try:
            await asyncio.wait_for(self.admission.idle(), timeout=self.grace_s())
        except TimeoutError:
            self.force(f"the drain deadline serving.request_timeout_s={self.deadline_s:g} s passed")
            return
        log_event("shutdown_drained", seconds=round(time.monotonic() - self._started, 3))
        # Answers still being encoded or sent get what is left of the deadline.
        self.http.config.timeout_graceful_shutdown = self.grace_s()
        self.http.should_exit = True

    def force(self, why: str) -> None:
        """End the drain now: fail what is left (503), stop the transports at once."""
        if self.forced:
            return
        self.forced = why
        if self._drain is not None and asyncio.current_task() is not self._drain:
            self._drain.cancel()
        self.unfinished = self.admission.abort(why)
        log_event("shutdown_forced", logging.WARNING, reason=why, unfinished=self.unfinished)
        # uvicorn still gives the answers just failed its 0.1 s to go out, then cancels.
        self.http.config.timeout_graceful_shutdown = 0
        self.http.force_exit = True
        self.http.should_exit = True

    def grace_s(self) -> float:
        """Seconds left to the drain's deadline (none once forced, or before a signal)."""
        if self._started is None or self.forced:
            return 0.0
        return max(0.0, self._started + self.deadline_s - time.monotonic())

    def finished(self) -> None:
        """Log the end of the stop (after both transports stopped)."""
        if self._started is not None:
            log_event(
                "shutdown_finished",
                seconds=round(time.monotonic() - self._started, 3),
                forced=bool(self.forced),
            )
