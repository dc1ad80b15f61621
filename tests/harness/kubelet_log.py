"""One container's log, served on :class:`tests.harness.kube.KubeApi` the way the kubelet
serves ``GET /api/v1/namespaces/NS/pods/NAME/log`` (streams included).

The API server proxies the request to the kubelet, which reads the container runtime's log
file (pkg/kubelet/kuberuntime/logs/logs.go ``ReadLogs``):

- each line carries the time the runtime stamped it (containerd: ``time.Now()`` as
  RFC3339Nano, in the node's local zone; internal/cri/io/logger.go ``redirectLogs``);
  ``timestamps=true`` prefixes it, written with ``RFC3339NanoFixed``
  (``2006-01-02T15:04:05.000000000Z07:00``: nine digits, the offset the runtime wrote; older
  kubelets wrote ``time.RFC3339Nano``, trailing zeros trimmed);
- ``sinceSeconds=N`` skips the lines stamped before now - N (``NewLogOptions``, ``write``);
- ``tailLines=N`` starts N lines before the end;
- ``follow=true`` keeps the stream open, sending lines as the container writes them, until
  the container is no longer running;
- a container that has not started answers 400: ``container "C" in pod "P" is waiting to
  start: ContainerCreating`` (pkg/kubelet/kubelet_pods.go ``validateContainerLogStatus``).

A client sees a dropped connection (an API server or kubelet restart, a proxy timeout) as
the stream ending early: :meth:`ContainerLog.drop_streams_after` ends the next streams after
so many lines.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import kmock

from tests.harness.kube import KubeApi

POLL_S = 0.01
"""How often an open stream looks for new lines (the kubelet waits on inotify)."""


def kubelet_stamp(ns: int, *, trim_zeros: bool = False, utc_offset_h: int = 0) -> str:
    """``ns`` (nanoseconds since the epoch) as the kubelet writes it before a line."""
    moment = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone(timedelta(hours=utc_offset_h)))
    fraction = f"{ns % 1_000_000_000:09d}"
    if trim_zeros:
        fraction = fraction.rstrip("0")
    sign = "+" if utc_offset_h > 0 else "-"
    zone = f"{sign}{abs(utc_offset_h):02d}:00" if utc_offset_h else "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + zone


class ContainerLog:
    """The log of container ``container`` of pod ``pod``, as its kubelet serves it.

    Args:
        trim_zeros: write stamps as older kubelets did (RFC3339Nano, trailing zeros trimmed).
        utc_offset_h: the offset the container runtime stamps lines with (a node whose local
            time zone is not UTC); 0 writes ``Z``.
        chunk_bytes: send the stream in pieces of this size, cutting lines anywhere (as TCP
            and the API server's proxy may); None sends one line per chunk.
    """

    def __init__(
        self,
        pod: str,
        container: str,
        *,
        trim_zeros: bool = False,
        utc_offset_h: int = 0,
        chunk_bytes: int | None = None,
    ) -> None:
        self.pod, self.container = pod, container
        self.trim_zeros, self.utc_offset_h = trim_zeros, utc_offset_h
        self.chunk_bytes = chunk_bytes
        self.started = True
        """False: the container waits to start (ContainerCreating); log reads answer 400."""
        self.ended = False
        """True once the container has exited: follow streams end after the last line."""
        self.requests: list[dict[str, str]] = []
        """The query of every log request, in order."""
        self._lines: list[tuple[int, str]] = []
        self._drops: list[int] = []
        self._open = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the container

    def write(self, text: str, stamp_ns: int | None = None) -> int:
        """The container prints ``text``; the runtime stamps it now (or at ``stamp_ns``)."""
        stamp = time.time_ns() if stamp_ns is None else stamp_ns
        with self._lock:
            self._lines.append((stamp, text))
        return stamp

    def end(self) -> None:
        """The container exits: open streams end after the lines written so far."""
        self.ended = True

    def drop_streams_after(self, *counts: int) -> None:
        """The next streams end after so many lines each (a dropped connection), in order."""
        with self._lock:
            self._drops.extend(counts)

    @property
    def open_streams(self) -> int:
        """Follow streams being served now."""
        return self._open

    # ------------------------------------------------------------------ the API

    def serve(self, api: KubeApi, namespace: str) -> None:
        """Answer this pod's log reads on ``api`` (ahead of the harness's static logs)."""
        path = re.compile(rf"/api/v1/namespaces/{namespace}/pods/{self.pod}/log")
        api.emulator["get", path] << self._respond

    def _respond(self, request: kmock.Request) -> Any:
        params = {k: str(v) for k, v in request.params.items()}
        with self._lock:
            self.requests.append(params)
        if params.get("container", self.container) != self.container:
            raise kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message=f"container {params['container']} is not valid for pod {self.pod}",
            )
        if not self.started:
            raise kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message=f'container "{self.container}" in pod "{self.pod}" is waiting to start: '
                "ContainerCreating",
            )
        with self._lock:
            drop_after = self._drops.pop(0) if self._drops else None
        return self._stream(params, drop_after)

    def _render(self, stamp: int, text: str, params: dict[str, str]) -> bytes:
        if params.get("timestamps") in ("true", "True", "1"):
            prefix = kubelet_stamp(
                stamp, trim_zeros=self.trim_zeros, utc_offset_h=self.utc_offset_h
            )
            text = f"{prefix} {text}"
        return f"{text}\n".encode()

    async def _stream(self, params: dict[str, str], drop_after: int | None):
        follow = params.get("follow") in ("true", "True", "1")
        since = 0
        if "sinceSeconds" in params:
            since = time.time_ns() - int(params["sinceSeconds"]) * 1_000_000_000
        with self._lock:
            index = max(0, len(self._lines) - int(params.get("tailLines", len(self._lines))))
        sent = 0
        if follow:
            self._open += 1
        try:
            yield b""  # headers go out now, as the kubelet's do, even before a first line
            while drop_after is None or sent < drop_after:
                with self._lock:
                    pending = self._lines[index:]
                    ended = self.ended
                for stamp, text in pending:
                    if drop_after is not None and sent >= drop_after:
                        return
                    index += 1
                    if stamp < since:  # the kubelet skips each line stamped before since
                        continue
                    line = self._render(stamp, text, params)
                    step = self.chunk_bytes or len(line)
                    for at in range(0, len(line), step):
                        yield line[at : at + step]
                    sent += 1
                if not follow or (ended and not pending):
                    return
                await asyncio.sleep(POLL_S)
        finally:
            if follow:
                self._open -= 1
